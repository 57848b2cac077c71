"""What a task's preprocessing hands the batcher: ragged token columns, per-row columns and host-only extras."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

IGNORE = -100  # a label or target the loss skips (Hugging Face's convention)
# Padding value of a token column, where it is not 0; `input_ids` are padded with the tokenizer's pad id.
PAD_VALUES = {'labels': IGNORE, 'targets': IGNORE}
# Columns padded with the tokenizer's pad id.
PAD_ID_COLUMNS = ('input_ids', 'decoder_input_ids')


@dataclasses.dataclass(frozen=True)
class Features:
  """One preprocessed split, one entry per model input row.

  tokens: ragged per-token columns, object arrays of int32 arrays (`input_ids`, `token_type_ids`, token `labels`,
    causal-LM `targets`, `positions`, `segment_ids`, ...), all of a row's arrays of one length.
  rows: one value (or a fixed-size vector) per row: class `labels`, multi-hot labels, QA `start_positions`.
  lengths: tokens per row.
  host: what evaluation needs on the host and the device never sees (QA offsets and answers, prompts).
  masking: set for masked-LM splits, whose batches get corrupted `input_ids`, the `mlm_positions` to predict and
    their `labels` (jtune/data/masking.py) from their `units` column.
  target_tokens: a sequence-to-sequence split's decoder columns (`decoder_input_ids`, `targets`), ragged like
    `tokens` but of their own lengths `target_lengths`, so a batch pads them to a bucket of their own.
  compact_targets: set for causal-LM splits that predict only some tokens (a response): their batches carry the
    `target_positions` [B, P] that have a target, and the `targets` there only (batching.make_batch), so that the
    model runs its LM head at those positions only.
  """
  tokens: dict[str, np.ndarray]
  rows: dict[str, np.ndarray]
  lengths: np.ndarray
  host: dict[str, Any] = dataclasses.field(default_factory=dict)
  masking: Any = None  # a jtune.data.masking.Masking: batches of this split are masked-LM corrupted
  target_tokens: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  target_lengths: np.ndarray | None = None
  compact_targets: bool = False

  def __len__(self) -> int:
    return len(self.lengths)

  def take(self, rows: np.ndarray) -> 'Features':
    """The rows `rows` (any order, repeats allowed) as a new split; for splits without host data, whose
    entries are not all per row (a token task's label names)."""
    if self.host:
      raise ValueError(f'cannot take rows of a split with host data ({", ".join(self.host)})')
    return Features({k: v[rows] for k, v in self.tokens.items()}, {k: v[rows] for k, v in self.rows.items()},
                    self.lengths[rows], masking=self.masking,
                    target_tokens={k: v[rows] for k, v in self.target_tokens.items()},
                    target_lengths=None if self.target_lengths is None else self.target_lengths[rows],
                    compact_targets=self.compact_targets)

  @property
  def input_ids(self) -> np.ndarray:
    return self.tokens['input_ids']

  @property
  def labels(self) -> np.ndarray:
    return self.rows['labels'] if 'labels' in self.rows else self.tokens['labels']


def ragged(sequences: Sequence[Sequence[int]], dtype=np.int32) -> np.ndarray:
  """An object array of 1-D arrays, one per sequence."""
  out = np.empty(len(sequences), object)
  out[:] = [np.asarray(x, dtype) for x in sequences]
  return out


def lengths_of(column: np.ndarray) -> np.ndarray:
  return np.array([len(x) for x in column], np.int32)


MIN_POSITIONS = 16


def positions_count(most: int, length: int) -> int:
  """How many positions of each row a batch whose row with the most labels has `most` keeps (`compact`'s count):
  the smallest power of two, at least MIN_POSITIONS, that holds them, at most the row's `length`. Powers of two, so
  that a run compiles its steps for a few counts only."""
  return min(length, max(MIN_POSITIONS, 1 << max(most - 1, 0).bit_length()))


def compact(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
  """(positions [B, count], their labels [B, count]) of a [B, L] label column: each row's labelled positions (not
  IGNORE) in order, at most `count` of them, then position 0 with IGNORE in the slots left."""
  labelled = labels != IGNORE
  kept = labelled & (np.cumsum(labelled, axis=1) <= count)
  order = np.argsort(~kept, axis=1, kind='stable')[:, :count]  # kept positions first, in order
  valid = np.take_along_axis(kept, order, axis=1)
  positions = np.where(valid, order, 0).astype(np.int32)
  return positions, np.where(valid, np.take_along_axis(labels, order, axis=1), IGNORE).astype(np.int32)
