"""Causal-LM fine-tuning and instruction tuning: next-token loss on the response only, packed rows, perplexity.

Each row of the data becomes `prompt + response + EOS`, the prompt from `task.prompt_template` and the response
from `task.response_template` (both `str.format` templates over the row's columns, e.g. 'Review: {text}\\n
Sentiment:' and ' {label}'). With a response, only its tokens (and the EOS) are predicted; without one (domain
adaptation on raw text) every token is, and a text longer than max_length is cut into max_length pieces.
`task.packing` concatenates examples into rows of up to max_length tokens; `segment_ids` (1, 2, ...) and
`positions` (restarting at 0) keep attention and positions inside each example.
"""

from __future__ import annotations

import math
import string
from typing import Any, Callable

import datasets
import jax
import jax.numpy as jnp
import numpy as np

from jtune import config as config_lib
from jtune.data import pipeline
from jtune.data.features import IGNORE, Features, lengths_of, ragged
from jtune.models.layers import HeadInputs
from jtune.tasks import common

HEAD = 'causal_lm'
PROBLEM_TYPE = None


def _fields(template: str) -> list[str]:
  return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def check(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, task: config_lib.TaskConfig) -> None:
  columns = sorted(set(_fields(task.prompt_template) + _fields(task.response_template)))
  pipeline.check_columns(ds, split, columns)
  pipeline.check_texts(ds, split, columns)


def label_names(ds: datasets.Dataset, cfg: config_lib.DataConfig) -> list[str]:
  del ds, cfg
  return []


def num_outputs(labels: list[str]) -> int:
  del labels
  return 0  # the vocabulary: the model's own


def _examples(ds: datasets.Dataset, task: config_lib.TaskConfig, tokenizer: Any, max_length: int
              ) -> tuple[list[list[int]], list[list[int]], list[list[int]], list[str]]:
  """(input ids, targets, prompt ids, response texts) per example; targets are next tokens or IGNORE."""
  rows = ds.to_list()
  prompts = [task.prompt_template.format(**row) for row in rows]
  responses = [task.response_template.format(**row) for row in rows] if task.response_template else None
  prompt_ids = tokenizer(prompts, add_special_tokens=False)['input_ids']
  response_ids = tokenizer(responses, add_special_tokens=False)['input_ids'] if responses else None
  eos = tokenizer.eos_token_id
  inputs, targets = [], []
  for i, prompt in enumerate(prompt_ids):
    if response_ids is None:  # raw text: predict every token, in max_length pieces
      ids = prompt + [eos]
      for start in range(0, len(ids) - 1, max_length):
        piece = ids[start:start + max_length + 1]
        inputs.append(piece[:-1])
        targets.append(piece[1:])
      continue
    ids = (prompt + response_ids[i] + [eos])[:max_length + 1]
    target = [t if j + 1 >= len(prompt) else IGNORE for j, t in enumerate(ids[1:])]
    inputs.append(ids[:-1])
    targets.append(target)
  return inputs, targets, prompt_ids, responses or []


def _pack(inputs: list[list[int]], targets: list[list[int]], max_length: int
          ) -> tuple[list[list[int]], ...]:
  """Greedy packing in order: each row takes examples while they fit in max_length tokens."""
  rows: list[tuple[list[int], list[int], list[int], list[int]]] = []
  for ids, target in zip(inputs, targets):
    if not rows or len(rows[-1][0]) + len(ids) > max_length:
      rows.append(([], [], [], []))
    row_ids, row_targets, row_positions, row_segments = rows[-1]
    segment = (row_segments[-1] if row_segments else 0) + 1
    row_ids += ids
    row_targets += target
    row_positions += list(range(len(ids)))
    row_segments += [segment] * len(ids)
  return tuple(list(column) for column in zip(*rows)) if rows else ([], [], [], [])


