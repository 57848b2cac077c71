"""Datasets -> checked, label-encoded, tokenized splits (tokenized once, cached by `datasets`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import datasets
import numpy as np

from jtune import config as config_lib
from jtune.data import corpora

FILE_FORMATS = ('csv', 'json', 'parquet')


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """One tokenized split: ragged token ids (object arrays of int32 arrays) and int32 labels."""
  input_ids: np.ndarray
  token_type_ids: np.ndarray
  labels: np.ndarray
  lengths: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


def _data_files(cfg: config_lib.DataConfig) -> dict[str, str]:
  if cfg.dataset in corpora.BUILDERS:
    return corpora.prepare(cfg.dataset, cfg.cache_dir)
  files = dict(cfg.data_files)
  for split, path in files.items():
    if not os.path.isfile(os.path.expanduser(path)):
      raise FileNotFoundError(f'config.data.data_files.{split}={path!r}: expected an existing '
                              f'{cfg.dataset} file')
  return {split: os.path.expanduser(path) for split, path in files.items()}


def _read_file(builder: str, split: str, path: str, cache: str) -> datasets.Dataset:
  """One split from one local file; each split is read on its own so their columns may differ."""
  kwargs = {'keep_default_na': False} if builder == 'csv' else {}
  try:
    return datasets.load_dataset(builder, data_files={split: path}, cache_dir=cache, **kwargs)[split]
  except (datasets.exceptions.DatasetGenerationError, ValueError, UnicodeDecodeError) as e:
    cause = e.__cause__ or e
    if 'corresponds to no data' in str(cause):  # datasets' word for a file with a header and no rows
      raise ValueError(f'split {split!r} of {builder!r} is empty ({path}): expected at least one example'
                       ) from e
    raise ValueError(f'config.data.data_files.{split}={path!r}: cannot read it as {builder} '
                     f'({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ""})') from e


def _load(cfg: config_lib.DataConfig) -> dict[str, datasets.Dataset]:
  cache = os.path.join(cfg.cache_dir, 'datasets')
  if cfg.dataset in corpora.BUILDERS or cfg.dataset in FILE_FORMATS:
    builder = 'csv' if cfg.dataset in corpora.BUILDERS else cfg.dataset
    files = _data_files(cfg)
    if not files:
      raise ValueError(f'config.data.dataset={cfg.dataset!r}: expected config.data.data_files.train '
                       'and .validation paths')
    return {split: _read_file(builder, split, path, cache) for split, path in files.items()}
  return dict(datasets.load_dataset(cfg.dataset, cfg.dataset_config or None, cache_dir=cache))


def _check_split(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig) -> None:
  """Columns present, split not empty, every text a non-empty string."""
  columns = [cfg.text_column, cfg.label_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
  for column in columns:
    if column not in ds.column_names:
      raise ValueError(f'column {column!r} not in split {split!r} (columns: {", ".join(ds.column_names)})')
  if len(ds) == 0:
    raise ValueError(f'split {split!r} of {cfg.dataset!r} is empty: expected at least one example')
  for column in columns[:1] + columns[2:]:
    for row, text in enumerate(ds[column]):
      if not isinstance(text, str) or not text.strip():
        raise ValueError(f'split {split!r} row {row}: column {column!r} is {text!r}: expected non-empty text')


def load_splits(cfg: config_lib.DataConfig) -> dict[str, datasets.Dataset]:
  """The train and eval splits, checked and cut to max_train_examples / max_eval_examples."""
  loaded = _load(cfg)
  out = {}
  for split, limit in ((cfg.train_split, cfg.max_train_examples), (cfg.eval_split, cfg.max_eval_examples)):
    if split not in loaded:
      raise ValueError(f'split {split!r} not in {cfg.dataset!r} (splits: {", ".join(loaded)})')
    ds = loaded[split]
    if limit > 0:
      ds = ds.select(range(min(limit, len(ds))))
    _check_split(ds, split, cfg)
    out[split] = ds
  return out


def label_names(ds: datasets.Dataset, column: str) -> list[str]:
  """A ClassLabel's names, else the sorted distinct values as strings; position = class id."""
  feature = ds.features[column]
  if isinstance(feature, datasets.ClassLabel):
    return list(feature.names)
  return sorted({str(v) for v in ds[column]})


def encode_labels(ds: datasets.Dataset, split: str, column: str, names: list[str]) -> np.ndarray:
  """int32 class ids; a value outside the label set is an error naming the split and row."""
  is_class_label = isinstance(ds.features[column], datasets.ClassLabel)
  ids = {name: i for i, name in enumerate(names)}
  out = np.empty(len(ds), np.int32)
  for row, value in enumerate(ds[column]):
    key = names[value] if is_class_label and 0 <= value < len(names) else str(value)
    if key not in ids:
      raise ValueError(f'label {value!r} in split {split!r} row {row} is not in the label set {names}')
    out[row] = ids[key]
  return out


def tokenize(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, tokenizer: Any,
             names: list[str]) -> Tokenized:
  """Tokenizes once (datasets caches the result by fingerprint), truncating to max_length."""
  labels = encode_labels(ds, split, cfg.label_column, names)

  def encode(batch):
    pair = batch[cfg.text_pair_column] if cfg.text_pair_column else None
    enc = tokenizer(batch[cfg.text_column], pair, truncation=True, max_length=cfg.max_length,
                    return_token_type_ids=True, return_attention_mask=False)
    return {'input_ids': enc['input_ids'], 'token_type_ids': enc['token_type_ids']}

  enc = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f'Tokenizing {split}')

  def ragged(column):
    out = np.empty(len(enc), object)
    out[:] = [np.asarray(x, np.int32) for x in enc[column]]
    return out

  input_ids = ragged('input_ids')
  return Tokenized(input_ids=input_ids, token_type_ids=ragged('token_type_ids'), labels=labels,
                   lengths=np.array([len(x) for x in input_ids], np.int32))
