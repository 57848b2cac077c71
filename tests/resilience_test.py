"""Surviving kills, preemption and crashes mid-save in one process: every resumed run ends bit for bit like an
uninterrupted one; warm starts, keeping the best checkpoint and stopping on non-finite steps. The same for two
processes: tests/resilience_multihost_test.py."""

import signal
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests import cli, resumes


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache_dir):
  """The uninterrupted run: 1 process x 8 devices."""
  one = tmp_path_factory.mktemp('ref1')
  cli.wait(cli.launch(resumes.args(one, cache_dir)))
  return one


def test_sigkill_at_a_random_step_then_rerun_is_bit_exact(reference, tmp_path, cache_dir):
  resumes.check_sigkill_then_rerun(1, reference, tmp_path, cache_dir)


def test_sigterm_saves_and_exits_zero(reference, tmp_path, cache_dir):
  resumes.check_sigterm_saves_and_exits_zero(1, reference, tmp_path, cache_dir)


def test_kill_during_a_save_keeps_the_previous_checkpoint(reference, tmp_path, cache_dir):
  """Saves every step, killed the moment a temporary checkpoint folder appears."""
  args = resumes.args(tmp_path, cache_dir, '--config.train.checkpoint_every_steps=1')
  checkpoints = tmp_path / 'checkpoints'
  for _ in range(5):
    procs = cli.launch(args)
    deadline = time.monotonic() + 300
    tmp = []
    while not tmp and procs[0].poll() is None and time.monotonic() < deadline:
      tmp = [p.name for p in checkpoints.iterdir() if 'tmp' in p.name] if checkpoints.exists() else []
    resumes.kill(procs)
    if tmp and any('tmp' in p.name for p in checkpoints.iterdir()):
      break
  else:
    pytest.fail('never caught a save in progress')
  complete = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  errs = cli.wait(cli.launch(args))
  if complete:
    assert f'Resuming from {checkpoints / str(complete[-1])}' in errs[0]
  assert not any('tmp' in p.name for p in checkpoints.iterdir())  # cleaned up
  resumes.assert_same_run(tmp_path, reference)


def test_sigterm_during_the_export_keeps_the_earlier_one_and_exits_zero(reference, tmp_path, cache_dir):
  """A finished run run again goes straight to its export (every step is saved): a SIGTERM the moment the export's
  staging folder appears exits 0, leaves no staging folder, and keeps the earlier export whole."""
  args = resumes.args(tmp_path, cache_dir)
  cli.wait(cli.launch(args))
  for _ in range(8):
    proc = cli.launch(args)[0]
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not list(tmp_path.glob('.export.jtune-*')):
      time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if 'SIGTERM during the export' in err:
      break
  else:
    pytest.fail('never caught the export in progress')
  assert proc.returncode == 0, err[-3000:]
  assert not list(tmp_path.glob('.export*'))  # no staging folder, nor the earlier export moved aside
  ours, theirs = load_file(tmp_path / 'export' / 'model.safetensors'), load_file(reference / 'export' /
                                                                                 'model.safetensors')
  assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_init_from_warm_starts_weights_without_optimizer_state(reference, tmp_path, cache_dir):
  """init_from loads another run's weights; with a zero learning rate they come out unchanged."""
  proc = cli.run_cli('jtune.train', *resumes.args(
      tmp_path, cache_dir, f'--config.train.init_from={reference}', '--config.optim.learning_rate=1e-30',
      '--config.train.num_steps=2', '--config.optim.weight_decay=0.0'))
  assert f'Warm start from the weights of {reference}' in proc.stderr
  ours = load_file(tmp_path / 'export' / 'model.safetensors')
  theirs = load_file(reference / 'export' / 'model.safetensors')
  for key in ours:
    np.testing.assert_allclose(ours[key], theirs[key], atol=1e-6, err_msg=key)
  records = [r for r in cli.read_jsonl(tmp_path / 'metrics.jsonl') if 'loss' in r]
  assert records[0]['step'] == 1  # a new run: step and optimizer start from zero


def test_keep_best_early_stopping_and_export_of_the_best(tmp_path, cache_dir):
  # A learning rate too high: the evaluation loss soon stops improving.
  args = resumes.args(
      tmp_path, cache_dir, '--config.train.eval_every_steps=2', '--config.train.early_stopping_patience=2',
      '--config.train.best_metric=eval_loss', '--config.train.best_mode=min', '--config.train.keep_best=1',
      '--config.optim.learning_rate=0.05', '--config.train.export_checkpoint=best')
  proc = cli.run_cli('jtune.train', *args)
  evals = [r for r in cli.read_jsonl(tmp_path / 'metrics.jsonl') if 'eval_loss' in r]
  losses = [r['eval_loss'] for r in evals]
  best = int(np.argmin(losses))
  assert 'Stopped: early stopping' in proc.stderr
  assert evals[-1]['step'] < 16 and len(evals) == best + 3  # two evaluations without a better loss
  kept = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert evals[best]['step'] in kept and evals[-1]['step'] in kept
  assert f'Exporting the best checkpoint: step {evals[best]["step"]}' in proc.stderr
  from jtune import export  # pylint: disable=g-import-not-at-top
  _, _, _, params = export.restore_run(str(tmp_path), step=evals[best]['step'])
  exported = load_file(tmp_path / 'export' / 'model.safetensors')
  np.testing.assert_array_equal(exported['classifier.weight'], np.asarray(params['classifier']['kernel']).T)
  # The same command again (a retried job): still stopped, nothing trained, the same export.
  again = cli.run_cli('jtune.train', *args)
  assert f'Stopped: early stopping at step {evals[-1]["step"]}' in again.stderr, again.stderr[-2000:]
  assert cli.read_jsonl(tmp_path / 'metrics.jsonl')[-1]['step'] == evals[-1]['step']
  assert load_file(tmp_path / 'export' / 'model.safetensors').keys() == exported.keys()
  for key, value in load_file(tmp_path / 'export' / 'model.safetensors').items():
    np.testing.assert_array_equal(value, exported[key], err_msg=key)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, cache_dir):
  proc = cli.run_cli('jtune.train', *resumes.args(
      tmp_path, cache_dir, '--config.optim.learning_rate=1e30', '--config.optim.grad_clip_norm=0',
      '--config.train.max_nonfinite_steps=3'), check=False)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('jtune: error: step ') and 'NaN or Inf loss or gradients' in last, proc.stderr[-2000:]
  records = [r for r in cli.read_jsonl(tmp_path / 'metrics.jsonl') if 'loss' in r]
  assert records[-1]['skipped_steps'] >= 3 and records[-1]['nonfinite_in_a_row'] >= 3
  from jtune import export  # pylint: disable=g-import-not-at-top
  checkpoints = tmp_path / 'checkpoints'
  if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
    _, _, _, params = export.restore_run(str(tmp_path))
    import jax  # pylint: disable=g-import-not-at-top
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))

