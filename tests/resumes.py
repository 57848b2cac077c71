"""Interrupted runs of the tiny config and what the resilience tests check of them: the steps a run logged,
waiting for a step, killing its processes, and comparing a resumed run with an uninterrupted one."""

import os
import random
import signal
import time

import numpy as np
from safetensors.numpy import load_file

from tests import cli

# 16 steps of the tiny config; a checkpoint every 2 steps, an evaluation every 8; the last step's weights are
# exported (these tests compare final weights: which evaluation came out best is not what they are about).
ARGS = [*cli.TINY, '--config.train.log_every_steps=1', '--config.train.checkpoint_every_steps=2',
        '--config.train.eval_every_steps=8', '--config.train.keep_checkpoints=2',
        '--config.train.export_checkpoint=last']


def args(workdir, cache_dir, *extra):
  return [*ARGS, f'--workdir={workdir}', f'--config.cache_dir={cache_dir}', *extra]


def train_steps(workdir) -> list[int]:
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  return [r['step'] for r in cli.read_jsonl(path) if 'loss' in r]


def wait_for_step(workdir, procs, step: int, timeout: float = 300) -> None:
  deadline = time.monotonic() + timeout
  while not train_steps(workdir) or max(train_steps(workdir)) < step:
    assert time.monotonic() < deadline, f'no step {step} within {timeout} s'
    assert all(p.poll() is None for p in procs), 'the run ended before it could be killed'
    time.sleep(0.05)


def kill(procs, sig=signal.SIGKILL) -> None:
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


def check_sigkill_then_rerun(processes: int, reference, tmp_path, cache_dir) -> None:
  """Killed at a random step, then run again: the run ends bit for bit like `reference`."""
  kill_after = random.Random(os.getpid()).randint(3, 13)
  procs = cli.launch(args(tmp_path, cache_dir), processes)
  wait_for_step(tmp_path, procs, kill_after)
  kill(procs)
  assert max(train_steps(tmp_path)) < 16, 'killed too late to test anything'
  saved = [p.name for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()]
  errs = cli.wait(cli.launch(args(tmp_path, cache_dir), processes))
  if saved:  # else the kill came before the first save was complete: the rerun starts over
    assert f'Resuming from {tmp_path / "checkpoints" / str(max(map(int, saved)))}' in errs[0]
  assert_same_run(tmp_path, reference)


def check_sigterm_saves_and_exits_zero(processes: int, reference, tmp_path, cache_dir) -> None:
  """SIGTERM to one host: every process saves the same step and exits 0; the rerun ends like `reference`."""
  procs = cli.launch(args(tmp_path, cache_dir), processes)
  wait_for_step(tmp_path, procs, 3)
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
  cli.wait(cli.launch(args(tmp_path, cache_dir), processes))
  assert_same_run(tmp_path, reference)
