"""What the sentence-level tasks share: tokenizing text (pairs) into Features, the weighted mean of a loss, and
gathering eval outputs."""

from __future__ import annotations

import functools
from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jtune import config as config_lib
from jtune import sharding as sharding_lib
from jtune.data.features import Features, lengths_of, ragged
from jtune.models.layers import HeadInputs, dense_dot


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


def chunked_cross_entropy_sum(head: HeadInputs, targets_BL: jax.Array, mask_BL: jax.Array,
                              label_smoothing: float = 0.0) -> jax.Array:
  """sum(cross_entropy(logits, targets) * mask) of an LM head's logits, computed `head.chunks` slices of the
  positions at a time (a lax.scan): no [B, L, V] logits, nor their gradient, exist whole.

  Differentiated, each slice's gradient is computed as its loss is (the gradient of a sum is the sum of the
  slices'), as Liger's fused linear cross-entropy does: the backward pass only scales them, so nothing is
  recomputed, and the head's three products per slice are the ones the whole head would run. The head's weight
  gradient is summed over the slices in float32, on a mesh per piece of the batch (each device its rows'), and
  reduced over the batch once, after the loop, as the whole head's is.
  """
  return _chunked_sum(head.tied, head.chunks, float(label_smoothing), head.x_BLD, head.weight,
                      jnp.asarray(targets_BL, jnp.int32), mask_BL.astype(jnp.float32))


def _slices(a: jax.Array, chunks: int) -> jax.Array:
  """[B, L, ...] -> [chunks, B, C, ...], L padded with zeros to chunks * C."""
  size = -(-a.shape[1] // chunks)
  a = jnp.pad(a, [(0, 0), (0, chunks * size - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
  return a.reshape(a.shape[0], chunks, size, *a.shape[2:]).swapaxes(0, 1)


def _batch_shards(batch_size: int) -> int:
  """How many pieces the current mesh (jtune.sharding.activate) splits a batch of `batch_size` rows into, as
  sharding.batch_sharding places it: 1 outside a mesh, or where they do not divide it."""
  mesh = jax.sharding.get_abstract_mesh()
  shards = 1 if mesh.empty else sharding_lib.data_parallel_size(mesh)
  return shards if batch_size % shards == 0 else 1


def _chunked_loss(tied, chunks, label_smoothing, x_BLD, weight, targets_BL, mask_BL, with_grads: bool):
  head = HeadInputs(x_BLD, weight, tied=tied, chunks=chunks)
  kernel_DV = head.kernel()
  (B, _, D), V = x_BLD.shape, kernel_DV.shape[1]
  # The weight gradient accumulates one partial sum per piece of the batch (S of them, each on the devices that
  # hold those rows), summed once after the loop: one [D, V] carry replicated over the batch axes would be
  # all-reduced in every slice, N times the traffic of the whole head's gradient.
  S = _batch_shards(B) if with_grads else 1
  keep = lambda g_SDV: (jax.lax.with_sharding_constraint(g_SDV, PartitionSpec(sharding_lib.BATCH_AXES))  # noqa: E731
                        if S > 1 else g_SDV)

  def body(carry, xs):
    total_B, grad_SDV = carry  # the loss summed per row, so that the batch's pieces sum it once, after the loop
    x_BCD, targets_BC, mask_BC = xs
    per_token = lambda logits: cross_entropy(logits, targets_BC, label_smoothing)  # noqa: E731
    if not with_grads:
      return (total_B + jnp.sum(per_token(head.logits(x_BCD)) * mask_BC, axis=1), grad_SDV), None
    per_token_BC, vjp = jax.vjp(per_token, head.logits(x_BCD))
    g_BCV = vjp(mask_BC)[0].astype(x_BCD.dtype)  # the head's cotangent, as autodiff casts it
    dx_BCD = dense_dot(g_BCV, kernel_DV.T, 1)
    if S == 1:  # the one-device program as benchmarked (XLA:CPU runs the batched form on a transposed copy of x)
      grad_SDV += jnp.matmul(x_BCD.reshape(-1, D).T, g_BCV.reshape(-1, V), preferred_element_type=jnp.float32)
    else:
      grad_SDV += jnp.einsum('sbcd,sbcv->sdv', x_BCD.reshape(S, B // S, *x_BCD.shape[1:]),
                             g_BCV.reshape(S, B // S, *g_BCV.shape[1:]), preferred_element_type=jnp.float32)
    return (total_B + jnp.sum(per_token_BC * mask_BC, axis=1), keep(grad_SDV)), dx_BCD

  grad_SDV = keep(jnp.zeros((S, D, V), jnp.float32)) if with_grads else jnp.zeros((), jnp.float32)
  xs = (_slices(x_BLD, chunks), _slices(targets_BL, chunks), _slices(mask_BL, chunks))
  (total_B, grad_SDV), dx = jax.lax.scan(body, (jnp.zeros((B,), jnp.float32), grad_SDV), xs)
  total = jnp.sum(total_B)
  if not with_grads:
    return total, None
  dx_BLD = dx.swapaxes(0, 1).reshape(B, -1, D)[:, :x_BLD.shape[1]]
  grad_DV = grad_SDV.sum(0)
  return total, (dx_BLD, (grad_DV.T if tied else grad_DV).astype(weight.dtype), targets_BL, mask_BL)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked_sum(tied, chunks, label_smoothing, x_BLD, weight, targets_BL, mask_BL):
  return _chunked_loss(tied, chunks, label_smoothing, x_BLD, weight, targets_BL, mask_BL, with_grads=False)[0]


def _chunked_sum_fwd(tied, chunks, label_smoothing, x_BLD, weight, targets_BL, mask_BL):
  return _chunked_loss(tied, chunks, label_smoothing, x_BLD, weight, targets_BL, mask_BL, with_grads=True)


def _chunked_sum_bwd(tied, chunks, label_smoothing, residuals, g):
  del tied, chunks, label_smoothing
  dx_BLD, grad_weight, targets_BL, mask_BL = residuals
  return ((g * dx_BLD).astype(dx_BLD.dtype), (g * grad_weight).astype(grad_weight.dtype),
          np.zeros(targets_BL.shape, jax.dtypes.float0), jnp.zeros_like(mask_BL))


_chunked_sum.defvjp(_chunked_sum_fwd, _chunked_sum_bwd)
