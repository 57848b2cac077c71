"""Instruction tuning's train and eval steps with the LM head at every position against the head at the target
positions only (`target_positions`, jtune/data/batching.py), alternated in one process; `--torch` also times
transformers' causal LM of the shape with torch.optim.AdamW on a batch of the same size (its head at every
position, as it computes it whatever its labels).

  python -m benchmarks.lm_head_ab --model=llama-135m --rounds=6 --torch

The batch is `--batch` rows of `--seq` random tokens packed as configs/causal_lm.py packs its data: `--examples`
examples per row, each ending in an answer of `--answer` tokens (the response and EOS) that alone has targets.
Prints each variant's loss after its first step (the same model and targets: the same loss) and the median train
and eval step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import app, flags

from benchmarks import workloads
from jtune import host_memory
from jtune import state as state_lib
from jtune.data import batching
from jtune.data.features import IGNORE, Features, lengths_of, ragged

_MODEL = flags.DEFINE_enum('model', 'llama-135m', ['gpt2', 'llama-135m'], 'Decoder shape.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Batch size.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Sequence length.')
_EXAMPLES = flags.DEFINE_integer('examples', 4, 'Packed examples per row.')
_ANSWER = flags.DEFINE_integer('answer', 2, 'Tokens with a target at the end of each example.')
_ROUNDS = flags.DEFINE_integer('rounds', 6, 'Timed steps of each variant.')
_TORCH = flags.DEFINE_bool('torch', False, "Also time transformers' model of the shape (the test extra's torch).")


def split(vocab: int, b: int, seq: int, examples: int, answer: int) -> Features:
  """`b` packed rows of `seq` tokens: `examples` segments each, the last `answer` tokens of each with targets."""
  rng = np.random.default_rng(0)
  size = seq // examples
  within = np.arange(seq) % size
  segments = np.minimum(np.arange(seq) // size, examples - 1) + 1
  ids = rng.integers(1, vocab, (b, seq))
  targets = np.where(within >= size - answer, np.roll(ids, -1, axis=1), IGNORE)
  tokens = {'input_ids': ragged(ids), 'targets': ragged(targets), 'positions': ragged([within] * b),
            'segment_ids': ragged([segments] * b)}
  return Features(tokens=tokens, rows={}, lengths=lengths_of(tokens['input_ids']), compact_targets=True)


def main(argv):
  del argv
  host_memory.keep_freed_memory()  # as jtune.train does, before the first jax call starts the backend
  shape = workloads.SHAPES[_MODEL.value]
  packed = split(shape.vocab, _BATCH.value, _SEQ.value, _EXAMPLES.value, _ANSWER.value)
  rows = np.arange(_BATCH.value)
  model, task, inputs = workloads.jtune_model(shape, np.float32)
  variants = {
      'every position': (batching.make_batch(dataclasses.replace(packed, compact_targets=False), rows, _SEQ.value, 0),
                         inputs),
      'target_positions (jtune)': (batching.make_batch(packed, rows, _SEQ.value, 0),
                                   inputs + state_lib.HEAD_INPUTS['causal_lm'])}
  timers = {}
  for name, (batch, columns) in variants.items():
    *timers[name], loss = workloads.batch_timers(model, task, columns, batch, _SEQ.value)
    print(f'{name}: {batch["targets"].shape[1]} positions, first loss {loss:.4f}', flush=True)
  if _TORCH.value:
    timers[f'transformers ({_MODEL.value})'] = workloads.torch_timers(shape, _BATCH.value, _SEQ.value)
  for timer in (t for pair in timers.values() for t in pair):
    timer()  # warm-up
  workloads.alternate(timers, _ROUNDS.value)


if __name__ == '__main__':
  app.run(main)
