"""Multi-label classification: any number of labels per text; sigmoid cross-entropy; micro and macro F1."""

from __future__ import annotations

import math
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
PROBLEM_TYPE = 'multi_label_classification'


def _label_lists(ds: datasets.Dataset, column: str) -> list[list[str]]:
  """Each row's labels as strings: a list column (of names, or of ClassLabel ids)."""
  feature = ds.features[column]
  inner = getattr(feature, 'feature', None)
  names = inner.names if isinstance(inner, datasets.ClassLabel) else None
  return [[names[v] if names else str(v) for v in values] for values in ds[column]]


def check(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, task=None) -> None:
  texts = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
  pipeline.check_columns(ds, split, texts + [cfg.label_column])
  pipeline.check_texts(ds, split, texts)
  for row, value in enumerate(ds[cfg.label_column]):
    if not isinstance(value, list):
      raise ValueError(f'split {split!r} row {row}: column {cfg.label_column!r} is {value!r}: expected a list of '
                       'labels (possibly empty)')


def label_names(ds: datasets.Dataset, cfg: config_lib.DataConfig) -> list[str]:
  inner = getattr(ds.features[cfg.label_column], 'feature', None)
  if isinstance(inner, datasets.ClassLabel):
    return list(inner.names)
  return sorted({label for labels in _label_lists(ds, cfg.label_column) for label in labels})


def num_outputs(labels: list[str]) -> int:
  return len(labels)


def featurize(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, task: config_lib.TaskConfig,
              tokenizer: Any, labels: list[str], *, training: bool) -> Features:
  del task, training
  index = {name: i for i, name in enumerate(labels)}
  multi_hot = np.zeros((len(ds), len(labels)), np.float32)
  for row, values in enumerate(_label_lists(ds, cfg.label_column)):
    for value in values:
      if value not in index:
        raise ValueError(f'label {value!r} in split {split!r} row {row} is not in the label set {labels}')
      multi_hot[row, index[value]] = 1.0
  return common.tokenize_texts(ds, split, cfg, tokenizer, {'labels': multi_hot})


def loss_sums(logits_BC: jax.Array, batch: dict[str, jax.Array], label_smoothing: float = 0.0, task=None
              ) -> tuple[jax.Array, jax.Array]:
  """(sum over examples of the mean binary cross-entropy over labels, sum of weights)."""
  del task
  targets_BC = batch['labels'] * (1.0 - label_smoothing) + 0.5 * label_smoothing
  per_example_B = optax.sigmoid_binary_cross_entropy(logits_BC.astype(jnp.float32), targets_BC).mean(-1)
  return jnp.sum(per_example_B * batch['weights']), jnp.sum(batch['weights'])


def eval_outputs(logits_BC: jax.Array, batch: dict[str, jax.Array], task: config_lib.TaskConfig
                 ) -> dict[str, jax.Array]:
  """Per-label true/false positive and false negative counts, exact-match rows, loss: all summable."""
  weights_B1 = batch['weights'][:, None]
  threshold_logit = math.log(task.threshold / (1.0 - task.threshold))
  pred_BC = (logits_BC > threshold_logit).astype(jnp.float32)
  gold_BC = batch['labels']
  loss, count = loss_sums(logits_BC, batch)
  return {
      'loss_sum': loss, 'count': count,
      'tp': jnp.sum(pred_BC * gold_BC * weights_B1, axis=0),
      'fp': jnp.sum(pred_BC * (1 - gold_BC) * weights_B1, axis=0),
      'fn': jnp.sum((1 - pred_BC) * gold_BC * weights_B1, axis=0),
      'exact': jnp.sum(jnp.all(pred_BC == gold_BC, axis=-1) * batch['weights']),
  }


def summarize(outputs: list[dict[str, np.ndarray]], features: Features | None = None, task=None
              ) -> dict[str, float]:
  """Micro F1 (all label decisions pooled), macro F1 (mean over labels), micro precision/recall, subset accuracy."""
  del features, task
  tp, fp, fn = (common.total(outputs, k) for k in ('tp', 'fp', 'fn'))
  count = float(common.total(outputs, 'count'))
  ratio = lambda a, b: float(a / b) if b > 0 else 0.0  # noqa: E731
  micro_p, micro_r = ratio(tp.sum(), tp.sum() + fp.sum()), ratio(tp.sum(), tp.sum() + fn.sum())
  per_p = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
  per_r = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)
  return {
      'loss': float(common.total(outputs, 'loss_sum')) / max(count, 1.0),
      'micro_f1': float(common.f1_score(np.float64(micro_p), np.float64(micro_r))),
      'macro_f1': float(common.f1_score(per_p, per_r).mean()),
      'micro_precision': micro_p,
      'micro_recall': micro_r,
      'subset_accuracy': float(common.total(outputs, 'exact')) / max(count, 1.0),
      'count': count,
  }
