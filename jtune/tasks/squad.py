"""SQuAD v1.1: answer normalisation, exact match and F1 as the official evaluation script defines them; context
windows with character offsets for a fast tokenizer; and the best answer span over an example's windows."""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Sequence

import numpy as np


def normalize_answer(s: str) -> str:
  """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace (in the script's order)."""
  s = ''.join(ch for ch in s.lower() if ch not in set(string.punctuation))
  s = re.sub(r'\b(a|an|the)\b', ' ', s)
  return ' '.join(s.split())


def _f1_one(prediction: str, truth: str) -> float:
  pred_tokens, truth_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
  same = sum((collections.Counter(pred_tokens) & collections.Counter(truth_tokens)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred_tokens), same / len(truth_tokens)
  return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, ground_truths: Sequence[str]) -> float:
  return max(float(normalize_answer(prediction) == normalize_answer(t)) for t in ground_truths)


def f1(prediction: str, ground_truths: Sequence[str]) -> float:
  return max(_f1_one(prediction, t) for t in ground_truths)


def evaluate(predictions: dict[Any, str], references: dict[Any, Sequence[str]]) -> dict[str, float]:
  """Exact match and F1 in percent, averaged over the references' questions (a missing prediction scores 0)."""
  em = sum(exact_match(predictions[k], refs) for k, refs in references.items() if k in predictions)
  f = sum(f1(predictions[k], refs) for k, refs in references.items() if k in predictions)
  n = max(len(references), 1)
  return {'exact_match': 100.0 * em / n, 'f1': 100.0 * f / n}


def _windows(questions, contexts, tokenizer, max_length: int, stride: int):
  return tokenizer(list(questions), list(contexts), truncation='only_second', max_length=max_length, stride=stride,
                   return_overflowing_tokens=True, return_offsets_mapping=True, return_token_type_ids=True)


def _context_range(sequence_ids: list[int | None]) -> tuple[int, int]:
  """First and last token of the context (sequence 1)."""
  inside = [i for i, s in enumerate(sequence_ids) if s == 1]
  return inside[0], inside[-1]


def train_features(questions, contexts, answers, tokenizer, max_length: int, stride: int) -> dict[str, list]:
  """Windows of question + context; start/end_positions point at the first answer's tokens, or at token 0
  ([CLS]) when the answer is not wholly inside the window."""
  enc = _windows(questions, contexts, tokenizer, max_length, stride)
  starts, ends = [], []
  for i, offsets in enumerate(enc['offset_mapping']):
    answer = answers[enc['overflow_to_sample_mapping'][i]]
    start_char = answer['answer_start'][0]
    end_char = start_char + len(answer['text'][0])
    first, last = _context_range(enc.sequence_ids(i))
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
      starts.append(0)
      ends.append(0)
      continue
    start = first
    while start <= last and offsets[start][0] <= start_char:
      start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
      end -= 1
    starts.append(start - 1)
    ends.append(end + 1)
  return {'input_ids': enc['input_ids'], 'token_type_ids': enc['token_type_ids'], 'start_positions': starts,
          'end_positions': ends}


def eval_features(questions, contexts, tokenizer, max_length: int, stride: int) -> dict[str, list]:
  """Windows with `example_index` (the example each came from) and `offsets`: character spans of context tokens,
  None for question and special tokens."""
  enc = _windows(questions, contexts, tokenizer, max_length, stride)
  offsets = []
  for i, spans in enumerate(enc['offset_mapping']):
    ids = enc.sequence_ids(i)
    offsets.append([tuple(span) if ids[j] == 1 else None for j, span in enumerate(spans)])
  return {'input_ids': enc['input_ids'], 'token_type_ids': enc['token_type_ids'], 'offsets': offsets,
          'example_index': list(enc['overflow_to_sample_mapping'])}


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, features: dict[str, Any],
               contexts: Sequence[str], n_best: int = 20, max_answer_length: int = 30) -> list[str]:
  """The answer text of every example: over all its windows, the span with the highest start + end logit among
  the n_best starts and ends, end >= start, at most max_answer_length tokens, inside the context."""
  best: dict[int, tuple[float, str]] = {}
  for i, offsets in enumerate(features['offsets']):
    example = int(features['example_index'][i])
    n = len(offsets)
    start_row, end_row = np.asarray(start_logits[i][:n]), np.asarray(end_logits[i][:n])
    for s in np.argsort(start_row)[::-1][:n_best]:
      for e in np.argsort(end_row)[::-1][:n_best]:
        if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
          continue
        score = float(start_row[s] + end_row[e])
        if example not in best or score > best[example][0]:
          best[example] = (score, contexts[example][offsets[s][0]:offsets[e][1]])
  return [best[k][1] if k in best else '' for k in range(len(contexts))]
