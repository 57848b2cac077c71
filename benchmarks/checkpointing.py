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

from benchmarks import train_step
from configs import common
from jtune import checkpoint, optim, sharding
from jtune import config as config_lib
from jtune import state as state_lib
from jtune import step as step_lib
from jtune.models import bert

_EVERY = flags.DEFINE_integer('every', 5, 'Save a checkpoint every this many steps.')


def _time(model, tx, lr, mesh, rules, batch, steps: int, every: int, mode: str) -> float:
  state, shardings = state_lib.init(model, tx, mesh, rules, seed=0, seq_len=batch['input_ids'].shape[1])
  train_fn, _ = step_lib.compile_steps(model, tx, lr, mesh, shardings)
  folder = tempfile.mkdtemp()
  saver = None if mode == 'none' else checkpoint.Checkpointer(folder, keep=2, async_save=mode == 'async')
  with sharding.activate(mesh, rules):
    state, metrics = train_fn(state, batch)  # compile outside the timing
    jax.block_until_ready(metrics['loss'])
    start = time.perf_counter()
    for i in range(1, steps + 1):
      state, metrics = train_fn(state, batch)
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
  rules = config_lib.parse_rules(common.RULES)
  mesh = sharding.make_mesh(config_lib.MeshConfig(-1, 1, 1, rules=rules))
  for name in train_step._MODELS.value:  # pylint: disable=protected-access
    layers, hidden, heads, inter = train_step.SHAPES[name]
    cfg = bert.BertConfig(vocab_size=30522, hidden_size=hidden, num_layers=layers, num_heads=heads,
                          intermediate_size=inter, max_position_embeddings=512, type_vocab_size=2,
                          layer_norm_eps=1e-12, initializer_range=0.02, hidden_dropout=0.1,
                          attention_dropout=0.1, classifier_dropout=0.1, num_labels=2)
    model = bert.BertForSequenceClassification(cfg)
    lr = optim.schedule(train_step.OPTIM, 1000)
    tx = optim.optimizer(train_step.OPTIM, lr)
    batch_np = train_step._batch(train_step._BATCH.value, train_step._SEQ.value, 30522)  # pylint: disable=protected-access
    batch = sharding.global_batch(batch_np, mesh)
    row = {'model': name, 'steps': train_step._STEPS.value, 'every': _EVERY.value}  # pylint: disable=protected-access
    for mode in ('none', 'async', 'sync'):
      row[f'{mode}_step_s'] = round(_time(model, tx, lr, mesh, rules, batch, train_step._STEPS.value,  # pylint: disable=protected-access
                                          _EVERY.value, mode), 3)
    row['async_overhead'] = round(row['async_step_s'] / row['none_step_s'] - 1, 3)
    row['sync_overhead'] = round(row['sync_step_s'] / row['none_step_s'] - 1, 3)
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  app.run(main)
