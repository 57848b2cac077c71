"""What differentiating only the trainable parameters saves a LoRA or frozen-backbone train step, alternated.

  python -m benchmarks.trainable_ab --method=lora --model=minilm --rounds=8
  python -m benchmarks.trainable_ab --method=frozen --model=bert-base --rounds=4

Both steps share one optimizer, which updates the adapters (`lora`: rank 8 on query and value) or the head only
(`frozen`) and leaves the rest as it is (config.optim.trainable, as the lora and frozen config variants set it).
`whole gradient` takes the loss's gradient with respect to every parameter, as jtune's step did before
`step._trainable_part`; `trainable gradient` with respect to the trainable ones only, as it does now. Prints each
step's XLA FLOP count, and the median train step of the two built in one process and taken in turns (`--rounds`
each), with their losses, which should agree.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import workloads
from configs import common
from jtune import config as config_lib
from jtune import host_memory, optim, sharding
from jtune import state as state_lib
from jtune import step as step_lib
from jtune.models import bert

_METHOD = flags.DEFINE_enum('method', 'lora', ['lora', 'frozen'], 'What trains: adapters and head, or the head.')
_MODEL = flags.DEFINE_enum('model', 'minilm', ['minilm', 'bert-base'], 'Encoder shape.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch size.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Sequence length.')
_ROUNDS = flags.DEFINE_integer('rounds', 6, 'Timed steps of each variant.')


def main(argv):
  del argv
  host_memory.keep_freed_memory()  # as jtune.train does, before the first jax call starts the backend
  shape, lora = workloads.SHAPES[_MODEL.value], _METHOD.value == 'lora'
  trainable = (('/lora_[ab]$',) if lora else ()) + common.HEAD_PATTERNS
  model, task, inputs = workloads.jtune_model(shape, jnp.float32)
  if lora:
    model = bert.build(dataclasses.replace(model.cfg, lora_rank=8, lora_alpha=16.0, lora_dropout=0.05))
  cfg = dataclasses.replace(workloads.OPTIM, trainable=trainable)
  lr = optim.schedule(cfg, 1000)
  tx = optim.optimizer(cfg, lr)
  rules = config_lib.parse_rules(common.RULES)
  mesh = sharding.make_mesh(config_lib.MeshConfig(-1, 1, 1, rules=rules))
  state, shardings = state_lib.init(model, tx, mesh, rules, seed=0, seq_len=_SEQ.value, inputs=inputs)
  batch = sharding.global_batch(workloads.batch_arrays(shape, _BATCH.value, _SEQ.value), mesh)
  steps, states, losses = {}, {}, {}
  with sharding.activate(mesh, rules):
    for name, differentiated in (('whole gradient', ('.*',)), ('trainable gradient', trainable)):
      train, _ = step_lib.compile_steps(model, tx, lr, mesh, shardings, task=task, inputs=inputs,
                                        trainable=differentiated)
      steps[name] = train.lower(state, batch).compile()
      print(f'{name}: {steps[name].cost_analysis()["flops"] / 1e9:.1f} GFLOP per step (XLA)', flush=True)
      states[name] = jax.tree_util.tree_map(jnp.copy, state)  # each step donates its own copy

    def once(name):
      states[name], metrics = steps[name](states[name], batch)
      losses[name] = float(metrics['loss'])
    for name in steps:
      once(name)  # warm-up, untimed
    times = {name: [] for name in steps}
    for round_ in range(_ROUNDS.value):
      for name in steps if round_ % 2 == 0 else reversed(steps):
        times[name] += workloads.step_times(functools.partial(once, name), 1)
  for name, ts in times.items():
    print(f'{name}: train step median {statistics.median(ts):.3f} s ({min(ts):.3f}-{max(ts):.3f}), '
          f'last loss {losses[name]:.6f}')


if __name__ == '__main__':
  app.run(main)
