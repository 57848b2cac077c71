"""Sequence classification: softmax cross-entropy, and accuracy / macro precision, recall, F1."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def loss_sums(logits_BC: jax.Array, batch: dict[str, jax.Array], label_smoothing: float = 0.0
              ) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted cross-entropies, sum of weights), in float32; padding examples carry weight 0.

  Sums, not a mean, so that micro-batches add up to exactly the loss of the whole batch.
  """
  logits_BC = logits_BC.astype(jnp.float32)
  targets_BC = optax.smooth_labels(jax.nn.one_hot(batch['labels'], logits_BC.shape[-1]), label_smoothing)
  per_example_B = optax.softmax_cross_entropy(logits_BC, targets_BC)
  weights_B = batch['weights']
  return jnp.sum(per_example_B * weights_B), jnp.sum(weights_B)


def loss(logits_BC: jax.Array, batch: dict[str, jax.Array], label_smoothing: float = 0.0) -> jax.Array:
  """Weighted mean cross-entropy."""
  total, weight = loss_sums(logits_BC, batch, label_smoothing)
  return total / jnp.maximum(weight, 1.0)


def eval_sums(logits_BC: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums over a batch that add up across batches: loss, example count, confusion matrix."""
  num_classes = logits_BC.shape[-1]
  per_example_B = optax.softmax_cross_entropy_with_integer_labels(
      logits_BC.astype(jnp.float32), batch['labels'])
  weights_B = batch['weights']
  pred_B = jnp.argmax(logits_BC, axis=-1)
  onehot_true_BC = jax.nn.one_hot(batch['labels'], num_classes) * weights_B[:, None]
  onehot_pred_BC = jax.nn.one_hot(pred_B, num_classes)
  return {
      'loss_sum': jnp.sum(per_example_B * weights_B),
      'count': jnp.sum(weights_B),
      'confusion': onehot_true_BC.T @ onehot_pred_BC,  # [true, predicted]
  }


def summarize(sums: dict[str, np.ndarray]) -> dict[str, float]:
  """Metrics from summed eval_sums: loss, accuracy and macro-averaged precision, recall and F1."""
  confusion = np.asarray(sums['confusion'], np.float64)
  true_positive = np.diag(confusion)
  predicted = confusion.sum(axis=0)
  actual = confusion.sum(axis=1)
  precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
  recall = np.divide(true_positive, actual, out=np.zeros_like(true_positive), where=actual > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
  count = float(sums['count'])
  return {
      'loss': float(sums['loss_sum']) / max(count, 1.0),
      'accuracy': float(true_positive.sum()) / max(count, 1.0),
      'f1': float(f1.mean()),
      'precision': float(precision.mean()),
      'recall': float(recall.mean()),
      'count': count,
  }
