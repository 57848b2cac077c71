"""The masked-LM train and eval steps with the head at every position against the head at the masked positions
only (`mlm_positions`, jtune/data/masking.py), alternated in one process; `--torch` also times transformers'
BertForMaskedLM with torch.optim.AdamW on the same batch (its head at every position, as it computes it).

  python -m benchmarks.mlm_head_ab --model=bert-base --rounds=6 --torch
  python -m benchmarks.mlm_head_ab --model=bert-base --rounds=6 --whole_word

The batch is `--batch` rows of `--seq` random tokens with BERT's 15% masking; the model has BERT's vocabulary
(30,522) and the shape's layers. Prints each variant's loss after its first step (the same model and masks: the
same loss) and the median train and eval step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import app, flags

from benchmarks import workloads
from jtune import host_memory, tasks
from jtune import state as state_lib
from jtune.data import masking
from jtune.models import bert

_MODEL = flags.DEFINE_enum('model', 'bert-base', ['minilm', 'bert-base'], 'Encoder shape.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch size.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Sequence length.')
_ROUNDS = flags.DEFINE_integer('rounds', 6, 'Timed steps of each variant.')
_WHOLE_WORD = flags.DEFINE_bool('whole_word', False, 'Whole-word masking (every token a word here): the batch '
                                 'predicts at a power of two of positions that holds its row with the most masks.')
_TORCH = flags.DEFINE_bool('torch', False, "Also time transformers' BertForMaskedLM (the test extra's torch).")

VOCAB, MASK_ID = 30522, 103


def batches(b: int, seq: int, whole_word: bool = False) -> dict[str, dict[str, np.ndarray]]:
  """The same masked batch twice: [B, L] labels for the head at every position, and what jtune's batching makes."""
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, VOCAB, (b, seq)).astype(np.int32)
  units = np.full((b, seq), masking.WORD_START, np.int32)
  units[:, [0, -1]] = masking.SPECIAL  # [CLS] and [SEP]
  spec = masking.Masking(MASK_ID, VOCAB, whole_word=whole_word)
  corrupted, labels = masking.mask(ids, units, spec, rng)
  base = {'attention_mask': np.ones_like(ids), 'token_type_ids': np.zeros_like(ids),
          'weights': np.ones(b, np.float32)}
  at, positions, compact = masking.predictions(ids, corrupted, labels, masking.max_predictions(seq, spec, labels))
  return {'every position': {**base, 'input_ids': corrupted, 'labels': labels},
          'mlm_positions (jtune)': {**base, 'input_ids': at, 'labels': compact, 'mlm_positions': positions}}


def torch_timers(shape: workloads.Shape, batch: dict[str, np.ndarray]):
  """transformers' BertForMaskedLM, torch.optim.AdamW (train) and no_grad in eval() mode (eval)."""
  import torch  # pylint: disable=g-import-not-at-top  (test extra)
  import transformers  # pylint: disable=g-import-not-at-top
  hf = transformers.BertConfig(num_hidden_layers=shape.layers, hidden_size=shape.hidden,
                               num_attention_heads=shape.heads, intermediate_size=shape.mlp, vocab_size=VOCAB)
  model = transformers.BertForMaskedLM(hf)
  opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
  inputs = {k: torch.from_numpy(batch[k].astype(np.int64)) for k in state_lib.ENCODER_INPUTS + ('labels',)}

  def train():
    model.train()
    loss = model(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  def evaluate():
    model.eval()
    with torch.no_grad():
      model(**inputs)
  return train, evaluate, train()


def main(argv):
  del argv
  host_memory.keep_freed_memory()  # as jtune.train does, before the first jax call starts the backend
  shape = workloads.SHAPES[_MODEL.value]
  cfg = dataclasses.replace(workloads.bert_config(shape), vocab_size=VOCAB, num_labels=0, head='mlm')
  timers, masked = {}, batches(_BATCH.value, _SEQ.value, _WHOLE_WORD.value)
  for name, batch in masked.items():
    inputs = state_lib.ENCODER_INPUTS + tuple(c for c in state_lib.HEAD_INPUTS['mlm'] if c in batch)
    *timers[name], loss = workloads.batch_timers(bert.build(cfg), tasks.TASKS['mlm'], inputs, batch, _SEQ.value)
    print(f'{name}: {batch["labels"].shape[1]} positions, first loss {loss:.4f}', flush=True)
  if _TORCH.value:
    *timers['transformers BertForMaskedLM'], loss = torch_timers(shape, masked['every position'])
    print(f'transformers BertForMaskedLM: first loss {loss:.4f} (its own initialisation)', flush=True)
  for timer in (t for pair in timers.values() for t in pair):
    timer()  # warm-up
  workloads.alternate(timers, _ROUNDS.value)


if __name__ == '__main__':
  app.run(main)
