"""Sequence classification: softmax cross-entropy, and accuracy / macro precision, recall, F1."""

from __future__ import annotations

from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtune import config as config_lib
from jtune.data import pipeline
from jtune.data.features import Features
from jtune.tasks import common

HEAD = 'sequence'
PROBLEM_TYPE = 'single_label_classification'


def check(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, task=None) -> None:
  pipeline.check_text_and_label(ds, split, cfg)


def label_names(ds: datasets.Dataset, cfg: config_lib.DataConfig) -> list[str]:
  return pipeline.label_names(ds, cfg.label_column)


def num_outputs(labels: list[str]) -> int:
  return len(labels)


def featurize(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, task: config_lib.TaskConfig,
              tokenizer: Any, labels: list[str], *, training: bool) -> Features:
  del task, training
  ids = pipeline.encode_labels(ds, split, cfg.label_column, labels)
  return common.tokenize_texts(ds, split, cfg, tokenizer, {'labels': ids})


def class_weights(spec: str, labels: np.ndarray, num_classes: int) -> tuple[float, ...] | None:
  """The loss weight of each class: '' none; 'balanced' n / (classes * count of the class), scikit-learn's
  'balanced'; or the comma-separated numbers of `spec`, one per class.

  Raises:
    ConfigError: a malformed spec, a count that is not the number of classes, or a class without examples.
  """
  if not spec:
    return None
  name = f'config.task.class_weights={spec!r}'
  if spec == 'balanced':
    counts = np.bincount(labels, minlength=num_classes)
    if not counts.all():
      raise config_lib.ConfigError(f'{name}: class {int(np.argmin(counts))} has no training examples to balance')
    return tuple(float(len(labels) / (num_classes * c)) for c in counts)
  try:
    weights = tuple(float(w) for w in spec.split(','))
  except ValueError:
    weights = ()
  if len(weights) != num_classes or not all(w > 0 for w in weights):
    raise config_lib.ConfigError(f"{name}: expected '', 'balanced' or {num_classes} positive numbers separated "
                                 'by commas, one per class')
  return weights


def oversample(features: Features, seed: int) -> Features:
  """Every class's rows repeated up to the count of the largest class: whole copies, then a seeded sample
  without replacement for the rest; rows stay in dataset order."""
  labels = features.rows['labels']
  counts = np.bincount(labels)
  rng = np.random.default_rng(seed)
  rows = []
  for c in np.flatnonzero(counts):
    members = np.flatnonzero(labels == c)
    copies, extra = divmod(int(counts.max()), len(members))
    rows += [np.tile(members, copies), rng.choice(members, extra, replace=False)]
  return features.take(np.sort(np.concatenate(rows)))


def loss_sums(logits_BC: jax.Array, batch: dict[str, jax.Array], label_smoothing: float = 0.0, task=None
              ) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted cross-entropies, sum of weights), in float32; padding examples carry weight 0.

  Sums, not a mean, so that micro-batches add up to exactly the loss of the whole batch.
  """
  del task
  logits_BC = logits_BC.astype(jnp.float32)
  targets_BC = optax.smooth_labels(jax.nn.one_hot(batch['labels'], logits_BC.shape[-1]), label_smoothing)
  per_example_B = optax.softmax_cross_entropy(logits_BC, targets_BC)
  weights_B = batch['weights']
  return jnp.sum(per_example_B * weights_B), jnp.sum(weights_B)


def loss(logits_BC: jax.Array, batch: dict[str, jax.Array], label_smoothing: float = 0.0) -> jax.Array:
  """Weighted mean cross-entropy."""
  total, weight = loss_sums(logits_BC, batch, label_smoothing)
  return common.weighted_mean(total, weight)


def eval_outputs(logits_BC: jax.Array, batch: dict[str, jax.Array], task=None) -> dict[str, jax.Array]:
  """Sums over a batch that add up across batches: loss, example count, confusion matrix."""
  del task
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


def per_class(confusion: np.ndarray) -> dict[str, np.ndarray]:
  """Precision, recall, F1 and support of every class from a [true, predicted] confusion matrix (0 where a
  class is never predicted or never present)."""
  confusion = np.asarray(confusion, np.float64)
  true_positive, predicted, actual = np.diag(confusion), confusion.sum(axis=0), confusion.sum(axis=1)
  precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
  recall = np.divide(true_positive, actual, out=np.zeros_like(true_positive), where=actual > 0)
  return {'precision': precision, 'recall': recall, 'f1': common.f1_score(precision, recall), 'support': actual}


def macro(confusion: np.ndarray) -> dict[str, float]:
  """Precision, recall and F1 averaged over the classes that are true or predicted at least once, as
  scikit-learn's average='macro' (over unique_labels(y_true, y_pred)): a class in neither does not count."""
  confusion = np.asarray(confusion, np.float64)
  classes = per_class(confusion)
  seen = (confusion.sum(axis=0) > 0) | (confusion.sum(axis=1) > 0)
  return {k: float(classes[k][seen].mean()) if seen.any() else 0.0 for k in ('precision', 'recall', 'f1')}


def summarize(outputs: list[dict[str, np.ndarray]], features: Features | None = None, task=None
              ) -> dict[str, float]:
  """Loss, accuracy and macro-averaged precision, recall and F1 (`macro`) over all eval batches."""
  del features, task
  confusion = common.total(outputs, 'confusion')
  averages = macro(confusion)
  count = float(common.total(outputs, 'count'))
  return {
      'loss': float(common.total(outputs, 'loss_sum')) / max(count, 1.0),
      'accuracy': float(np.trace(confusion)) / max(count, 1.0),
      'f1': averages['f1'],
      'precision': averages['precision'],
      'recall': averages['recall'],
      'count': count,
  }
