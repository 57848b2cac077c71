"""Scoring exported sequence classifiers on a split, alone or as an ensemble (the mean of their class
probabilities): what `python -m jtune.evaluate` reports (jtune/report.py writes it)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from jtune import config as config_lib
from jtune import modeling
from jtune import step as step_lib
from jtune.data import batching, pipeline
from jtune.tasks import classification


def label_names(model: modeling.Model) -> list[str]:
  id2label = model.hf_config.id2label
  return [str(id2label[i]) for i in range(len(id2label))]


def probabilities(model_path: str, cfg: config_lib.Config, split: str, ds) -> tuple[np.ndarray, np.ndarray,
                                                                                     list[str]]:
  """(class probabilities [N, C], true class ids [N], label names) of one exported classifier on `ds`."""
  model, params = modeling.load(model_path, cfg.cache_dir, head=classification.HEAD)
  names = label_names(model)
  features = classification.featurize(ds, split, cfg.data, cfg.task, model.tokenizer, names, training=False)
  predict = jax.jit(functools.partial(step_lib.predict_step, model=model.module, inputs=model.inputs))
  chunks = []
  for batch in batching.eval_batches(features, cfg.train.eval_batch_size, cfg.data.buckets, model.pad_id):
    chunks.append(np.asarray(predict(params, batch))[batch['weights'] > 0])
  return softmax(np.concatenate(chunks)), features.labels, names


def softmax(logits: np.ndarray) -> np.ndarray:
  """Class probabilities [N, C] in float64 from logits [N, C]."""
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  return probs / probs.sum(axis=1, keepdims=True)


def scores(probs: np.ndarray, labels: np.ndarray) -> dict:
  """Loss (mean negative log-probability of the true class), accuracy, macro and per-class metrics, confusion."""
  num_classes = probs.shape[1]
  predicted = probs.argmax(axis=1)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, predicted), 1)
  classes = classification.per_class(confusion)
  averages = classification.macro(confusion)
  true_probs = probs[np.arange(len(labels)), labels]
  return {
      'loss': float(-np.mean(np.log(np.maximum(true_probs, np.finfo(np.float64).tiny)))),
      'accuracy': float(np.mean(predicted == labels)),
      'f1': averages['f1'],
      'precision': averages['precision'],
      'recall': averages['recall'],
      'count': int(len(labels)),
      'per_class': {k: v.tolist() for k, v in classes.items()},
      'confusion': confusion.tolist(),
  }


def evaluate(cfg: config_lib.Config, model_paths: list[str], split: str | None = None) -> dict:
  """The report of the ensemble of `model_paths` (one model: the model itself) on `split`.

  Raises:
    ValueError: no model, models with different label sets, or a label in the data no model knows.
  """
  if not model_paths:
    raise ValueError('--model is required: expected one exported classifier, or several for an ensemble')
  if cfg.task.name != 'classification':
    raise config_lib.ConfigError(f"config.task.name={cfg.task.name!r}: expected 'classification' (jtune.evaluate "
                                 'scores exported sequence classifiers)')
  split = split or cfg.data.eval_split
  data = dataclasses.replace(cfg.data, train_split=split, eval_split=split)  # that split alone is read
  _, ds = pipeline.load_splits(data)
  members, first = [], None
  for path in model_paths:
    probs, labels, names = probabilities(path, dataclasses.replace(cfg, data=data), split, ds)
    if first is not None and names != first:
      raise ValueError(f'--model={path} predicts labels {names}: expected the labels of --model='
                       f'{model_paths[0]}, {first}, in the same order')
    first = first or names
    members.append((path, probs, labels))
  probs = np.mean([p for _, p, _ in members], axis=0)
  labels = members[0][2]
  return {
      'split': split, 'dataset': cfg.data.dataset, 'labels': first, 'models': model_paths,
      'ensemble': scores(probs, labels),
      'members': [{'model': path, **scores(p, y)} for path, p, y in members],
  }
