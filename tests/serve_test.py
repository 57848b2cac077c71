"""python -m jtune.serve under concurrent load on 127.0.0.1: every request answered, and answered as PyTorch
answers each text alone; requests batched into shared calls; bad requests get clear 4xx errors."""

import httpx
import numpy as np
import pytest

from benchmarks import serve_load
from jtune import serving
from jtune.models import quantize
from tests.cli import env, run_cli
from tests.evaluate_test import LABELS, _classifier, _torch_probs

TEXTS = [f'review {i}: the film was {w} and the cast {v}' for i, (w, v) in enumerate(
    (w, v) for w in ('dull', 'superb', 'long', 'funny', 'odd', 'tender', 'loud', 'bland')
    for v in ('shone', 'slept', 'tried', 'sang', 'lost'))]


@pytest.fixture(scope='module')
def server(tmp_path_factory, minilm_dir):
  folder = tmp_path_factory.mktemp('serve') / 'model'
  torch_model = _classifier(folder, minilm_dir, seed=5)
  probs = _torch_probs(torch_model, minilm_dir, TEXTS, 128)
  reference = {t: {'label': LABELS[int(p.argmax())], 'probabilities': dict(zip(LABELS, map(float, p)))}
               for t, p in zip(TEXTS, probs)}
  port = serve_load.free_port()
  proc = serve_load.start_server(str(folder), port, '--max_batch_size=16', '--max_wait_ms=20',
                                 '--max_chars=300', env=env(devices=1))
  yield f'http://127.0.0.1:{port}', reference, folder
  proc.terminate()
  proc.wait()


def test_concurrent_load_loses_nothing_and_answers_right(server):
  url, reference, _ = server
  load = serve_load.run_load(url, TEXTS, requests=150, concurrency=24)
  summary = serve_load.summarize(load, reference, httpx.get(f'{url}/stats').json())
  assert summary['failed'] == 0 and summary['wrong'] == 0, summary
  assert summary['requests'] == 150
  # concurrent requests shared model calls: fewer calls than requests, some holding several requests' texts
  assert summary['model_calls'] < 150 and summary['largest_batch'] > 3, summary
  assert summary['p50_ms'] > 0 and summary['texts_per_s'] > 0


def test_health_and_single_text(server):
  url, reference, _ = server
  health = httpx.get(f'{url}/health').json()
  assert health['status'] == 'ok' and health['labels'] == LABELS
  answer = httpx.post(f'{url}/predict', json={'text': TEXTS[3]}).json()
  assert answer['label'] == reference[TEXTS[3]]['label']
  assert answer['score'] == pytest.approx(max(reference[TEXTS[3]]['probabilities'].values()), abs=1e-4)


@pytest.mark.parametrize('body, status, detail', [
    ({'texts': []}, 422, '"texts" is empty'),
    ({'texts': ['ok'] * 17}, 413, '17 texts in one request: expected at most 16'),
    ({'texts': ['x' * 301]}, 413, 'text 0 has 301 characters: expected at most 300'),
    ({'texts': ['fine', '  ']}, 422, 'text 1 is empty'),
    ({'text': 'a', 'texts': ['b']}, 422, 'expected exactly one of'),
])
def test_bad_requests_get_clear_errors(server, body, status, detail):
  url, _, _ = server
  response = httpx.post(f'{url}/predict', json=body)
  assert response.status_code == status and detail in response.json()['detail']


def test_malformed_requests_are_422_with_one_line(server):
  url, _, _ = server
  expected = ': expected a JSON object {"texts": [strings]} or {"text": string}'
  for request, detail in (
      (dict(content=b'{not json', headers={'content-type': 'application/json'}), 'not JSON (at character 1)'),
      (dict(json={'texts': 'not a list'}), 'texts: Input should be a valid list'),
      (dict(json={'txt': ['typo']}), 'txt: Extra inputs are not permitted')):
    response = httpx.post(f'{url}/predict', **request)
    assert response.status_code == 422 and response.json()['detail'] == detail + expected, response.text


def test_int8_weights_are_a_quarter_and_predict_nearly_the_same(server, cache_dir):
  _, reference, folder = server
  limits = serving.Limits(max_batch_size=16)
  exact = serving.Predictor(str(folder), cache_dir, limits)
  int8 = serving.Predictor(str(folder), cache_dir, limits, weights='int8')
  assert quantize.nbytes(int8.params) < 0.3 * quantize.nbytes(exact.params)  # the matrices in int8
  p_exact, p_int8 = exact.probabilities(TEXTS), int8.probabilities(TEXTS)
  np.testing.assert_allclose(p_exact, [list(reference[t]['probabilities'].values()) for t in TEXTS], atol=1e-4)
  assert np.abs(p_int8 - p_exact).max() < 0.02  # int8 rounding moves probabilities a little
  assert np.abs(p_int8 - p_exact).max() > 0  # ... but it does move them: the int8 weights are in use


def test_quantize_round_trip():
  rng = np.random.default_rng(0)
  params = {'dense': {'kernel': rng.normal(size=(64, 4, 8)).astype(np.float32), 'bias': np.ones(32, np.float32)},
            'emb': {'embedding': rng.normal(size=(100, 16)).astype(np.float32)}}
  q = quantize.quantize(params)
  assert q['dense']['kernel']['int8'].dtype == np.int8 and q['dense']['bias'].dtype == np.float32
  back = quantize.dequantize(q)
  for w, b in ((params['dense']['kernel'], back['dense']['kernel']),
               (params['emb']['embedding'], back['emb']['embedding'])):
    err = np.abs(np.asarray(b) - w)
    assert err.max() <= np.abs(w).max() / 127 / 2 + 1e-6  # at most half a quantisation step


@pytest.mark.parametrize('problem_type,num_labels,kind', [
    ('regression', 1, 'raw'), ('multi_label_classification', 3, 'sigmoid'), (None, 1, 'sigmoid'),
    ('single_label_classification', 3, 'softmax'), (None, 3, 'softmax')])
def test_scores_follow_the_problem_type_as_transformers_pipeline_does(problem_type, num_labels, kind):
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.BertConfig(problem_type=problem_type, num_labels=num_labels)
  logits = np.array([[2.0, -1.0, 0.5][:num_labels], [-3.0, 0.0, 1.0][:num_labels]])
  want = {'raw': logits, 'sigmoid': 1 / (1 + np.exp(-logits)),
          'softmax': np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)}[kind]
  np.testing.assert_allclose(serving.score_function(config)(logits), want, rtol=1e-12)


@pytest.mark.parametrize('flag,needle', [
    ('--port=99999', '--port=99999: expected a TCP port in [1, 65535]'),
    ('--port=-1', '--port=-1: expected a TCP port in [1, 65535]'),
    ('--max_wait_ms=-5', '--max_wait_ms=-5.0: expected a non-negative number of milliseconds')])
def test_bad_flags_are_one_line_before_the_model_loads(flag, needle, tmp_path):
  proc = run_cli('jtune.serve', f'--model={tmp_path / "none"}', flag, check=False)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f'jtune: error: {needle}', proc.stderr
