"""Where the train step's compile time goes: tracing, lowering and XLA, first with an empty persistent compilation
cache, then in later processes that find it (what a second run of the same config pays); then the same through
jtune's cache of compiled steps (jtune/executables.py, what `jtune.train` uses), which skips tracing and lowering.

  python -m benchmarks.compile_time --model=bert-base --rounds=4

Each measurement runs in a fresh process (JAX keeps traces and executables within one), all sharing one new
cache folder that keeps every entry however quick its compile was. Per phase: the first process's seconds, then the
median and range of the cached ones; 'xla' is the backend compile, or the cache load where the cache has the step.
The last row, 'jtune.executables', is the whole of `load_or_compile` in other processes with a cache folder of
their own: the first compiles (without JAX's cache) and writes the step, the later ones load it.
To compare two versions of jtune, run the command in a `git worktree` of each, alternately.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import workloads
from jtune import config as config_lib
from jtune import host_memory, sharding

_MODEL = flags.DEFINE_enum('model', 'bert-base', list(workloads.SHAPES), 'Model shape.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch size.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Sequence length.')
_ROUNDS = flags.DEFINE_integer('rounds', 4, 'Processes that find the cache.')
_SCAN = flags.DEFINE_bool('scan_layers', False, 'model.scan_layers.')
_RNG = flags.DEFINE_enum('dropout_rng', 'auto', list(config_lib.DROPOUT_RNGS), 'train.dropout_rng.')
_CHILD = flags.DEFINE_enum('child', '', ['', 'jax', 'executables'], 'Internal: measure once, in this process.')

PHASES = ('trace', 'lower', 'xla', 'total')


def _measure() -> dict[str, float]:
  """Seconds of each phase of the train step's compile, in this process; with --child=executables, the whole of
  it through jtune.executables (workloads.jtune_steps, as throughput.py times it)."""
  shape = workloads.SHAPES[_MODEL.value]
  if _CHILD.value == 'executables':
    steps = workloads.jtune_steps(shape, _BATCH.value, _SEQ.value, scan_layers=_SCAN.value, dropout_rng=_RNG.value,
                                  executables_dir=workloads.executables_dir())
    return {'total': steps.compile_s}
  host_memory.keep_freed_memory()  # as jtune.train does, before the first jax call starts the backend
  parts = workloads.jtune_parts(shape, _SEQ.value, jnp.float32, scan_layers=_SCAN.value, dropout_rng=_RNG.value)
  arrays = sharding.global_batch(workloads.batch_arrays(shape, _BATCH.value, _SEQ.value), parts.mesh)
  jax.block_until_ready((parts.state, arrays))  # the state's initialisation runs asynchronously: not in the clock
  with sharding.activate(parts.mesh, parts.rules):
    start = time.perf_counter()
    traced = parts.train_fn.trace(parts.state, arrays)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
  return {'trace': traced_at - start, 'lower': lowered_at - traced_at, 'xla': done - lowered_at,
          'total': done - start}


def _spawn(cache: str, mode: str = 'jax') -> dict[str, float]:
  cmd = [sys.executable, '-m', 'benchmarks.compile_time', f'--child={mode}', f'--model={_MODEL.value}',
         f'--batch={_BATCH.value}', f'--seq={_SEQ.value}', f'--scan_layers={str(_SCAN.value).lower()}',
         f'--dropout_rng={_RNG.value}']
  env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': cache, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
  del argv
  if _CHILD.value:
    print(json.dumps(_measure()), flush=True)
    return
  with tempfile.TemporaryDirectory() as cache:
    first = _spawn(cache)
    cached = [_spawn(cache) for _ in range(_ROUNDS.value)]
  with tempfile.TemporaryDirectory() as cache:
    first_exe = _spawn(cache, 'executables')
    cached_exe = [_spawn(cache, 'executables')['total'] for _ in range(_ROUNDS.value)]
  print(f'{_MODEL.value} train step, batch {_BATCH.value} x {_SEQ.value}, scan_layers={_SCAN.value}, '
        f'dropout_rng={_RNG.value}, seconds')
  print('| phase | first (empty cache) | cached: median (min-max) |\n|---|---|---|')
  for phase in PHASES:
    values = [c[phase] for c in cached]
    print(f'| {phase} | {first[phase]:.2f} | {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f}) |')
  print(f'| jtune.executables | {first_exe["total"]:.2f} | {statistics.median(cached_exe):.2f} '
        f'({min(cached_exe):.2f}-{max(cached_exe):.2f}) |')


if __name__ == '__main__':
  app.run(main)
