"""SQuAD v1.1 extractive QA on the host: the official evaluation script's answer normalisation, exact match and F1;
question + context windows with character offsets from a fast tokenizer; the best answer span over an example's
windows."""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
  """As the official script: lowercase, drop ASCII punctuation, drop the words a/an/the, collapse whitespace."""
  s = ''.join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  s = re.sub(r'\b(a|an|the)\b', ' ', s)
  return ' '.join(s.split())


def _f1_one(prediction: str, truth: str) -> float:
  pred_tokens, truth_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
  same = sum((collections.Counter(pred_tokens) & collections.Counter(truth_tokens)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred_tokens), same / len(truth_tokens)
  return 2 * precision * recall / (precision + recall)


def _max_over(metric, prediction: str, ground_truths: Sequence[str]) -> float:
  if isinstance(ground_truths, str) or not ground_truths:
    raise ValueError(f'ground truths {ground_truths!r}: expected a non-empty list of answer strings')
  return max(metric(prediction, truth) for truth in ground_truths)


def exact_match(prediction: str, ground_truths: Sequence[str]) -> float:
  """1.0 if the prediction equals any ground truth after normalisation, else 0.0."""
  return _max_over(lambda p, t: float(normalize_answer(p) == normalize_answer(t)), prediction, ground_truths)


def f1(prediction: str, ground_truths: Sequence[str]) -> float:
  """The best token-level F1 (bag of normalised words) over the ground truths."""
  return _max_over(_f1_one, prediction, ground_truths)


def evaluate(predictions: dict[Any, str], references: dict[Any, Sequence[str]]) -> dict[str, float]:
  """Exact match and F1 in percent, averaged over the questions of `references`.

  As the official script: a question with no prediction scores 0; predictions for unknown ids are ignored.
  """
  em = sum(exact_match(predictions[k], refs) for k, refs in references.items() if k in predictions)
  f = sum(f1(predictions[k], refs) for k, refs in references.items() if k in predictions)
  n = max(len(references), 1)
  return {'exact_match': 100.0 * em / n, 'f1': 100.0 * f / n}


def check_questions(questions: Sequence[str], contexts: Sequence[str], tokenizer: Any, max_length: int, stride: int,
                    split: str) -> None:
  """Every question whose context must be cut into windows leaves more than `stride` tokens of a window for it.

  Hugging Face tokenizers panics (a BaseException) when it must cut a context into windows with no more room
  than the stride, and fails when the question alone fills the window; this names the question instead. A long
  question whose pair fits in one window is fine (nothing is cut).

  Raises:
    ValueError: naming the split and row of the first question that is too long.
  """
  specials = tokenizer.num_special_tokens_to_add(pair=True)
  limit = max_length - specials - stride - 1
  counts = tokenizer([q.lstrip() for q in questions], add_special_tokens=False)['input_ids']
  for row, ids in enumerate(counts):
    if len(ids) > limit:
      context = len(tokenizer(contexts[row], add_special_tokens=False)['input_ids'])
      if len(ids) + context + specials > max_length:
        raise ValueError(f'split {split!r} row {row}: the question has {len(ids)} tokens: expected at most '
                         f'{limit}, so that a window of max_length {max_length} keeps more than stride {stride} '
                         'tokens for the context (shorten it, raise data.max_length or lower task.stride)')


def _windows(questions: Sequence[str], contexts: Sequence[str], tokenizer: Any, max_length: int, stride: int):
  """Question first, context second, the context cut into windows that overlap by `stride` tokens."""
  if not getattr(tokenizer, 'is_fast', False):
    raise ValueError(f'tokenizer {type(tokenizer).__name__}: expected a fast tokenizer (offsets and sequence ids)')
  if len(questions) != len(contexts):
    raise ValueError(f'{len(questions)} questions for {len(contexts)} contexts: expected one question per context')
  if not 0 <= stride < max_length:
    raise ValueError(f'stride {stride} with max_length {max_length}: expected 0 <= stride < max_length')
  # Leading whitespace in a question only takes room from the context (it becomes tokens in byte-level BPE).
  return tokenizer([q.lstrip() for q in questions], list(contexts), truncation='only_second',
                   max_length=max_length, stride=stride, return_overflowing_tokens=True,
                   return_offsets_mapping=True, return_token_type_ids=True)


def _context_range(sequence_ids: list[int | None]) -> tuple[int, int]:
  """First and last token of the context (sequence 1): by sequence ids, since RoBERTa's type ids are all 0."""
  inside = [i for i, s in enumerate(sequence_ids) if s == 1]
  return inside[0], inside[-1]


def _answer_tokens(offsets: Sequence[tuple[int, int]], first: int, last: int, start_char: int,
                   end_char: int) -> tuple[int, int]:
  """Token indices of the characters [start_char, end_char) among context tokens first..last; (0, 0) (the CLS
  token) when they are not wholly inside this window."""
  if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
    return 0, 0
  start = first
  while start <= last and offsets[start][0] <= start_char:  # the last token that begins at or before the answer
    start += 1
  end = last
  while end >= first and offsets[end][1] >= end_char:  # the first token that ends at or after it
    end -= 1
  return start - 1, end + 1


def train_features(questions: Sequence[str], contexts: Sequence[str], answers: Sequence[dict[str, list]],
                   tokenizer: Any, max_length: int, stride: int) -> dict[str, list]:
  """Training windows of question + context, with the first answer's token positions in each.

  Args:
    questions, contexts: one of each per example.
    answers: per example SQuAD's {'text': [...], 'answer_start': [...]}; the first answer is used.
    tokenizer: a Hugging Face fast tokenizer.
    max_length: tokens per window, special tokens included.
    stride: tokens of context that consecutive windows share.

  Returns:
    input_ids, token_type_ids, start_positions and end_positions (the answer's first and last token in that
    window; 0, the CLS token, when the answer is not wholly inside it or the example has no answer), one per window.
  """
  if len(answers) != len(contexts):
    raise ValueError(f'{len(answers)} answers for {len(contexts)} contexts: expected one answer dict per example')
  enc = _windows(questions, contexts, tokenizer, max_length, stride)
  starts, ends = [], []
  for i, offsets in enumerate(enc['offset_mapping']):
    answer = answers[enc['overflow_to_sample_mapping'][i]]
    if not answer['text']:
      start, end = 0, 0
    else:
      start_char = int(answer['answer_start'][0])
      first, last = _context_range(enc.sequence_ids(i))
      start, end = _answer_tokens(offsets, first, last, start_char, start_char + len(answer['text'][0]))
    starts.append(start)
    ends.append(end)
  return {'input_ids': enc['input_ids'], 'token_type_ids': enc['token_type_ids'], 'start_positions': starts,
          'end_positions': ends}


def eval_features(questions: Sequence[str], contexts: Sequence[str], tokenizer: Any, max_length: int,
                  stride: int) -> dict[str, list]:
  """Evaluation windows, as `train_features` cuts them.

  Returns:
    input_ids, token_type_ids; example_index: the example each window came from; offsets: per token its
    (start, end) characters in the context, None for question and special tokens.
  """
  enc = _windows(questions, contexts, tokenizer, max_length, stride)
  offsets = []
  for i, spans in enumerate(enc['offset_mapping']):
    ids = enc.sequence_ids(i)
    offsets.append([tuple(span) if ids[j] == 1 else None for j, span in enumerate(spans)])
  return {'input_ids': enc['input_ids'], 'token_type_ids': enc['token_type_ids'], 'offsets': offsets,
          'example_index': [int(k) for k in enc['overflow_to_sample_mapping']]}


def _window_best(start_L: np.ndarray, end_L: np.ndarray, inside_L: np.ndarray, n_best: int,
                 max_answer_length: int) -> tuple[float, int, int] | None:
  """(score, start, end) of the best span of one window among its n_best context starts and ends, or None."""
  context = np.flatnonzero(inside_L)
  if not context.size:
    return None
  starts = context[np.argsort(-start_L[context], kind='stable')[:n_best]]
  ends = context[np.argsort(-end_L[context], kind='stable')[:n_best]]
  score_SE = start_L[starts][:, None] + end_L[ends][None, :]
  length_SE = ends[None, :] - starts[:, None] + 1
  score_SE = np.where((length_SE >= 1) & (length_SE <= max_answer_length), score_SE, -np.inf)
  s, e = np.unravel_index(np.argmax(score_SE), score_SE.shape)
  if score_SE[s, e] == -np.inf:
    return None
  return float(score_SE[s, e]), int(starts[s]), int(ends[e])


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, features: dict[str, Any],
               contexts: Sequence[str], n_best: int = 20, max_answer_length: int = 30) -> list[str]:
  """The answer text of every example: its highest-scoring span over all its windows.

  A span's score is start logit + end logit; it must begin and end on context tokens, with end >= start and at
  most max_answer_length tokens. As Hugging Face's postprocessing, each window offers its n_best highest start
  and n_best highest end tokens (ranked among context tokens only) as candidates.

  Args:
    start_logits, end_logits: [windows, L], L at least each window's length (padding beyond it is ignored).
    features: `eval_features`' offsets and example_index.
    contexts: the examples' contexts.
    n_best: candidates per window for each of start and end.
    max_answer_length: the longest answer, in tokens.

  Returns:
    One answer per example, '' when no window offers a valid span.
  """
  start_WL, end_WL = np.asarray(start_logits, np.float64), np.asarray(end_logits, np.float64)
  windows = len(features['offsets'])
  if start_WL.shape != end_WL.shape or start_WL.ndim != 2 or start_WL.shape[0] != windows:
    raise ValueError(f'logits of shapes {start_WL.shape} and {end_WL.shape}: expected both [{windows}, length]')
  best: dict[int, tuple[float, str]] = {}
  for w, offsets in enumerate(features['offsets']):
    n = len(offsets)
    if n > start_WL.shape[1]:
      raise ValueError(f'window {w} has {n} tokens but logits only {start_WL.shape[1]}: expected at least {n}')
    inside_L = np.array([o is not None for o in offsets], bool)
    found = _window_best(start_WL[w, :n], end_WL[w, :n], inside_L, n_best, max_answer_length)
    example = int(features['example_index'][w])
    if found and (example not in best or found[0] > best[example][0]):
      score, s, e = found
      best[example] = (score, contexts[example][offsets[s][0]:offsets[e][1]])
  return [best[k][1] if k in best else '' for k in range(len(contexts))]
