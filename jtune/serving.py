"""Serving an exported classifier over HTTP: a jitted predictor, a batcher that joins concurrent requests into
one call, and the FastAPI app (`python -m jtune.serve` runs it with uvicorn).

Requests wait in a bounded queue (full: 503); the batcher takes what is waiting, up to `max_batch_size` texts or
`max_wait_ms` after the first, pads the batch to a power of two and to a length bucket (so a few compiled
shapes serve every request), and runs the model in a worker thread while the event loop keeps accepting.
"""

# No `from __future__ import annotations`: FastAPI reads the request model from the live annotation.
import asyncio
import concurrent.futures
import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jtune import ensemble, modeling
from jtune import step as step_lib
from jtune.data import batching
from jtune.data.features import Features, lengths_of, ragged
from jtune.models import quantize


@dataclasses.dataclass(frozen=True)
class Limits:
  max_batch_size: int = 32  # texts per model call (and per request)
  max_wait_ms: float = 5.0  # how long the first waiting request waits for company
  queue_size: int = 256  # requests waiting at most; beyond: 503
  max_chars: int = 10_000  # per text; longer: 413
  max_length: int = 128  # tokens per text (longer texts are truncated)
  buckets: tuple[int, ...] = (32, 64, 128)


def score_function(hf_config: Any) -> Callable[[np.ndarray], np.ndarray]:
  """Scores from logits as Hugging Face's text-classification pipeline makes them: the raw value for a
  regression model, independent sigmoids for a multi-label one (or a single output), else a softmax."""
  if hf_config.problem_type == 'regression':
    return lambda logits: np.asarray(logits, np.float64)
  if hf_config.problem_type == 'multi_label_classification' or hf_config.num_labels == 1:
    return lambda logits: 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
  return ensemble.softmax


class Predictor:
  """An exported sequence classifier on the default device: texts in, label probabilities out."""

  def __init__(self, model_path: str, cache_dir: str, limits: Limits, weights: str = 'float32'):
    self.model, params = modeling.load(model_path, cache_dir, head='sequence')
    self.labels = ensemble.label_names(self.model)
    self.scores = score_function(self.model.hf_config)
    self.limits = limits
    self.weights = weights
    if weights == 'int8':
      params = jax.tree_util.tree_map(jnp.asarray, quantize.quantize(jax.device_get(params)))
    self.params = params
    predict = functools.partial(step_lib.predict_step, model=self.model.module, inputs=self.model.inputs)
    self._predict = jax.jit(lambda params, batch: predict(quantize.dequantize(params), batch))

  def probabilities(self, texts: list[str]) -> np.ndarray:
    """[len(texts), outputs] scores (`score_function`); one model call, padded to a power of two and a length
    bucket."""
    enc = self.model.tokenizer(texts, truncation=True, max_length=self.limits.max_length,
                               return_token_type_ids=True, return_attention_mask=False)
    tokens = {name: ragged(enc[name]) for name in ('input_ids', 'token_type_ids')}
    split = Features(tokens=tokens, rows={}, lengths=lengths_of(tokens['input_ids']))
    rows = np.arange(1 << max(len(texts) - 1, 0).bit_length()) % len(texts)  # filler rows repeat, then dropped
    length = batching.bucket_length(int(split.lengths.max()), self.limits.buckets)
    batch = batching.make_batch(split, rows, length, self.model.pad_id)
    return self.scores(np.asarray(self._predict(self.params, batch))[:len(texts)])

  def answers(self, texts: list[str]) -> list[dict[str, Any]]:
    probs = self.probabilities(texts)
    return [{'label': self.labels[int(p.argmax())], 'score': float(p.max()),
             'probabilities': dict(zip(self.labels, map(float, p)))} for p in probs]

  def warmup(self) -> None:
    """Compiles every shape a request can meet (batch sizes 1, 2, 4, ... up to max_batch_size, at every length
    bucket), so that no request waits for a compilation."""
    rows = 1
    while True:
      for length in self.limits.buckets:  # length - 2 words of one token, plus [CLS] and [SEP]
        self.probabilities(['a ' * max(1, length - 2)] * min(rows, self.limits.max_batch_size))
      if rows >= self.limits.max_batch_size:
        return
      rows *= 2


class QueueFull(Exception):
  pass


