"""Tokenized splits -> host-local numpy batches padded to a few bucket lengths.

Every process computes the same global batch order and takes only its own rows of each global batch (`local_rows`,
which the mesh decides: see `sharding.process_rows`). The bucket length is chosen from the global batch, so all
processes agree on the shape. With `group_by_length` (Hugging Face's option of that name), a training batch holds
rows of similar length, so that fewer batches pad up to a long bucket.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from jtune.data import masking
from jtune.data.features import IGNORE, PAD_ID_COLUMNS, PAD_VALUES, Features, compact, positions_count

Batch = dict[str, np.ndarray]


def bucket_length(max_len: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds `max_len` tokens."""
  for b in buckets:
    if max_len <= b:
      return b
  raise ValueError(f'sequence of {max_len} tokens is longer than the largest bucket {buckets[-1]}')


def _pad(columns: dict[str, np.ndarray], lengths: np.ndarray, rows: np.ndarray, length: int, pad_id: int
         ) -> Batch:
  batch = {}
  for name, column in columns.items():
    pad = pad_id if name in PAD_ID_COLUMNS else PAD_VALUES.get(name, 0)
    out = np.full((len(rows), length), pad, np.int32)
    for i, row in enumerate(rows):
      out[i, :lengths[row]] = column[row]
    batch[name] = out
  return batch


def lengths(split: Features, rows: np.ndarray, buckets: Sequence[int], target_buckets: Sequence[int] = ()
            ) -> tuple[int, int]:
  """(token length, target length) of a batch of `rows`: the buckets holding their longest rows (the target
  length is 0 for splits without decoder columns)."""
  length = bucket_length(int(split.lengths[rows].max()), buckets)
  if split.target_lengths is None:
    return length, 0
  return length, bucket_length(int(split.target_lengths[rows].max()), target_buckets)


def target_positions(split: Features, rows: np.ndarray, length: int) -> int:
  """How many positions of each row a `compact_targets` batch of `rows` padded to `length` predicts (0 for other
  splits): `features.positions_count` of the row with the most targets. SmolLM2's instruction tuning
  (configs/causal_lm.py, about four answers of two tokens in each packed 128-token row) predicts 16."""
  if not split.compact_targets:
    return 0
  return positions_count(max(int(np.count_nonzero(split.tokens['targets'][row] != IGNORE)) for row in rows),
                         length)


def make_batch(split: Features, rows: np.ndarray, length: int, pad_id: int,
               weights: np.ndarray | None = None, rng: np.random.Generator | None = None,
               target_length: int = 0, predictions: int | None = None) -> Batch:
  """Pads the token columns of `rows` of `split` to `length` tokens (its decoder columns to `target_length`)
  and takes their row columns.

  Adds `attention_mask` (1 on tokens, 0 on padding) and `weights` (per row; 0 for filler rows). A masked-LM
  split's batch is corrupted with `rng` (default: a fixed seed) and gets the `mlm_positions` to predict and their
  `labels` (masking.predictions). A `compact_targets` split's batch gets the `target_positions` [B, P] that have a
  target and its `targets` there (features.compact), P being `predictions` (None: `target_positions` of `rows`);
  with P = `length`, every position in order and the targets where they are.
  """
  n = len(rows)
  batch = _pad(split.tokens, split.lengths, rows, length, pad_id)
  if split.target_tokens:
    batch.update(_pad(split.target_tokens, split.target_lengths, rows, target_length, pad_id))
  batch['attention_mask'] = (np.arange(length)[None, :] < split.lengths[rows][:, None]).astype(np.int32)
  for name, column in split.rows.items():
    batch[name] = column[rows]
  batch['weights'] = np.ones(n, np.float32) if weights is None else weights
  if split.masking is not None:
    corrupted, labels = masking.mask(batch['input_ids'], batch.pop('units'), split.masking,
                                     rng or np.random.default_rng(0))
    batch['input_ids'], batch['mlm_positions'], batch['labels'] = masking.predictions(
        batch['input_ids'], corrupted, labels, masking.max_predictions(length, split.masking, labels))
  if split.compact_targets:
    count = target_positions(split, rows, length) if predictions is None else predictions
    if count < length:
      batch['target_positions'], batch['targets'] = compact(batch['targets'], count)
    else:  # every position, in order: the targets stay where they are
      batch['target_positions'] = np.broadcast_to(np.arange(length, dtype=np.int32), (len(rows), length)).copy()
  return batch


