"""Ahead-of-time fit check: compile the train step for a config's mesh and report per-device memory.

Nothing is allocated: the state is abstract (`jax.eval_shape`) and the batch is a ShapeDtypeStruct of the
longest bucket, so a laptop with `XLA_FLAGS=--xla_force_host_platform_device_count=N` can check the sharding and
the per-device bytes of a mesh of N devices before paying for them.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from jtune import config as config_lib
from jtune import optim
from jtune import sharding as sharding_lib
from jtune import state as state_lib
from jtune import step as step_lib
from jtune import trainer
from jtune.data import batching
from jtune.data.features import Features


def abstract_batch(features: Features, batch_size: int, length: int, pad_id: int, mesh: jax.sharding.Mesh,
                   target_length: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes and shardings of one batch of the task's training data padded to `length` (a seq2seq
  split's targets to `target_length`)."""
  sharding = sharding_lib.batch_sharding(mesh)
  rows = np.arange(batch_size) % len(features)
  batch = batching.make_batch(features, rows, length, pad_id, target_length=target_length,
                              predictions=length)  # the most positions a causal LM's head can run at
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in batch.items()}


def compile_report(cfg: config_lib.Config) -> dict[str, int | str]:
  """Lowers and compiles the train step on the config's mesh; returns sizes in bytes per device."""
  mesh = sharding_lib.make_mesh(cfg.mesh)
  sharding_lib.check_batch_size(cfg.train.batch_size, mesh, 'train.batch_size')
  task, model, _, train_data, _ = trainer.prepare(cfg)
  lr = optim.schedule(cfg.optim, max(cfg.train.num_steps, 1))
  tx = optim.optimizer(cfg.optim, lr)
  abstract, shardings = state_lib.shapes(model.module, tx, mesh, cfg.mesh.rules, cfg.data.max_length,
                                         model.inputs)
  train_fn, _ = step_lib.compile_steps(model.module, tx, lr, mesh, shardings, cfg.train.accumulation_steps,
                                       cfg.train.label_smoothing, task, cfg.task, model.inputs,
                                       robust_cfg=cfg.train, dropout_rng=cfg.train.dropout_rng,
                                       trainable=cfg.optim.trainable)
  batch = abstract_batch(train_data, cfg.train.batch_size, cfg.data.max_length, model.pad_id, mesh,
                         max(cfg.data.target_buckets, default=0))
  with sharding_lib.activate(mesh, cfg.mesh.rules):
    compiled = train_fn.lower(abstract, batch).compile()
  memory = compiled.memory_analysis()
  state_bytes = sum(math.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize
                    for s in jax.tree_util.tree_leaves(abstract))
  report = {
      'mesh': ' x '.join(f'{k}={v}' for k, v in mesh.shape.items()),
      'parameters': state_lib.num_params(abstract.params),
      'state_bytes': state_bytes,
      'argument_bytes': memory.argument_size_in_bytes,
      'output_bytes': memory.output_size_in_bytes,
      'alias_bytes': memory.alias_size_in_bytes,
      'temp_bytes': memory.temp_size_in_bytes,
  }
  # Donated state buffers are reused for the outputs (alias), so they count once.
  report['peak_bytes'] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  return report


def format_report(report: dict[str, int | str]) -> str:
  lines = [f'mesh {report["mesh"]}: {report["parameters"]:,} parameters']
  for key in ('state_bytes', 'argument_bytes', 'output_bytes', 'alias_bytes', 'temp_bytes', 'peak_bytes'):
    lines.append(f'  {key:<15} {report[key] / 2**20:10.1f} MiB per device ({report[key]:,} bytes)')
  return '\n'.join(lines)
