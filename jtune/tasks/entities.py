"""Entity-level precision, recall and F1 for tag sequences, as conlleval and seqeval (default mode) count them.

Tags are `O` or a prefix `B-`, `I-`, `E-`, `S-` and a type (IOB1, IOB2, IOE, IOBES). An entity is a run of
tokens of one type: it starts at B-X or S-X, at I-X / E-X after O, E-, S- or a tag of another type (so an I- with
no B- before it starts one), and ends after E-X or S-X, or before the next B-, S-, O or tag of another type. These
are conlleval's startOfChunk / endOfChunk rules, which seqeval 1.2.2 (`get_entities`, not strict mode) copies. A
predicted entity counts only if its type, first and last token all match a true one of the same sentence.
"""

from __future__ import annotations

from collections.abc import Sequence

PREFIXES = ('B', 'I', 'E', 'S')


def parse_tag(tag: str) -> tuple[str, str]:
  """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''); a bare 'B' -> ('B', '_') as seqeval reads it.

  Raises:
    ValueError: a tag of another scheme (IO's bare 'PER', BILOU's 'U-PER' and 'L-PER') or malformed.
  """
  if tag == 'O':
    return 'O', ''
  prefix, sep, kind = tag.partition('-')
  if prefix not in PREFIXES or (sep and not kind):
    raise ValueError(f'bad tag {tag!r}: expected O or one of B-, I-, E-, S- followed by an entity type '
                     '(IOB1, IOB2, IOE or IOBES tags)')
  return prefix, kind or '_'


def _ends(prev: str, tag: str, prev_type: str, kind: str) -> bool:
  """Whether an entity ended on the previous token (conlleval's endOfChunk)."""
  return (prev in ('E', 'S') or (prev in ('B', 'I') and tag in ('B', 'S', 'O'))
          or (prev != 'O' and prev_type != kind))


def _starts(prev: str, tag: str, prev_type: str, kind: str) -> bool:
  """Whether an entity starts on this token (conlleval's startOfChunk)."""
  return (tag in ('B', 'S') or (prev in ('E', 'S', 'O') and tag in ('E', 'I'))
          or (tag != 'O' and prev_type != kind))


def spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
  """The entities of one sentence as (type, first token, last token + 1), in order."""
  out, start = [], 0
  prev, prev_type = 'O', ''
  for i, tag in enumerate([*tags, 'O']):
    prefix, kind = parse_tag(tag)
    if _ends(prev, prefix, prev_type, kind):
      out.append((prev_type, start, i))
    if _starts(prev, prefix, prev_type, kind):
      start = i
    prev, prev_type = prefix, kind
  return out


def _prf(correct: int, predicted: int, actual: int) -> tuple[float, float, float]:
  """Precision, recall and F1 from counts; a zero denominator gives 0."""
  precision = correct / predicted if predicted else 0.0
  recall = correct / actual if actual else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return precision, recall, f1


def _check_lengths(true: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> None:
  if len(true) != len(pred):
    raise ValueError(f'{len(pred)} predicted sentences for {len(true)} true ones: expected one per true sentence')
  for s, (t, p) in enumerate(zip(true, pred)):
    if len(t) != len(p):
      raise ValueError(f'sentence {s} has {len(p)} predicted tags for {len(t)} true ones: expected one per token')


def scores(true: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
  """Entity-level scores over sentences; entities never span two sentences.

  Args:
    true: the gold tags, one list per sentence.
    pred: the predicted tags, as many per sentence as `true`.

  Returns:
    {'precision', 'recall', 'f1'}: micro averages over all entities; 'accuracy': the fraction of tokens whose tag
    is right; 'per_type': {type: {'precision', 'recall', 'f1', 'support'}} for every type seen in either, support
    being the number of true entities of that type.
  """
  _check_lengths(true, pred)
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
