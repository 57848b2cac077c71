"""Sequence regression (STS-B style): one real-valued output, mean squared error, Pearson and Spearman."""

from __future__ import annotations

import math
from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np

from jtune import config as config_lib
from jtune.data import pipeline
from jtune.data.features import Features
from jtune.tasks import common

HEAD = 'sequence'
PROBLEM_TYPE = 'regression'


def check(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, task=None) -> None:
  pipeline.check_text_and_label(ds, split, cfg)
  for row, value in enumerate(ds[cfg.label_column]):
    try:
      number = float(value)
    except (TypeError, ValueError):
      number = math.nan
    if not math.isfinite(number):
      raise ValueError(f'split {split!r} row {row}: column {cfg.label_column!r} is {value!r}: '
                       'expected a finite number')


def label_names(ds: datasets.Dataset, cfg: config_lib.DataConfig) -> list[str]:
  del ds
  return [cfg.label_column]  # one output, named after the score it predicts


def num_outputs(labels: list[str]) -> int:
  del labels
  return 1


def featurize(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, task: config_lib.TaskConfig,
              tokenizer: Any, labels: list[str], *, training: bool) -> Features:
  del task, labels, training
  scores = np.asarray([float(v) for v in ds[cfg.label_column]], np.float32)
  return common.tokenize_texts(ds, split, cfg, tokenizer, {'labels': scores})


def loss_sums(outputs_B1: jax.Array, batch: dict[str, jax.Array], label_smoothing: float = 0.0, task=None
              ) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted squared errors, sum of weights)."""
  del label_smoothing, task
  error_B = outputs_B1[:, 0].astype(jnp.float32) - batch['labels']
  return jnp.sum(jnp.square(error_B) * batch['weights']), jnp.sum(batch['weights'])


def eval_outputs(outputs_B1: jax.Array, batch: dict[str, jax.Array], task=None) -> dict[str, jax.Array]:
  del task
  return {'predictions': outputs_B1[:, 0].astype(jnp.float32)}


def summarize(outputs: list[dict[str, np.ndarray]], features: Features, task=None) -> dict[str, float]:
  """MSE, Pearson's r and Spearman's rho over the eval split."""
  del task
  import scipy.stats  # pylint: disable=g-import-not-at-top  (1.5 s to import: only where a regression evaluates)
  pred = common.gather(outputs, 'predictions', len(features)).astype(np.float64)
  gold = np.asarray(features.rows['labels'], np.float64)
  constant = np.ptp(pred) == 0 or np.ptp(gold) == 0  # correlation undefined: report 0
  return {
      'loss': float(np.mean(np.square(pred - gold))),
      'pearson': 0.0 if constant else float(scipy.stats.pearsonr(pred, gold).statistic),
      'spearman': 0.0 if constant else float(scipy.stats.spearmanr(pred, gold).statistic),
      'count': float(len(gold)),
  }
