"""Token classification (NER style): a tag per word, learned on each word's first sub-token; entity-level F1.

Data: `text_column` holds the words (a list of strings), `label_column` their tags (a list of tag names or
ClassLabel ids, in IOB2 / IOB1 / IOBES as the data has them). Each word's first sub-token carries its tag; the
other sub-tokens and the special tokens carry IGNORE and count in neither the loss nor the metrics.
"""

from __future__ import annotations

from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np

from jtune import config as config_lib
from jtune.data import pipeline
from jtune.data.features import IGNORE, Features, lengths_of, ragged
from jtune.tasks import common, entities

HEAD = 'token'
PROBLEM_TYPE = None


def _tag_names(ds: datasets.Dataset, column: str) -> list[str] | None:
  inner = getattr(ds.features[column], 'feature', None)
  return list(inner.names) if isinstance(inner, datasets.ClassLabel) else None


def _check_tags(tags: list[str], where: str, valid: set[str]) -> None:
  """Every tag one that entity scoring reads (entities.parse_tag); `valid` remembers those already read."""
  for tag in tags:
    if tag in valid:
      continue
    try:
      entities.parse_tag(tag)
    except ValueError as e:
      raise ValueError(f'{where}: {e}') from None
    valid.add(tag)


def check(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, task=None) -> None:
  pipeline.check_columns(ds, split, [cfg.text_column, cfg.label_column])
  names, valid = _tag_names(ds, cfg.label_column), set()
  if names is not None:  # the model may predict any of them
    _check_tags(names, f'split {split!r} column {cfg.label_column!r} (its ClassLabel names)', valid)
  for row, (words, tags) in enumerate(zip(ds[cfg.text_column], ds[cfg.label_column])):
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
      raise ValueError(f'split {split!r} row {row}: column {cfg.text_column!r} is {words!r}: expected a '
                       'non-empty list of words')
    if not isinstance(tags, list) or len(tags) != len(words):
      raise ValueError(f'split {split!r} row {row}: column {cfg.label_column!r} has '
                       f'{len(tags) if isinstance(tags, list) else tags!r} tags for {len(words)} words: expected '
                       'one tag per word')
    if names is None:
      _check_tags([str(t) for t in tags], f'split {split!r} row {row}', valid)


def label_names(ds: datasets.Dataset, cfg: config_lib.DataConfig) -> list[str]:
  names = _tag_names(ds, cfg.label_column)
  if names is not None:
    return names
  tags = sorted({str(t) for tags in ds[cfg.label_column] for t in tags})
  return ['O'] + [t for t in tags if t != 'O'] if 'O' in tags else tags


def num_outputs(labels: list[str]) -> int:
  return len(labels)


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
  """One label per token: the word's label on its first sub-token, IGNORE elsewhere (special tokens too)."""
  out, previous = [], None
  for word in word_ids:
    out.append(IGNORE if word is None or word == previous else word_labels[word])
    previous = word
  return out


def featurize(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, task: config_lib.TaskConfig,
              tokenizer: Any, labels: list[str], *, training: bool) -> Features:
  del task, training
  index = {name: i for i, name in enumerate(labels)}
  names = _tag_names(ds, cfg.label_column)
  word_labels = []
  for row, tags in enumerate(ds[cfg.label_column]):
    tags = [names[t] for t in tags] if names else [str(t) for t in tags]
    for tag in tags:
      if tag not in index:
        raise ValueError(f'label {tag!r} in split {split!r} row {row} is not in the label set {labels}')
    word_labels.append([index[t] for t in tags])

  def encode(batch, rows):
    enc = tokenizer(batch[cfg.text_column], is_split_into_words=True, truncation=True,
                    max_length=cfg.max_length, return_token_type_ids=True, return_attention_mask=False)
    aligned = [align_labels(enc.word_ids(i), word_labels[row]) for i, row in enumerate(rows)]
    return {'input_ids': enc['input_ids'], 'token_type_ids': enc['token_type_ids'], 'labels': aligned}

  enc = ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names,
               desc=f'Tokenizing {split}')
  tokens = {name: ragged(enc[name]) for name in ('input_ids', 'token_type_ids', 'labels')}
  return Features(tokens=tokens, rows={}, lengths=lengths_of(tokens['input_ids']), host={'label_names': labels})


def loss_sums(logits_BLC: jax.Array, batch: dict[str, jax.Array], label_smoothing: float = 0.0, task=None
              ) -> tuple[jax.Array, jax.Array]:
  """(sum of cross-entropies over labelled tokens of weighted rows, their count)."""
  del task
  labels_BL = batch['labels']
  mask_BL = (labels_BL != IGNORE) * batch['weights'][:, None]
  logits_BLC = logits_BLC.astype(jnp.float32)
  per_token_BL = common.cross_entropy(logits_BLC, jnp.maximum(labels_BL, 0), label_smoothing)
  return jnp.sum(per_token_BL * mask_BL), jnp.sum(mask_BL)


def eval_outputs(logits_BLC: jax.Array, batch: dict[str, jax.Array], task=None) -> dict[str, jax.Array]:
  del task
  loss, count = loss_sums(logits_BLC, batch)
  return {'loss_sum': loss, 'count': count, 'predictions': jnp.argmax(logits_BLC, -1).astype(jnp.int32)}


def summarize(outputs: list[dict[str, np.ndarray]], features: Features, task=None) -> dict[str, float]:
  """Entity-level micro precision/recall/F1 (CoNLL), token accuracy and loss over the labelled tokens."""
  del task
  labels, rows = features.host['label_names'], len(features)
  pred_rows = [p for o in outputs for p in np.asarray(o['predictions'])][:rows]
  gold_tags, pred_tags = [], []
  for gold, pred in zip(features.tokens['labels'], pred_rows):
    keep = gold != IGNORE
    gold_tags.append([labels[i] for i in gold[keep]])
    pred_tags.append([labels[i] for i in pred[:len(gold)][keep]])
  scores = entities.scores(gold_tags, pred_tags)
  count = float(common.total(outputs, 'count'))
  return {
      'loss': float(common.total(outputs, 'loss_sum')) / max(count, 1.0),
      'precision': float(scores['precision']),
      'recall': float(scores['recall']),
      'f1': float(scores['f1']),
      'accuracy': float(scores['accuracy']),
      'count': float(rows),
  }
