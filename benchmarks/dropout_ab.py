"""flax's nn.Dropout against jtune's 8-bit layers.Dropout: one mask alone, then the whole train step, alternated.

  python -m benchmarks.dropout_ab --model=minilm --batch=16 --seq=128 --rounds=6

The train step is built twice in one process (the model's Dropout swapped for flax's in one of them), then the
two take turns, `--rounds` steps each, so the machine's drift falls on both alike. Prints the median step of each
and the time of one [batch, heads, seq, seq] attention-probability mask.
"""

from __future__ import annotations

import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import workloads
from jtune.models import bert, decoder, layers

_MODEL = flags.DEFINE_enum('model', 'minilm', list(workloads.SHAPES), 'Model shape.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch size.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Sequence length.')
_ROUNDS = flags.DEFINE_integer('rounds', 6, 'Timed steps of each variant.')
VARIANTS = {'flax nn.Dropout': nn.Dropout, 'jtune layers.Dropout': layers.Dropout}


def mask_ms(cls, shape: tuple[int, ...], repeats: int = 7) -> float:
  """Median milliseconds of one rate-0.1 dropout of an f32 array of `shape`."""
  x = jnp.ones(shape, jnp.float32)
  run = jax.jit(lambda key, v: cls(0.1).apply({}, v, deterministic=False, rngs={'dropout': key}))
  key = jax.random.key(0)
  once = lambda: jax.block_until_ready(run(key, x))  # noqa: E731
  once()
  return 1e3 * statistics.median(workloads.step_times(once, repeats))


def main(argv):
  del argv
  shape = workloads.SHAPES[_MODEL.value]
  probs = (_BATCH.value, shape.heads, _SEQ.value, _SEQ.value)
  steps = {}
  for name, cls in VARIANTS.items():
    print(f'{name}: one {list(probs)} mask {mask_ms(cls, probs):.1f} ms', flush=True)
    bert.Dropout = decoder.Dropout = cls
    built = workloads.jtune_steps(shape, _BATCH.value, _SEQ.value)
    train, _ = workloads.jtune_timers(built)
    train()
    steps[name] = train
  bert.Dropout = decoder.Dropout = layers.Dropout
  times = {name: [] for name in steps}
  for _ in range(_ROUNDS.value):
    for name, train in steps.items():
      times[name] += workloads.step_times(train, 1)
  for name, ts in times.items():
    print(f'{name}: train step median {statistics.median(ts):.3f} s ({", ".join(f"{t:.3f}" for t in ts)})')


if __name__ == '__main__':
  app.run(main)