class Batcher:
  """Joins concurrent requests into model calls of at most `max_batch_size` texts."""

  def __init__(self, predictor: Predictor):
    self.predictor = predictor
    self.limits = predictor.limits
    self.queue: asyncio.Queue = asyncio.Queue(maxsize=self.limits.queue_size)
    self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self.calls, self.texts, self.largest = 0, 0, 0
    self._carry = None

  async def submit(self, texts: list[str]) -> list[dict[str, Any]]:
    future = asyncio.get_running_loop().create_future()
    try:
      self.queue.put_nowait((texts, future))
    except asyncio.QueueFull:
      raise QueueFull() from None
    return await future

  async def _next(self, timeout: float | None):
    if self._carry is not None:
      item, self._carry = self._carry, None
      return item
    if timeout is None:
      return await self.queue.get()
    if timeout <= 0:  # past the deadline: only what is waiting already
      try:
        return self.queue.get_nowait()
      except asyncio.QueueEmpty:
        raise asyncio.TimeoutError() from None
    return await asyncio.wait_for(self.queue.get(), timeout)

  async def run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      items = [await self._next(None)]
      size = len(items[0][0])
      deadline = time.monotonic() + self.limits.max_wait_ms / 1000
      while size < self.limits.max_batch_size:
        try:
          item = await self._next(max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
          break
        if size + len(item[0]) > self.limits.max_batch_size:
          self._carry = item  # first in the next call
          break
        items.append(item)
        size += len(item[0])
      texts = [t for item_texts, _ in items for t in item_texts]
      try:
        answers = await loop.run_in_executor(self.executor, self.predictor.answers, texts)
      except Exception as e:  # pylint: disable=broad-except  (every waiting request gets the error)
        for _, future in items:
          if not future.done():
            future.set_exception(e)
        continue
      self.calls, self.texts, self.largest = self.calls + 1, self.texts + len(texts), max(self.largest, len(texts))
      start = 0
      for item_texts, future in items:
        if not future.done():
          future.set_result(answers[start:start + len(item_texts)])
        start += len(item_texts)


def create_app(predictor: Predictor, model_name: str):
  """The FastAPI app: POST /predict {"texts": [...]} (or {"text": "..."}), GET /health, GET /stats."""
  import fastapi  # pylint: disable=g-import-not-at-top  (the serve extra)
  import pydantic  # pylint: disable=g-import-not-at-top

  limits = predictor.limits
  state: dict[str, Any] = {}

  class Request(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra='forbid')
    texts: list[str] | None = None
    text: str | None = None

  async def lifespan(app):
    del app
    state['batcher'] = Batcher(predictor)
    task = asyncio.create_task(state['batcher'].run())
    yield
    task.cancel()

  app = fastapi.FastAPI(title='jtune serve', lifespan=lifespan)

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def one_line(request, error):  # FastAPI's own 422 body is a list of error objects
    del request
    first = error.errors()[0] if error.errors() else {}
    where = first.get('loc', ())[1:]
    if first.get('type') == 'json_invalid':  # its location is a character position
      what = f'not JSON (at character {where[0]})' if where else 'not JSON'
    else:
      what = f'{".".join(map(str, where))}: {first.get("msg", "invalid")}' if where else first.get('msg', 'invalid')
    return fastapi.responses.JSONResponse(status_code=422, content={
        'detail': f'{what}: expected a JSON object {{"texts": [strings]}} or {{"text": string}}'})

  def reject(status: int, message: str):
    raise fastapi.HTTPException(status_code=status, detail=message)

  @app.get('/health')
  async def health():
    return {'status': 'ok', 'model': model_name, 'labels': predictor.labels, 'weights': predictor.weights}

  @app.get('/stats')
  async def stats():
    b = state['batcher']
    return {'calls': b.calls, 'texts': b.texts, 'largest_batch': b.largest, 'waiting': b.queue.qsize()}

  @app.post('/predict')
  async def predict(request: Request):
    if (request.texts is None) == (request.text is None):
      reject(422, 'expected exactly one of "texts" (a list of strings) or "text" (a string)')
    texts = [request.text] if request.text is not None else request.texts
    if not texts:
      reject(422, '"texts" is empty: expected at least one text')
    if len(texts) > limits.max_batch_size:
      reject(413, f'{len(texts)} texts in one request: expected at most {limits.max_batch_size}')
    for i, text in enumerate(texts):
      if not text.strip():
        reject(422, f'text {i} is empty: expected some text')
      if len(text) > limits.max_chars:
        reject(413, f'text {i} has {len(text)} characters: expected at most {limits.max_chars}')
    try:
      answers = await state['batcher'].submit(texts)
    except QueueFull:
      reject(503, f'{limits.queue_size} requests are waiting already: retry later')
    return {'predictions': answers} if request.texts is not None else answers[0]

  return app
