"""A causal LM's train and eval steps with its LM head and loss whole and in slices of the positions
(`model.lm_head_chunks`, jtune/tasks/common.py: chunked_cross_entropy_sum), on raw text (every token a target):
XLA's memory analysis of each compiled step and their times, the variants alternated in one process.

  python -m benchmarks.lm_head_chunks --model=llama-135m --batch=8 --seq=512 --chunks=1,4,16 --remat=full

Prints, per variant, the first step's loss (the same model and batch: the same loss), the temporaries XLA plans for
the train and the eval step (the [B, L, V] float32 logits are 768 MiB at 8 x 512 on SmolLM2's vocabulary), and
the median step times.
"""

from __future__ import annotations

import dataclasses

from absl import app, flags

from benchmarks import workloads
from jtune import host_memory, sharding

_MODEL = flags.DEFINE_enum('model', 'llama-135m', ['gpt2', 'llama-135m'], 'Decoder shape.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Batch size.')
_SEQ = flags.DEFINE_integer('seq', 512, 'Sequence length.')
_CHUNKS = flags.DEFINE_list('chunks', ['1', '4', '16'], 'model.lm_head_chunks of each variant.')
_ROUNDS = flags.DEFINE_integer('rounds', 4, 'Timed steps of each variant.')
_REMAT = flags.DEFINE_enum('remat', 'none', ['none', 'full', 'dots'], "model.remat: 'full' keeps only each "
                           "layer's input for the backward pass, which leaves the head's logits the largest part")

MIB = 1 << 20


def main(argv):
  del argv
  host_memory.keep_freed_memory()  # as jtune.train does, before the first jax call starts the backend
  shape = workloads.SHAPES[_MODEL.value]
  model, task, inputs = workloads.jtune_model(shape, 'float32')
  batch = workloads.batch_arrays(shape, _BATCH.value, _SEQ.value)
  timers = {}
  for chunks in map(int, _CHUNKS.value):
    cfg = dataclasses.replace(model.cfg, lm_head_chunks=chunks, remat=_REMAT.value)
    parts = workloads.model_parts(model.clone(cfg=cfg), task, inputs, _SEQ.value)
    arrays = sharding.global_batch(batch, parts.mesh)
    with sharding.activate(parts.mesh, parts.rules):
      train = parts.train_fn.lower(parts.state, arrays).compile()
      evaluate = parts.eval_fn.lower(parts.state.params, arrays).compile()
    temps = [step.memory_analysis().temp_size_in_bytes / MIB for step in (train, evaluate)]
    state, metrics = train(parts.state, arrays)  # the first step: its loss, and warm-up
    name = f'lm_head_chunks={chunks}'
    timers[name] = workloads.jtune_timers(workloads.JtuneSteps(train, evaluate, state, arrays, 0.0, {}))
    print(f'{name}: first loss {float(metrics["loss"]):.4f}; temporaries: train step {temps[0]:.0f} MiB, '
          f'eval step {temps[1]:.0f} MiB', flush=True)
  for _, eval_timer in timers.values():
    eval_timer()  # warm-up
  workloads.alternate(timers, _ROUNDS.value)


if __name__ == '__main__':
  app.run(main)
