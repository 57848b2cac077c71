"""Entity-level precision, recall and F1 for tag sequences, as conlleval and seqeval (default mode) count them.

An entity is a maximal run of tokens of one type: it starts at B-X (or S-X), at I-X / E-X after O or after a tag of
another type, and ends before the next tag that does not continue it. Tags: IOB1, IOB2, IOE and IOBES
(`B-`, `I-`, `E-`, `S-` prefixes, `O` outside). A predicted entity counts only if its type, first and last token
all match a true one.
"""

from __future__ import annotations

from typing import Sequence


def _split(tag: str) -> tuple[str, str]:
  """'B-PER' -> ('B', 'PER'); 'O' -> ('O', '_')."""
  if tag == 'O':
    return 'O', '_'
  prefix, sep, kind = tag.partition('-')
  return (prefix, kind) if sep else (prefix, '_')


def _ends(prev: str, tag: str, prev_type: str, kind: str) -> bool:
  return (prev in ('E', 'S') or (prev in ('B', 'I') and tag in ('B', 'S', 'O'))
          or (prev != 'O' and prev_type != kind))


def _starts(prev: str, tag: str, prev_type: str, kind: str) -> bool:
  return (tag in ('B', 'S') or (prev in ('E', 'S', 'O') and tag in ('E', 'I'))
          or (tag != 'O' and prev_type != kind))


def spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
  """The entities of one sentence: (type, first token, last token + 1)."""
  out, start = [], 0
  prev, prev_type = 'O', '_'
  for i, tag in enumerate(list(tags) + ['O']):
    prefix, kind = _split(tag)
    if _ends(prev, prefix, prev_type, kind):
      out.append((prev_type, start, i))
    if _starts(prev, prefix, prev_type, kind):
      start = i
    prev, prev_type = prefix, kind
  return out


def _prf(correct: int, predicted: int, actual: int) -> tuple[float, float, float]:
  precision = correct / predicted if predicted else 0.0
  recall = correct / actual if actual else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return precision, recall, f1


def scores(true: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
  """Micro precision/recall/F1 over all entities, per-type scores and support, and token accuracy.

  Args:
    true, pred: one tag sequence per sentence, of equal lengths; entities never span sentences.
  """
  if len(true) != len(pred) or any(len(t) != len(p) for t, p in zip(true, pred)):
    raise ValueError('true and predicted tag sequences differ in number or length: expected one predicted tag '
                     'per true tag')
  gold = {(s, *e) for s, sentence in enumerate(true) for e in spans(sentence)}
  found = {(s, *e) for s, sentence in enumerate(pred) for e in spans(sentence)}
  per_type = {}
  for kind in sorted({e[1] for e in gold | found}):
    g = {e for e in gold if e[1] == kind}
    f = {e for e in found if e[1] == kind}
    p, r, f1 = _prf(len(g & f), len(f), len(g))
    per_type[kind] = {'precision': p, 'recall': r, 'f1': f1, 'support': len(g)}
  precision, recall, f1 = _prf(len(gold & found), len(found), len(gold))
  tokens = sum(len(t) for t in true)
  same = sum(a == b for t, p in zip(true, pred) for a, b in zip(t, p))
  return {'precision': precision, 'recall': recall, 'f1': f1, 'accuracy': same / tokens if tokens else 0.0,
          'per_type': per_type}
