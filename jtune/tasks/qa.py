"""Extractive question answering (SQuAD style): start/end logits over the context, best span, EM and F1.

Data: `text_column` the question, `text_pair_column` the context, `label_column` the answers as SQuAD gives them
({'text': [...], 'answer_start': [...]}). A context longer than max_length is cut into windows that overlap by
`task.stride` tokens; each window is a row. Training rows point at the first answer's tokens (or at [CLS] when the
answer is not inside the window); evaluation picks the best span over all windows of an example and scores the
text against every reference answer as the official SQuAD v1.1 script does.
"""

from __future__ import annotations

from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtune import config as config_lib
from jtune.data import pipeline
from jtune.data.features import Features, lengths_of, ragged
from jtune.tasks import squad

HEAD = 'qa'
PROBLEM_TYPE = None


def check(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, task=None) -> None:
  pipeline.check_columns(ds, split, [cfg.text_column, cfg.text_pair_column, cfg.label_column])
  pipeline.check_texts(ds, split, [cfg.text_column, cfg.text_pair_column])
  for row, (context, answers) in enumerate(zip(ds[cfg.text_pair_column], ds[cfg.label_column])):
    if not isinstance(answers, dict) or not answers.get('text') or \
        len(answers['text']) != len(answers.get('answer_start', [])):
      raise ValueError(f'split {split!r} row {row}: column {cfg.label_column!r} is {answers!r}: expected '
                       "{'text': [answer, ...], 'answer_start': [character offset, ...]}")
    for text, start in zip(answers['text'], answers['answer_start']):
      if context[start:start + len(text)] != text:
        raise ValueError(f'split {split!r} row {row}: answer {text!r} is not at character {start} of the '
                         'context: expected answer_start to point at the answer text')


def label_names(ds: datasets.Dataset, cfg: config_lib.DataConfig) -> list[str]:
  del ds, cfg
  return []


def num_outputs(labels: list[str]) -> int:
  del labels
  return 2  # start, end


def featurize(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, task: config_lib.TaskConfig,
              tokenizer: Any, labels: list[str], *, training: bool) -> Features:
  """Training windows with answer positions (`training`) or with offsets for decoding (evaluation)."""
  del labels
  questions, contexts = ds[cfg.text_column], ds[cfg.text_pair_column]
  answers = ds[cfg.label_column]
  squad.check_questions(questions, contexts, tokenizer, cfg.max_length, task.stride, split)
  if training:
    f = squad.train_features(questions, contexts, answers, tokenizer, cfg.max_length, task.stride)
    rows = {name: np.asarray(f[name], np.int32) for name in ('start_positions', 'end_positions')}
    host = {}
  else:
    f = squad.eval_features(questions, contexts, tokenizer, cfg.max_length, task.stride)
    rows = {}
    host = {'offsets': f['offsets'], 'example_index': np.asarray(f['example_index']), 'contexts': contexts,
            'answers': [a['text'] for a in answers]}
  tokens = {name: ragged(f[name]) for name in ('input_ids', 'token_type_ids')}
  return Features(tokens=tokens, rows=rows, lengths=lengths_of(tokens['input_ids']), host=host)


def _masked(logits_BL: jax.Array, mask_BL: jax.Array) -> jax.Array:
  return jnp.where(mask_BL > 0, logits_BL.astype(jnp.float32), -1e9)


def loss_sums(logits_BL2: jax.Array, batch: dict[str, jax.Array], label_smoothing: float = 0.0, task=None
              ) -> tuple[jax.Array, jax.Array]:
  """(sum over weighted windows of the mean of start and end cross-entropies, sum of weights)."""
  del label_smoothing, task
  mask_BL = batch['attention_mask']
  start = optax.softmax_cross_entropy_with_integer_labels(_masked(logits_BL2[..., 0], mask_BL),
                                                          batch['start_positions'])
  end = optax.softmax_cross_entropy_with_integer_labels(_masked(logits_BL2[..., 1], mask_BL),
                                                        batch['end_positions'])
  return jnp.sum(0.5 * (start + end) * batch['weights']), jnp.sum(batch['weights'])


def eval_outputs(logits_BL2: jax.Array, batch: dict[str, jax.Array], task=None) -> dict[str, jax.Array]:
  del task
  mask_BL = batch['attention_mask']
  return {'start_logits': _masked(logits_BL2[..., 0], mask_BL), 'end_logits': _masked(logits_BL2[..., 1], mask_BL)}


def summarize(outputs: list[dict[str, np.ndarray]], features: Features, task: config_lib.TaskConfig
              ) -> dict[str, float]:
  """Exact match and F1 (percent) of the best span of every example."""
  n = len(features)
  width = max(np.asarray(o['start_logits']).shape[1] for o in outputs)
  pad = lambda x: np.pad(np.asarray(x), ((0, 0), (0, width - x.shape[1])), constant_values=-1e9)  # noqa: E731
  start = np.concatenate([pad(o['start_logits']) for o in outputs])[:n]
  end = np.concatenate([pad(o['end_logits']) for o in outputs])[:n]
  host = features.host
  texts = squad.best_spans(start, end, {'offsets': host['offsets'], 'example_index': host['example_index']},
                           host['contexts'], n_best=task.n_best, max_answer_length=task.max_answer_length)
  result = squad.evaluate(dict(enumerate(texts)), dict(enumerate(host['answers'])))
  return {'exact_match': float(result['exact_match']), 'f1': float(result['f1']),
          'count': float(len(host['answers']))}
