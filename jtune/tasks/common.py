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


@jax.custom_vjp
def logsumexp(logits_BLV: jax.Array) -> jax.Array:
  """log(sum(exp(logits))) over the last axis. On a CPU the sum is a product with a vector of ones: XLA:CPU runs a
  sum of exponentials over the vocabulary as a YNNPACK reduction at half the speed of the matrix-vector product
  (GPT-2's eval step: 197 ms of 1.37 s on a Xeon, benchmarks/README.md); elsewhere it is the plain sum. The
  gradient, softmax(logits), is written out: differentiating the product was 16% slower than optax's gradient."""
  max_BL1 = jnp.max(logits_BLV, axis=-1, keepdims=True)
  exp_BLV = jnp.exp(logits_BLV - max_BL1)
  sum_BL = jax.lax.platform_dependent(
      exp_BLV, cpu=lambda e: e @ jnp.ones(e.shape[-1], e.dtype), default=lambda e: jnp.sum(e, axis=-1))
  return jnp.log(sum_BL) + max_BL1[..., 0]


def _logsumexp_fwd(logits_BLV: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  lse_BL = logsumexp(logits_BLV)
  return lse_BL, (logits_BLV, lse_BL)


def _logsumexp_bwd(residuals: tuple[jax.Array, jax.Array], g_BL: jax.Array) -> tuple[jax.Array]:
  logits_BLV, lse_BL = residuals
  return (jnp.exp(logits_BLV - lse_BL[..., None]) * g_BL[..., None],)


logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """-log softmax(logits)[target] per token (targets are class ids), with jtune's `logsumexp`; with label
  smoothing, the cross-entropy against (1 - s) * one_hot + s / V, as optax.smooth_labels makes it. The same values
  as optax's softmax_cross_entropy(_with_integer_labels) without the [..., V] one-hot: the masked-LM loss on BERT's
  vocabulary, [16, 128, 30522], took 86 ms instead of 108 forward and 112-120 instead of 159-165 with its gradient
  on a 2-core Xeon (2026-12-05)."""
  lse_BL = logsumexp(logits_BLV)
  per_token_BL = lse_BL - jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  if label_smoothing:  # mean(log_softmax(logits)) = mean(logits) - logsumexp(logits)
    per_token_BL = ((1.0 - label_smoothing) * per_token_BL
                    - label_smoothing * (jnp.mean(logits_BLV, axis=-1) - lse_BL))
  return per_token_BL
