"""What checkpointing costs the step loop: asynchronous (Orbax's background writes) against blocking saves.

  python -m benchmarks.checkpointing                       # MiniLM-L6 shapes, a save every 5 steps
  python -m benchmarks.checkpointing --every=2 --steps=20 --models=bert-base

The same jitted train step as jtune.train (random weights of the given shape, one CPU device unless XLA_FLAGS
says otherwise), timed over `--steps` steps three ways: without saving, saving every `--every` steps with
`async_checkpoints=True`, and with it False. The figure is the mean wall time per step including the saves (the
async run waits for its last save at the end, so no write is left uncounted).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time

import jax
from absl import app, flags, logging

from benchmarks import workloads
from jtune import checkpoint

_MODELS = flags.DEFINE_list('models', ['minilm'], f'From {", ".join(workloads.SHAPES)}.')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Global batch size.')
_SEQ = flags.DEFINE_integer('seq_len', 128, 'Sequence length.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps.')
_EVERY = flags.DEFINE_integer('every', 5, 'Save a checkpoint every this many steps.')


def _time(shape: workloads.Shape, steps: int, every: int, mode: str) -> float:
  """Mean wall time per step over `steps` steps, saving every `every` steps (mode: none, async or sync)."""
  built = workloads.jtune_steps(shape, _BATCH.value, _SEQ.value)
  state, batch = built.state, built.batch
  folder = tempfile.mkdtemp()
  saver = None if mode == 'none' else checkpoint.Checkpointer(folder, keep=2, async_save=mode == 'async')
  state, metrics = built.train(state, batch)  # warm up outside the timing
  jax.block_until_ready(metrics['loss'])
  start = time.perf_counter()
  for i in range(1, steps + 1):
    state, metrics = built.train(state, batch)
    if saver is not None and i % every == 0:
      saver.save(i, state, {'iterator': {'epoch': 0, 'index': i}})
  jax.block_until_ready(metrics['loss'])
  if saver is not None:
    saver.close()
  elapsed = time.perf_counter() - start
  shutil.rmtree(folder, ignore_errors=True)
  return elapsed / steps


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  for name in _MODELS.value:
    row = {'model': name, 'steps': _STEPS.value, 'every': _EVERY.value}
    for mode in ('none', 'async', 'sync'):
      row[f'{mode}_step_s'] = round(_time(workloads.SHAPES[name], _STEPS.value, _EVERY.value, mode), 3)
    row['async_overhead'] = round(row['async_step_s'] / row['none_step_s'] - 1, 3)
    row['sync_overhead'] = round(row['sync_step_s'] / row['none_step_s'] - 1, 3)
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  app.run(main)
