"""Multi-host for real: 2 processes x 4 fake CPU devices on 127.0.0.1 (gloo) against 1 process x 8 devices."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import cli

ARGS = ['--config=configs/bert_cls.py:tiny', '--config.mesh.data=2', '--config.mesh.fsdp=2',
        '--config.mesh.tensor=2', '--config.train.num_steps=6', '--config.train.log_every_steps=1',
        '--config.train.eval_every_steps=3', '--config.train.checkpoint_every_steps=3']


def _records(workdir) -> list[dict]:
  return cli.read_jsonl(workdir / 'metrics.jsonl')


def _launch(workdir, cache_dir, processes: int, *extra: str):
  return cli.launch([*ARGS, f'--workdir={workdir}', f'--config.cache_dir={cache_dir}', *extra], processes)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, cache_dir):
  one, two = tmp_path_factory.mktemp('one_process'), tmp_path_factory.mktemp('two_processes')
  errs_two = cli.wait(_launch(two, cache_dir, 2))
  cli.wait(_launch(one, cache_dir, 1))
  return one, two, errs_two


def test_each_process_feeds_its_own_rows(runs):
  _, _, errs = runs
  assert 'Process 0 of 2 feeds rows 0:8 of each global batch of 16' in errs[0]
  assert 'Process 1 of 2 feeds rows 8:16 of each global batch of 16' in errs[1]
  assert 'process 1 of 2, 4 of 8 devices' in errs[1]


def test_two_processes_match_one(runs):
  one, two, _ = runs
  a, b = _records(one), _records(two)
  assert [r['step'] for r in a] == [r['step'] for r in b]  # also: process 1 wrote no second copy
  assert [r['step'] for r in b if 'loss' in r] == [1, 2, 3, 4, 5, 6]
  for ra, rb in zip(a, b):
    for key in set(ra) - {'examples_per_sec'}:
      assert rb[key] == pytest.approx(ra[key], abs=1e-5), (ra['step'], key)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  ea, eb = load_file(one / 'export' / 'model.safetensors'), load_file(two / 'export' / 'model.safetensors')
  assert ea.keys() == eb.keys()
  for key in ea:
    np.testing.assert_allclose(eb[key], ea[key], atol=1e-5, err_msg=key)


def test_checkpoints_are_written_collectively_and_match(runs):
  from jtune import export  # pylint: disable=g-import-not-at-top
  one, two, _ = runs
  for workdir in (one, two):
    assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['3', '6']
    assert len(list((workdir / 'tensorboard').iterdir())) == 1  # one writer: process 0
  _, _, _, params_one = export.restore_run(str(one))
  _, _, _, params_two = export.restore_run(str(two))
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5),
                         params_one, params_two)


def test_a_dead_process_stops_the_others(tmp_path, cache_dir):
  procs = _launch(tmp_path, cache_dir, 2, '--config.train.num_steps=100000',
                  '--config.train.eval_every_steps=100000', '--config.train.checkpoint_every_steps=100000')
  try:
    deadline = time.monotonic() + 300
    while not (tmp_path / 'metrics.jsonl').exists() or not (tmp_path / 'metrics.jsonl').read_text():
      assert time.monotonic() < deadline and procs[0].poll() is None, 'the run did not start training'
      time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=120)
    waited = time.monotonic() - killed
  finally:
    for proc in procs:
      proc.kill()
  assert procs[0].returncode != 0
  assert waited < 60, waited  # the heartbeat timeout is 10 s
  assert 'another task died' in err or 'unhealthy' in err, err[-3000:]


def test_processes_started_with_different_configs_stop_at_once(tmp_path, cache_dir):
  """One host's override differs: each process says so in one line before the run's first collective (a batch
  of another shape aborted in gloo with 'Received data size doesn't match expected size')."""
  port = cli.free_port()
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'jtune.train', *ARGS, f'--workdir={tmp_path}', f'--config.cache_dir={cache_dir}',
       f'--config.train.batch_size={batch}', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
       f'--process_id={i}'], cwd=cli.ROOT, env=cli.env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i, batch in enumerate((16, 32))]
  for proc in procs:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "jtune: error: --config: process 1 of 2 started with a config that differs from process 0's: expected "
        'the same --config file and overrides on every process'), err[-3000:]
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize('num_beams', [1, 2])
def test_seq2seq_generation_in_eval_matches_one_process(tmp_path, cache_dir, num_beams):
  """Eval decodes with parameters sharded over both processes; each reads the whole (replicated) output."""
  args = ['--config=configs/seq2seq.py:tiny', '--config.mesh.data=2', '--config.mesh.fsdp=2',
          '--config.mesh.tensor=2', '--config.train.num_steps=2', '--config.train.eval_every_steps=2',
          f'--config.task.num_beams={num_beams}', f'--config.cache_dir={cache_dir}']
  cli.wait(cli.launch([*args, f'--workdir={tmp_path / "two"}'], 2))
  cli.wait(cli.launch([*args, f'--workdir={tmp_path / "one"}'], 1))
  one, two = (next(r for r in _records(tmp_path / name) if 'eval_loss' in r) for name in ('one', 'two'))
  generated = [key for key in one if key.startswith('eval_') and key not in ('eval_loss', 'eval_perplexity')]
  assert generated, one
  for key in generated + ['eval_loss']:
    assert two[key] == pytest.approx(one[key], abs=1e-5), key
