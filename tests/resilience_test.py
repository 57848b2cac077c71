"""Surviving kills, preemption and crashes mid-save: every resumed run ends bit for bit like an uninterrupted one."""

import os
import random
import signal
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests import cli

# 16 steps of the tiny config; a checkpoint every 2 steps, an evaluation every 8; the last step's weights are
# exported (these tests compare final weights: which evaluation came out best is not what they are about).
ARGS = [*cli.TINY, '--config.train.log_every_steps=1', '--config.train.checkpoint_every_steps=2',
        '--config.train.eval_every_steps=8', '--config.train.keep_checkpoints=2',
        '--config.train.export_checkpoint=last']


def _args(workdir, cache_dir, *extra):
  return [*ARGS, f'--workdir={workdir}', f'--config.cache_dir={cache_dir}', *extra]


def _train_steps(workdir) -> list[int]:
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  return [r['step'] for r in cli.read_jsonl(path) if 'loss' in r]


def _wait_for_step(workdir, procs, step: int, timeout: float = 300) -> None:
  deadline = time.monotonic() + timeout
  while not _train_steps(workdir) or max(_train_steps(workdir)) < step:
    assert time.monotonic() < deadline, f'no step {step} within {timeout} s'
    assert all(p.poll() is None for p in procs), 'the run ended before it could be killed'
    time.sleep(0.05)


def _kill(procs, sig=signal.SIGKILL) -> None:
  for proc in procs:
    proc.send_signal(sig)
  for proc in procs:
    proc.communicate(timeout=120)


def assert_same_run(ours, ref) -> None:
  """Same metrics (all but throughput) and the same exported weights, bit for bit."""
  a, b = cli.read_jsonl(ours / 'metrics.jsonl'), cli.read_jsonl(ref / 'metrics.jsonl')
  assert [r['step'] for r in a] == [r['step'] for r in b]
  for ra, rb in zip(a, b):
    assert {k: v for k, v in ra.items() if k != 'examples_per_sec'} == {
        k: v for k, v in rb.items() if k != 'examples_per_sec'}, ra['step']
  wa, wb = load_file(ours / 'export' / 'model.safetensors'), load_file(ref / 'export' / 'model.safetensors')
  assert wa.keys() == wb.keys()
  for key in wa:
    np.testing.assert_array_equal(wa[key], wb[key], err_msg=key)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache_dir):
  """The uninterrupted runs: 1 process x 8 devices and 2 processes x 4 devices."""
  one, two = tmp_path_factory.mktemp('ref1'), tmp_path_factory.mktemp('ref2')
  cli.wait(cli.launch(_args(one, cache_dir)))
  cli.wait(cli.launch(_args(two, cache_dir), processes=2))
  return {1: one, 2: two}


@pytest.mark.parametrize('processes', [1, 2])
def test_sigkill_at_a_random_step_then_rerun_is_bit_exact(processes, reference, tmp_path, cache_dir):
  kill_after = random.Random(os.getpid()).randint(3, 13)
  procs = cli.launch(_args(tmp_path, cache_dir), processes)
  _wait_for_step(tmp_path, procs, kill_after)
  _kill(procs)
  assert max(_train_steps(tmp_path)) < 16, 'killed too late to test anything'
  saved = [p.name for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()]
  errs = cli.wait(cli.launch(_args(tmp_path, cache_dir), processes))
  if saved:  # else the kill came before the first save was complete: the rerun starts over
    assert f'Resuming from {tmp_path / "checkpoints" / str(max(map(int, saved)))}' in errs[0]
  assert_same_run(tmp_path, reference[processes])


@pytest.mark.parametrize('processes', [1, 2])
def test_sigterm_saves_and_exits_zero(processes, reference, tmp_path, cache_dir):
  procs = cli.launch(_args(tmp_path, cache_dir), processes)
  _wait_for_step(tmp_path, procs, 3)
  procs[-1].send_signal(signal.SIGTERM)  # one host is preempted; in a pod every host gets its notice
  start = time.monotonic()
  errs = cli.wait(procs, timeout=120)
  assert time.monotonic() - start < 60
  assert 'Stopped: SIGTERM: saved step' in errs[0], errs[0][-2000:]
  saved = int(errs[0].split('SIGTERM: saved step ')[1].split(';')[0])
  assert saved < 16 and str(saved) in [p.name for p in (tmp_path / 'checkpoints').iterdir()]
  if processes == 2:
    assert f'SIGTERM: saved step {saved};' in errs[1]  # both processes agreed on the step
  assert not (tmp_path / 'export').exists()
  cli.wait(cli.launch(_args(tmp_path, cache_dir), processes))
  assert_same_run(tmp_path, reference[processes])


