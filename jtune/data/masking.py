"""BERT's masked-LM corruption of a batch, on the host as each batch is assembled (dynamic masking, as Hugging
Face's DataCollatorForLanguageModeling): new masks every time a row is seen, deterministic per batch seed.

Of the tokens a row may lose (not [CLS], [SEP] or padding), `probability` are chosen; of those 80% become
[MASK], 10% a random token and 10% stay, and the chosen tokens' original ids become the labels (IGNORE
elsewhere). Whole-word masking chooses words instead of tokens and masks every piece of a chosen word.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jtune.data.features import IGNORE, compact, positions_count

# The per-token `units` column: what each token is to the masker.
SPECIAL, WORD_START, CONTINUATION = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Masking:
  mask_token_id: int
  vocab_size: int  # random replacements are drawn from [0, vocab_size)
  probability: float = 0.15
  whole_word: bool = False


def token_units(word_ids: list[int | None]) -> list[int]:
  """The `units` column from a fast tokenizer's word_ids(): SPECIAL where None, WORD_START on a word's first
  token, CONTINUATION on its other pieces."""
  out, previous = [], None
  for word in word_ids:
    out.append(SPECIAL if word is None else CONTINUATION if word == previous else WORD_START)
    previous = word
  return out


def mask(input_ids: np.ndarray, units: np.ndarray, spec: Masking, rng: np.random.Generator
         ) -> tuple[np.ndarray, np.ndarray]:
  """(corrupted input ids, labels) for a padded [B, L] batch; padding has units SPECIAL."""
  draw = rng.random(input_ids.shape)
  if spec.whole_word:
    # a word is chosen by the draw at its first token; its pieces inherit that choice
    starts = np.where(units == WORD_START, np.arange(units.shape[1])[None, :], 0)
    first = np.maximum.accumulate(starts, axis=1)
    chosen = (np.take_along_axis(draw, first, axis=1) < spec.probability) & (units != SPECIAL)
  else:
    chosen = (draw < spec.probability) & (units != SPECIAL)
  labels = np.where(chosen, input_ids, IGNORE).astype(np.int32)
  action = rng.random(input_ids.shape)
  random_ids = rng.integers(0, spec.vocab_size, input_ids.shape)
  corrupted = np.where(chosen & (action < 0.8), spec.mask_token_id, input_ids)
  corrupted = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, corrupted)
  return corrupted.astype(np.int32), labels


def max_predictions(length: int, spec: Masking, labels: np.ndarray | None = None) -> int:
  """How many positions of each `length`-token row the masked-LM head predicts: min(length, ceil(2 * probability *
  length) + 8), 47 of 128 at 15% (BERT's own pretraining data predicted at most 20 of 128). The head's vocabulary
  product, a fifth of BERT-base's step, then runs on those positions only (`predictions`). Whole-word masking:
  `features.positions_count` of the batch's row with the most masks in `labels` (`mask`'s [B, L] output for the
  whole global batch), never fewer than a row has, since one chosen word may have any number of pieces (a DNA
  string of 21 in a 26-token row) and a cap would unmask part of it; without `labels`, `length`."""
  if spec.whole_word:
    return length if labels is None else positions_count(int(np.max(np.sum(labels != IGNORE, axis=1))), length)
  return min(length, math.ceil(2 * spec.probability * length) + 8)


def predictions(input_ids: np.ndarray, corrupted: np.ndarray, labels: np.ndarray, count: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(corrupted ids, positions [B, count], their labels [B, count]) from `mask`'s [B, L] output: each row's chosen
  positions in order, then position 0 with IGNORE. A row with more than `count` chosen tokens keeps its first
  `count` and gets the others' original ids back, as if they had not been chosen: 2e-10 of the rows at 15% and
  length 128 with `max_predictions`' count (a binomial tail)."""
  chosen = labels != IGNORE
  kept = chosen & (np.cumsum(chosen, axis=1) <= count)
  corrupted = np.where(chosen & ~kept, input_ids, corrupted).astype(np.int32)
  return (corrupted, *compact(labels, count))
