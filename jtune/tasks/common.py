"""What the sentence-level tasks share: tokenizing text (pairs) into Features, the weighted mean of a loss, and
gathering eval outputs."""

from __future__ import annotations

from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np

from jtune import config as config_lib
from jtune.data.features import Features, lengths_of, ragged


def tokenize_texts(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, tokenizer: Any,
                   rows: dict[str, np.ndarray]) -> Features:
  """Tokenizes `text_column` (and `text_pair_column`) once, truncating to max_length; `datasets` caches the
  result by fingerprint. `rows` are the per-example label columns."""
  def encode(batch):
    pair = batch[cfg.text_pair_column] if cfg.text_pair_column else None
    enc = tokenizer(batch[cfg.text_column], pair, truncation=True, max_length=cfg.max_length,
                    return_token_type_ids=True, return_attention_mask=False)
    return {'input_ids': enc['input_ids'], 'token_type_ids': enc['token_type_ids']}

  enc = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f'Tokenizing {split}')
  tokens = {name: ragged(enc[name]) for name in ('input_ids', 'token_type_ids')}
  return Features(tokens=tokens, rows=rows, lengths=lengths_of(tokens['input_ids']))


def gather(outputs: list[dict[str, np.ndarray]], key: str, count: int) -> np.ndarray:
  """Per-row eval outputs of every batch, in dataset order, without the filler rows of the last batch."""
  return np.concatenate([np.asarray(o[key]) for o in outputs])[:count]


def total(outputs: list[dict[str, np.ndarray]], key: str) -> np.ndarray:
  """A summed eval statistic over all batches."""
  return np.sum([np.asarray(o[key], np.float64) for o in outputs], axis=0)


def f1_score(precision, recall):
  denom = precision + recall
  return np.divide(2 * precision * recall, denom, out=np.zeros_like(denom, dtype=np.float64), where=denom > 0)


def weighted_mean(total: jax.Array, weight: jax.Array) -> jax.Array:
  """A loss sum over its weight sum (rows or tokens, times class weights); 0 for a batch of filler rows only."""
  return total / jnp.where(weight > 0, weight, 1.0)