def group_by_length(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator
                    ) -> np.ndarray:
  """The first len(order) // batch_size batches of the shuffled rows `order`, regrouped by `lengths` (the input
  tokens'; a sequence-to-sequence split's target lengths play no part).

  As Hugging Face's LengthGroupedSampler does: `order` is cut into megabatches of min(50, len // (4 * batch_size))
  batches, each sorted by length (longest first) and cut into batches; then, unlike it, the batches are shuffled
  (`rng`), so that long and short ones alternate over the epoch, and the one holding the longest row goes first,
  so that a batch too long for the device's memory fails at the first step rather than hours in.
  """
  count = len(order) // batch_size
  if count == 0:
    raise ValueError(f'batch size {batch_size} is larger than the {len(order)} rows to group by length')
  mega = max(1, min(50, len(order) // (4 * batch_size))) * batch_size
  rows = order[:count * batch_size]
  rows = np.concatenate([chunk[np.argsort(-lengths[chunk], kind='stable')]
                         for chunk in np.split(rows, range(mega, len(rows), mega))])
  batches = rows.reshape(count, batch_size)[rng.permutation(count)]
  longest = int(np.argmax(lengths[batches[:, 0]]))
  batches[[0, longest]] = batches[[longest, 0]]
  return batches.reshape(-1)


def _local_rows(global_batch_size: int, local_rows: slice | None) -> slice:
  """Checks that `local_rows` (None: all) is a non-empty range inside the global batch."""
  if global_batch_size <= 0:
    raise ValueError(f'batch size {global_batch_size} is not positive')
  if local_rows is None:
    return slice(0, global_batch_size)
  if not 0 <= local_rows.start < local_rows.stop <= global_batch_size or local_rows.step not in (None, 1):
    raise ValueError(f'local rows {local_rows.start}:{local_rows.stop} are not a range inside the global batch '
                     f'of {global_batch_size}')
  return local_rows


class TrainIterator:
  """Endless, epoch-shuffled training batches; `get_state`/`set_state` resume at the exact batch."""

  def __init__(self, split: Features, global_batch_size: int, buckets: Sequence[int], seed: int,
               pad_id: int, local_rows: slice | None = None, target_buckets: Sequence[int] = (),
               group_by_length: bool = False):
    """`local_rows`: the rows of each global batch this process feeds (None: all of them);
    `target_buckets`: the lengths a sequence-to-sequence split's decoder columns are padded to;
    `group_by_length`: each epoch's batches made of rows of similar length (the module's `group_by_length`)."""
    self._local = _local_rows(global_batch_size, local_rows)
    self._split, self._batch, self._buckets = split, global_batch_size, tuple(buckets)
    self._target_buckets = tuple(target_buckets)
    self._seed, self._pad_id, self._group = seed, pad_id, group_by_length
    self.epoch, self.index = 0, 0
    self._order, self._order_epoch = None, -1

  @property
  def local_rows(self) -> slice:
    return self._local

  @property
  def steps_per_epoch(self) -> int:
    """Full global batches per epoch; the last incomplete one is dropped."""
    return len(self._split) // self._batch

  def get_state(self) -> dict[str, int | bool]:
    return {'epoch': self.epoch, 'index': self.index, 'group_by_length': self._group, 'batch_size': self._batch}

  def set_state(self, state: dict[str, int | bool]) -> None:
    """Continues at batch `index` of epoch `epoch`, as `get_state` reported them, in the same order: a state saved
    with another global batch size, or the other `group_by_length` (or before jtune had it: False), is an error,
    since the rest of its epoch would see some rows twice and others not at all."""
    epoch, index = int(state['epoch']), int(state['index'])
    if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
      raise ValueError(f'iterator state {state} is out of range: expected epoch >= 0 and index in '
                       f'[0, {self.steps_per_epoch}]')
    saved_batch = int(state.get('batch_size', self._batch))  # states saved before jtune kept it: not checked
    if saved_batch != self._batch:
      raise ValueError(f'iterator state {state} was saved with train.batch_size={saved_batch}: expected the same '
                       f'global batch size to resume it (--config.train.batch_size={saved_batch}), since its '
                       f'epoch is cut into batches of that size')
    grouped = bool(state.get('group_by_length', False))
    if grouped != self._group:
      raise ValueError(f'iterator state {state} was saved with data.group_by_length={grouped}: expected the same '
                       f'setting to resume it (--config.data.group_by_length={grouped})')
    self.epoch, self.index = epoch, index

  def _epoch_order(self) -> np.ndarray:
    if self._order_epoch != self.epoch:
      rng = np.random.default_rng([self._seed, self.epoch])
      self._order = rng.permutation(len(self._split))
      if self._group:
        self._order = group_by_length(self._order, self._split.lengths, self._batch, rng)
      self._order_epoch = self.epoch
    return self._order

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    if self.steps_per_epoch == 0:
      raise ValueError(f'batch size {self._batch} is larger than the {len(self._split)} training examples')
    if self.index >= self.steps_per_epoch:
      self.epoch, self.index = self.epoch + 1, 0
    rows = self._epoch_order()[self.index * self._batch:(self.index + 1) * self._batch]
    self.index += 1
    length, target_length = lengths(self._split, rows, self._buckets, self._target_buckets)
    rng = np.random.default_rng([self._seed, self.epoch, self.index])  # masked LM
    return _local_batch(self._split, rows, self._local, length, self._pad_id, None, rng, target_length)


def eval_batches(split: Features, global_batch_size: int, buckets: Sequence[int], pad_id: int,
                 local_rows: slice | None = None, target_buckets: Sequence[int] = ()) -> Iterator[Batch]:
  """Batches in dataset order; the last is filled with weight-0 copies so every example counts once."""
  local = _local_rows(global_batch_size, local_rows)
  n = len(split)
  for start in range(0, n, global_batch_size):
    rows = np.arange(start, min(start + global_batch_size, n))
    weights = np.ones(global_batch_size, np.float32)
    weights[len(rows):] = 0.0
    rows = np.concatenate([rows, np.full(global_batch_size - len(rows), rows[0])])
    length, target_length = lengths(split, rows, buckets, target_buckets)
    yield _local_batch(split, rows, local, length, pad_id, weights,
                       np.random.default_rng(start),  # the same masks at every evaluation
                       target_length)


def _local_batch(split: Features, rows: np.ndarray, local: slice, length: int, pad_id: int,
                 weights: np.ndarray | None, rng: np.random.Generator, target_length: int) -> Batch:
  """This process's `local` rows of the global batch of `rows`. A masked-LM split's masks are drawn for the whole
  global batch, then cut, so that they do not depend on how many processes feed it; the number of target positions
  is the global batch's, so that every process's batch has the same shape."""
  if split.masking is None:
    return make_batch(split, rows[local], length, pad_id, None if weights is None else weights[local], rng,
                      target_length, target_positions(split, rows, length))
  batch = make_batch(split, rows, length, pad_id, weights, rng, target_length)
  return {name: column[local] for name, column in batch.items()}
