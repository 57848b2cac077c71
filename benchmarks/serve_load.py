"""Load test of `python -m jtune.serve`: concurrent clients on 127.0.0.1, latency percentiles and throughput,
and a check that every request was answered, and answered as the model answers each text alone.

  python -m benchmarks.serve_load --model=/tmp/run1/export --requests=400 --concurrency=32
  python -m benchmarks.serve_load --model=/tmp/run1/export --weights=int8   # the int8 weights, same load

It starts the server itself (`--max_batch_size`, `--max_wait_ms` passed through), sends `--requests` requests of
1 to 3 texts from the config's eval split from `--concurrency` threads, and prints one JSON line: p50/p90/p99
latency, requests/s and texts/s, how many model calls served them, failures and wrong answers (both must be 0).
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

_MODEL = flags.DEFINE_string('model', None, 'An exported sequence classifier.')
_WEIGHTS = flags.DEFINE_enum('weights', 'float32', ['float32', 'int8'], 'Weights the server runs with.')
_REQUESTS = flags.DEFINE_integer('requests', 400, 'Requests to send.')
_CONCURRENCY = flags.DEFINE_integer('concurrency', 32, 'Client threads sending at once.')
_MAX_BATCH = flags.DEFINE_integer('max_batch_size', 32, 'Server: texts per model call.')
_MAX_WAIT = flags.DEFINE_float('max_wait_ms', 5.0, 'Server: how long a request waits for company.')
_TEXTS = flags.DEFINE_integer('texts', 200, 'Distinct texts (from the polarity corpus) the requests draw from.')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_server(model: str, port: int, *args: str, env: dict[str, str] | None = None,
                 timeout_s: float = 300) -> subprocess.Popen:
  """`python -m jtune.serve` on 127.0.0.1:port, returned once /health answers."""
  import httpx  # pylint: disable=g-import-not-at-top

  proc = subprocess.Popen([sys.executable, '-m', 'jtune.serve', f'--model={model}', f'--port={port}', *args],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'jtune.serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}')
    try:
      if httpx.get(f'http://127.0.0.1:{port}/health', timeout=1.0).status_code == 200:
        return proc
    except httpx.HTTPError:
      time.sleep(0.5)
  proc.kill()
  raise RuntimeError(f'jtune.serve did not answer on port {port} within {timeout_s} s')


def run_load(url: str, texts: list[str], requests: int, concurrency: int, seed: int = 0) -> dict:
  """Sends `requests` POST /predict of 1 to 3 of `texts` from `concurrency` threads; returns every request's
  texts, status, answer and latency, and the wall time."""
  import httpx  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  bodies = [[texts[i] for i in rng.choice(len(texts), int(rng.integers(1, 4)), replace=False)]
            for _ in range(requests)]

  def send(client: httpx.Client, body: list[str]):
    start = time.perf_counter()
    try:
      response = client.post(f'{url}/predict', json={'texts': body}, timeout=120.0)
      status, answer = response.status_code, response.json()
    except httpx.HTTPError as e:
      status, answer = -1, {'error': str(e)}
    return body, status, answer, time.perf_counter() - start

  start = time.perf_counter()
  with httpx.Client() as client, concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    results = list(pool.map(lambda body: send(client, body), bodies))
  return {'results': results, 'wall_s': time.perf_counter() - start}


def summarize(load: dict, reference: dict[str, dict], stats: dict) -> dict:
  """Latency percentiles, throughput, failures, and answers that differ from `reference` (text -> answer)."""
  results = load['results']
  latencies = np.array([r[3] for r in results]) * 1000
  failed = sum(1 for _, status, _, _ in results if status != 200)
  wrong = 0
  for body, status, answer, _ in results:
    if status != 200:
      continue
    predictions = answer.get('predictions', [])
    if len(predictions) != len(body):
      wrong += 1
      continue
    for text, got in zip(body, predictions):
      want = reference[text]
      if got['label'] != want['label'] or any(abs(got['probabilities'][k] - v) > 1e-4
                                              for k, v in want['probabilities'].items()):
        wrong += 1
  texts = sum(len(r[0]) for r in results)
  return {'requests': len(results), 'texts': texts, 'failed': failed, 'wrong': wrong,
          'p50_ms': float(np.percentile(latencies, 50)), 'p90_ms': float(np.percentile(latencies, 90)),
          'p99_ms': float(np.percentile(latencies, 99)), 'requests_per_s': len(results) / load['wall_s'],
          'texts_per_s': texts / load['wall_s'], 'model_calls': stats['calls'],
          'largest_batch': stats['largest_batch']}


def main(argv):
  del argv
  import httpx  # pylint: disable=g-import-not-at-top
  from jtune import serving  # pylint: disable=g-import-not-at-top
  from jtune.data import corpora  # pylint: disable=g-import-not-at-top

  cache = os.path.expanduser('~/.cache/jtune')
  with open(corpora.prepare('polarity', cache)['validation'], newline='') as f:
    rows = list(csv.DictReader(f))
  texts = list(dict.fromkeys(r['text'] for r in rows))[:_TEXTS.value]
  predictor = serving.Predictor(_MODEL.value, cache, serving.Limits(), _WEIGHTS.value)
  reference = {t: predictor.answers([t])[0] for t in texts}  # each text alone, in this process
  port = free_port()
  server = start_server(_MODEL.value, port, f'--weights={_WEIGHTS.value}', f'--max_batch_size={_MAX_BATCH.value}',
                        f'--max_wait_ms={_MAX_WAIT.value}')
  try:
    url = f'http://127.0.0.1:{port}'
    load = run_load(url, texts, _REQUESTS.value, _CONCURRENCY.value)
    print(json.dumps(summarize(load, reference, httpx.get(f'{url}/stats').json())), flush=True)
  finally:
    server.terminate()
    server.wait()


if __name__ == '__main__':
  flags.mark_flags_as_required(['model'])
  app.run(main)
