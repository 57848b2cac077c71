"""Masked-LM (domain-adaptive) pretraining of an encoder on unlabelled text: BERT's 80/10/10 masking, optionally
of whole words; held-out masked-token loss, perplexity and accuracy.

Data: `text_column` holds the text (no labels). Rows are truncated to max_length; the masks are drawn anew each
time a batch is assembled (jtune/data/masking.py), the same ones at every evaluation. Fine-tune from the result
with `train.init_from=<this run's workdir>`, or use its export (a *ForMaskedLM folder) as `model.name_or_path`.
"""

from __future__ import annotations

from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np

from jtune import config as config_lib
from jtune.data import masking, pipeline
from jtune.data.features import IGNORE, Features, lengths_of, ragged
from jtune.tasks import common, token_classification

HEAD = 'mlm'
PROBLEM_TYPE = None


def check(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, task=None) -> None:
  pipeline.check_texts(ds, split, [cfg.text_column])


def label_names(ds: datasets.Dataset, cfg: config_lib.DataConfig) -> list[str]:
  return []


def num_outputs(labels: list[str]) -> int:
  return 0  # the head predicts the vocabulary


def featurize(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, task: config_lib.TaskConfig,
              tokenizer: Any, labels: list[str], *, training: bool) -> Features:
  del labels, training  # the same features either way: batching draws the masks
  if tokenizer.mask_token_id is None:
    raise ValueError(f'the tokenizer of {type(tokenizer).__name__} has no mask token: expected a masked-LM '
                     'tokenizer (BERT family) for task mlm')

  def encode(batch):
    enc = tokenizer(batch[cfg.text_column], truncation=True, max_length=cfg.max_length,
                    return_token_type_ids=True, return_attention_mask=False)
    units = [masking.token_units(enc.word_ids(i)) for i in range(len(enc['input_ids']))]
    return {'input_ids': enc['input_ids'], 'token_type_ids': enc['token_type_ids'], 'units': units}

  enc = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f'Tokenizing {split}')
  tokens = {name: ragged(enc[name]) for name in ('input_ids', 'token_type_ids', 'units')}
  spec = masking.Masking(tokenizer.mask_token_id, len(tokenizer), task.mlm_probability, task.whole_word_masking)
  return Features(tokens=tokens, rows={}, lengths=lengths_of(tokens['input_ids']), masking=spec)


def loss_sums(logits_BPV: jax.Array, batch: dict[str, jax.Array], label_smoothing: float = 0.0, task=None
              ) -> tuple[jax.Array, jax.Array]:
  """(sum of cross-entropies over the masked tokens of weighted rows, their count); the logits are the head's at
  the batch's `mlm_positions`, whose `labels` hold the original ids (IGNORE in the slots past a row's masks)."""
  return token_classification.loss_sums(logits_BPV, batch, label_smoothing, task)


def eval_outputs(logits_BPV: jax.Array, batch: dict[str, jax.Array], task=None) -> dict[str, jax.Array]:
  loss, count = loss_sums(logits_BPV, batch)
  mask_BP = (batch['labels'] != IGNORE) * batch['weights'][:, None]
  correct = jnp.sum((jnp.argmax(logits_BPV, -1) == batch['labels']) * mask_BP)
  return {'loss_sum': loss, 'count': count, 'correct': correct}


def summarize(outputs: list[dict[str, np.ndarray]], features: Features | None = None, task=None
              ) -> dict[str, float]:
  """Masked-token loss, perplexity (exp of the loss) and accuracy over the held-out masked tokens."""
  count = max(float(common.total(outputs, 'count')), 1.0)
  loss = float(common.total(outputs, 'loss_sum')) / count
  return {'loss': loss, 'perplexity': float(np.exp(loss)), 'accuracy': float(common.total(outputs, 'correct')) / count,
          'tokens': count}
