"""What the input pipeline costs the training loop: real data against one synthetic batch, same step, same run.

  python -m benchmarks.input_pipeline                       # all-MiniLM-L6-v2 on the polarity corpus, 16 x 128
  python -m benchmarks.input_pipeline --steps=40 --config=configs/bert_cls.py:topics

`jtune.train`'s setup builds the run (tokenized corpus, bucketed batches, sharded state, jitted step). Then the
loop of `jtune.trainer` (next batch, `global_batch`, train step, metrics fetched one step late) runs `--steps`
steps on the real batches and `--steps` steps on one pre-built batch of the same shape placed on the devices
once, alternating `--repeats` times. The cost of the pipeline is the difference of the mean step times; the
host time of `next(iterator)` + `global_batch` alone is reported too.
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from jtune import config as config_lib
from jtune import sharding as sharding_lib
from jtune import trainer

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/bert_cls.py', 'A jtune config file.',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 20, 'Steps per timed run.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Alternating real / synthetic runs.')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Global batch size.')
_LENGTH = flags.DEFINE_integer('max_length', 128, 'Sequence length: one bucket, so both runs have one shape.')


def _loop(run: trainer.Run, state, batches, steps: int):
  """The trainer's hot loop: dispatch step n, then fetch step n - 1's metrics."""
  pending = None
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = run.train_fn(state, next(batches))
    if pending is not None:
      jax.device_get(pending)
    pending = metrics
  jax.device_get(pending)
  return state, (time.perf_counter() - start) / steps


def main(argv):
  del argv
  c = _CONFIG.value
  c.train.batch_size = _BATCH.value
  c.data.max_length = _LENGTH.value
  c.data.buckets = (_LENGTH.value,)
  cfg = config_lib.from_config_dict(c)
  with tempfile.TemporaryDirectory() as workdir:
    run = trainer.setup(cfg, workdir)
    real = (sharding_lib.global_batch(next(run.train_iter), run.mesh) for _ in itertools.count())
    fixed = sharding_lib.global_batch(next(run.train_iter), run.mesh)
    synthetic = itertools.repeat(fixed)
    with sharding_lib.activate(run.mesh, cfg.mesh.rules):
      state, _ = _loop(run, run.state, synthetic, 3)  # compile and warm up
      times = {'real': [], 'synthetic': []}
      for _ in range(_REPEATS.value):
        for name, batches in (('real', real), ('synthetic', synthetic)):
          state, per_step = _loop(run, state, batches, _STEPS.value)
          times[name].append(per_step)
    host = []
    for _ in range(_STEPS.value):
      start = time.perf_counter()
      jax.block_until_ready(sharding_lib.global_batch(next(run.train_iter), run.mesh))
      host.append(time.perf_counter() - start)
  real_s, synthetic_s = statistics.mean(times['real']), statistics.mean(times['synthetic'])
  print(json.dumps({
      'batch': _BATCH.value, 'seq': _LENGTH.value, 'devices': jax.device_count(),
      'real_step_s': real_s, 'synthetic_step_s': synthetic_s,
      'pipeline_overhead_pct': 100 * (real_s - synthetic_s) / synthetic_s,
      'host_batch_ms': 1000 * statistics.median(host), 'runs': times}))


if __name__ == '__main__':
  app.run(main)