def featurize(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, task: config_lib.TaskConfig,
              tokenizer: Any, labels: list[str], *, training: bool) -> Features:
  del labels, training
  inputs, targets, prompt_ids, responses = _examples(ds, task, tokenizer, cfg.max_length)
  if not any(t != IGNORE for row in targets for t in row):
    raise ValueError(f'split {split!r}: no token to predict fits in config.data.max_length={cfg.max_length} (each '
                     "example's prompt fills it): expected a larger data.max_length, or shorter prompts")
  if task.packing:
    inputs, targets, positions, segments = _pack(inputs, targets, cfg.max_length)
  else:
    positions = [list(range(len(ids))) for ids in inputs]
    segments = [[1] * len(ids) for ids in inputs]
  tokens = {'input_ids': ragged(inputs), 'targets': ragged(targets), 'positions': ragged(positions),
            'segment_ids': ragged(segments)}
  host = {'prompt_ids': prompt_ids, 'responses': responses}
  return Features(tokens=tokens, rows={}, lengths=lengths_of(tokens['input_ids']), host=host,
                  compact_targets=bool(responses))  # the LM head at the response tokens only


def loss_sums(logits_BLV: jax.Array | HeadInputs, batch: dict[str, jax.Array], label_smoothing: float = 0.0, task=None
              ) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token cross-entropies over predicted tokens of weighted rows, their count). The logits are the
  model's at the batch's `target_positions` where it has them, and its `targets` then those positions' own; or
  the LM head's inputs (model.lm_head_chunks > 1), which the loss applies in chunks."""
  del task
  targets_BL = batch['targets']
  chunked = isinstance(logits_BLV, HeadInputs)
  positions = (logits_BLV.x_BLD if chunked else logits_BLV).shape[1]
  if positions != targets_BL.shape[1]:
    raise ValueError(f'logits at {positions} positions for targets at {targets_BL.shape[1]}: a batch with '
                     'target_positions needs a model that takes them (the inputs of jtune.modeling.Model)')
  mask_BL = (targets_BL != IGNORE) * batch['weights'][:, None]
  classes_BL = jnp.maximum(targets_BL, 0)
  if chunked:
    total = common.chunked_cross_entropy_sum(logits_BLV, classes_BL, mask_BL, label_smoothing)
  else:
    total = jnp.sum(common.cross_entropy(logits_BLV.astype(jnp.float32), classes_BL, label_smoothing) * mask_BL)
  return total, jnp.sum(mask_BL)


def eval_outputs(logits_BLV: jax.Array, batch: dict[str, jax.Array], task=None) -> dict[str, jax.Array]:
  del task
  loss, count = loss_sums(logits_BLV, batch)
  return {'loss_sum': loss, 'count': count}


def summarize(outputs: list[dict[str, np.ndarray]], features: Features | None = None, task=None
              ) -> dict[str, float]:
  """Mean next-token loss over the predicted tokens and its perplexity."""
  del features, task
  count = float(common.total(outputs, 'count'))
  loss = float(common.total(outputs, 'loss_sum')) / max(count, 1.0)
  return {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)), 'tokens': count}


def normalize(text: str) -> str:
  """Lowercase, punctuation to spaces, whitespace collapsed: how generated answers are compared."""
  table = str.maketrans({c: ' ' for c in string.punctuation})
  return ' '.join(text.lower().translate(table).split())


def generation_metrics(generate: Callable[[list[list[int]]], list[list[int]]], features: Features,
                        tokenizer: Any, limit: int) -> dict[str, float]:
  """Generates for the first `limit` prompts; an answer is right when it starts with the reference response
  (after `normalize`, at a word boundary)."""
  prompts, responses = features.host['prompt_ids'][:limit], features.host['responses'][:limit]
  if not responses:
    return {}
  outputs = generate(prompts)
  right = 0
  for tokens, reference in zip(outputs, responses):
    answer, want = normalize(tokenizer.decode(tokens, skip_special_tokens=True)), normalize(reference)
    right += answer == want or answer.startswith(want + ' ')
  return {'generation_accuracy': right / len(responses)}