def test_kill_during_a_save_keeps_the_previous_checkpoint(reference, tmp_path, cache_dir):
  """Saves every step, killed the moment a temporary checkpoint folder appears."""
  args = _args(tmp_path, cache_dir, '--config.train.checkpoint_every_steps=1')
  checkpoints = tmp_path / 'checkpoints'
  for _ in range(5):
    procs = cli.launch(args)
    deadline = time.monotonic() + 300
    tmp = []
    while not tmp and procs[0].poll() is None and time.monotonic() < deadline:
      tmp = [p.name for p in checkpoints.iterdir() if 'tmp' in p.name] if checkpoints.exists() else []
    _kill(procs)
    if tmp and any('tmp' in p.name for p in checkpoints.iterdir()):
      break
  else:
    pytest.fail('never caught a save in progress')
  complete = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  errs = cli.wait(cli.launch(args))
  if complete:
    assert f'Resuming from {checkpoints / str(complete[-1])}' in errs[0]
  assert not any('tmp' in p.name for p in checkpoints.iterdir())  # cleaned up
  assert_same_run(tmp_path, reference[1])


def test_restore_on_another_mesh_and_on_one_device(reference, tmp_path, cache_dir):
  """A checkpoint written by the 2-process run (data=8 over 2 x 4 devices) resumes on fsdp=8 and on 1 device."""
  import shutil  # pylint: disable=g-import-not-at-top
  ref = reference[1]
  source = min(int(p.name) for p in (reference[2] / 'checkpoints').iterdir() if p.name.isdigit())
  assert source < 16
  for name, devices, mesh in [('fsdp8', 8, ['--config.mesh.data=1', '--config.mesh.fsdp=8']),
                              ('one', 1, [])]:
    workdir = tmp_path / name
    (workdir / 'checkpoints').mkdir(parents=True)
    shutil.copytree(reference[2] / 'checkpoints' / str(source), workdir / 'checkpoints' / str(source))
    proc = cli.run_cli('jtune.train', *_args(workdir, cache_dir, *mesh), devices=devices)
    assert 'Resuming from' in proc.stderr
    ours, theirs = load_file(workdir / 'export' / 'model.safetensors'), load_file(ref / 'export' / 'model.safetensors')
    for key in ours:
      np.testing.assert_allclose(ours[key], theirs[key], atol=1e-5, err_msg=key)


def test_init_from_warm_starts_weights_without_optimizer_state(reference, tmp_path, cache_dir):
  """init_from loads another run's weights; with a zero learning rate they come out unchanged."""
  proc = cli.run_cli('jtune.train', *_args(tmp_path, cache_dir, f'--config.train.init_from={reference[1]}',
                                           '--config.optim.learning_rate=1e-30', '--config.train.num_steps=2',
                                           '--config.optim.weight_decay=0.0'))
  assert f'Warm start from the weights of {reference[1]}' in proc.stderr
  ours = load_file(tmp_path / 'export' / 'model.safetensors')
  theirs = load_file(reference[1] / 'export' / 'model.safetensors')
  for key in ours:
    np.testing.assert_allclose(ours[key], theirs[key], atol=1e-6, err_msg=key)
  records = [r for r in cli.read_jsonl(tmp_path / 'metrics.jsonl') if 'loss' in r]
  assert records[0]['step'] == 1  # a new run: step and optimizer start from zero


def test_keep_best_early_stopping_and_export_of_the_best(tmp_path, cache_dir):
  # A learning rate too high: the evaluation loss soon stops improving.
  proc = cli.run_cli('jtune.train', *_args(
      tmp_path, cache_dir, '--config.train.eval_every_steps=2', '--config.train.early_stopping_patience=2',
      '--config.train.best_metric=eval_loss', '--config.train.best_mode=min', '--config.train.keep_best=1',
      '--config.optim.learning_rate=0.05', '--config.train.export_checkpoint=best'))
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


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, cache_dir):
  proc = cli.run_cli('jtune.train', *_args(tmp_path, cache_dir, '--config.optim.learning_rate=1e30',
                                           '--config.optim.grad_clip_norm=0', '--config.train.max_nonfinite_steps=3'),
                     check=False)
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
