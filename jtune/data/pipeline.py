"""Datasets -> checked splits, and the label helpers tasks share. Tasks (jtune/tasks/) tokenize them.

Caching: local files and the prepared corpora are read into Arrow under `cache_dir/datasets` (keyed by path and
modification time); tokenization is a `Dataset.map` whose result `datasets` caches next to that Arrow file under
a fingerprint of the data, the tokenizer and the task's settings, so a second run reads the token ids back.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator

import datasets
import numpy as np

from jtune import config as config_lib
from jtune.data import corpora

SUBSET_SEED = 0  # max_*_examples picks this fixed random subset, kept in dataset order


def _data_files(cfg: config_lib.DataConfig, wanted: tuple[str, ...]) -> dict[str, str]:
  """The files of the splits in `wanted` (others the config names are not looked at)."""
  if cfg.dataset in corpora.BUILDERS:
    return corpora.prepare(cfg.dataset, cfg.cache_dir)
  files = {split: path for split, path in cfg.data_files if split in wanted}
  for split, path in files.items():
    if not os.path.isfile(os.path.expanduser(path)):
      raise FileNotFoundError(f'config.data.data_files.{split}={path!r}: expected an existing '
                              f'{cfg.dataset} file')
  return {split: os.path.expanduser(path) for split, path in files.items()}


def _read_file(builder: str, split: str, path: str, cache: str) -> datasets.Dataset:
  """One split from one local file; each split is read on its own so their columns may differ."""
  kwargs = {'keep_default_na': False} if builder == 'csv' else {}
  empty = ValueError(f'split {split!r} of {builder!r} is empty ({path}): expected at least one example')
  if os.path.getsize(path) == 0:
    raise empty
  try:
    return datasets.load_dataset(builder, data_files={split: path}, cache_dir=cache, **kwargs)[split]
  except StopIteration as e:  # datasets' JSON reader on a file of blank lines
    raise empty from e
  except (datasets.exceptions.DatasetGenerationError, ValueError, UnicodeDecodeError) as e:
    cause = e.__cause__ or e
    if 'corresponds to no data' in str(cause):  # datasets' word for a file with a header and no rows
      raise empty from e
    raise ValueError(f'config.data.data_files.{split}={path!r}: cannot read it as {builder} '
                     f'({type(cause).__name__}: {config_lib.first_line(cause)})') from e


def _missing_split(split: str, cfg: config_lib.DataConfig, available) -> ValueError:
  return ValueError(f'split {split!r} not in {cfg.dataset!r} (splits: {", ".join(available)})')


def _load(cfg: config_lib.DataConfig) -> dict[str, datasets.Dataset]:
  """The train and eval splits as `datasets` reads them; only those two files are read."""
  cache = os.path.join(cfg.cache_dir, 'datasets')
  wanted = (cfg.train_split, cfg.eval_split)
  if cfg.dataset in corpora.BUILDERS or cfg.dataset in config_lib.FILE_FORMATS:
    builder = 'csv' if cfg.dataset in corpora.BUILDERS else cfg.dataset
    files = _data_files(cfg, wanted)
    if not files:
      raise ValueError(f'config.data.dataset={cfg.dataset!r}: expected config.data.data_files.train '
                       'and .validation paths')
    for split in wanted:
      if split not in files:
        raise _missing_split(split, cfg, files if cfg.dataset in corpora.BUILDERS else dict(cfg.data_files))
    return {split: _read_file(builder, split, files[split], cache) for split in wanted}
  try:
    loaded = datasets.load_dataset(cfg.dataset, cfg.dataset_config or None, cache_dir=cache)
  except (datasets.exceptions.DatasetNotFoundError, ConnectionError) as e:  # not on the Hub, or no Hub (offline)
    raise ValueError(
        f'config.data.dataset={cfg.dataset!r}: {config_lib.first_line(e)}: expected one of jtune\'s corpora '
        f'({", ".join(corpora.BUILDERS)}), a file format ({", ".join(config_lib.FILE_FORMATS)}) with '
        'config.data.data_files, or a dataset on the Hugging Face Hub (online)') from e
  for split in wanted:
    if split not in loaded:
      raise _missing_split(split, cfg, loaded)
  return {split: loaded[split] for split in wanted}


def check_columns(ds: datasets.Dataset, split: str, columns: list[str]) -> None:
  for column in columns:
    if column not in ds.column_names:
      raise ValueError(f'column {column!r} not in split {split!r} (columns: {", ".join(ds.column_names)})')


def check_texts(ds: datasets.Dataset, split: str, columns: list[str]) -> None:
  """Every value of `columns` a non-empty string."""
  for column in columns:
    for row, text in enumerate(_decoded(ds, split, column)):
      if not isinstance(text, str) or not text.strip():
        raise ValueError(f'split {split!r} row {row}: column {column!r} is {text!r}: expected non-empty text')


def _decoded(ds: datasets.Dataset, split: str, column: str) -> Iterator[Any]:
  """ds[column] read lazily; bytes that are not UTF-8 (Arrow's JSON reader keeps them) named by row."""
  values, row = iter(ds[column]), 0
  while True:
    try:
      text = next(values)
    except StopIteration:
      return
    except UnicodeDecodeError:  # datasets decodes a batch of rows at once: find the row from this one on
      column_data = ds.data.column(column)
      for bad in range(row, len(column_data)):
        try:
          column_data[bad].as_py()
        except UnicodeDecodeError as e:
          raise ValueError(f'split {split!r} row {bad}: column {column!r} is not UTF-8 text ({e.reason} at byte '
                           f'{e.start}): expected a UTF-8 file') from e
      raise
    yield text
    row += 1


def _is_missing(label) -> bool:
  """None, '', [] or a float NaN (what pandas and Arrow write for an empty number)."""
  return label is None or label == '' or label == [] or (isinstance(label, float) and math.isnan(label))


def check_labels(ds: datasets.Dataset, split: str, column: str) -> None:
  for row, label in enumerate(ds[column]):
    if _is_missing(label):
      raise ValueError(f'split {split!r} row {row}: column {column!r} is {label!r}: expected a label')


def check_text_and_label(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig) -> None:
  """Columns present, every text a non-empty string, every label present: what sentence tasks need."""
  texts = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
  check_columns(ds, split, texts + [cfg.label_column])
  check_texts(ds, split, texts)
  check_labels(ds, split, cfg.label_column)


def _subset(ds: datasets.Dataset, limit: int) -> datasets.Dataset:
  """`limit` rows drawn with a fixed seed (all when -1), kept in dataset order; a label-sorted file keeps
  every class, which its first `limit` rows would not."""
  if limit < 0 or limit >= len(ds):
    return ds
  rows = np.sort(np.random.default_rng(SUBSET_SEED).permutation(len(ds))[:limit])
  return ds.select(rows)


def load_splits(cfg: config_lib.DataConfig,
                check: Callable[[datasets.Dataset, str, config_lib.DataConfig], None] = check_text_and_label
                ) -> tuple[datasets.Dataset, datasets.Dataset]:
  """(train, eval): the two splits, checked by `check` (the task's; row numbers are the file's), then cut to
  max_train_examples and max_eval_examples. eval_split may name the train split: then eval is a subset of it.

  Raises:
    FileNotFoundError: a configured data file does not exist.
    ValueError: a split, column, text or label is missing, or a split is empty; the message names it.
  """
  loaded = _load(cfg)
  for split in dict.fromkeys((cfg.train_split, cfg.eval_split)):  # a split both sides name is checked once
    if len(loaded[split]) == 0:
      raise ValueError(f'split {split!r} of {cfg.dataset!r} is empty: expected at least one example')
    check(loaded[split], split, cfg)
  return (_subset(loaded[cfg.train_split], cfg.max_train_examples),
          _subset(loaded[cfg.eval_split], cfg.max_eval_examples))


def label_names(ds: datasets.Dataset, column: str) -> list[str]:
  """A ClassLabel's names, else the sorted distinct values as strings; position = class id."""
  feature = ds.features[column]
  if isinstance(feature, datasets.ClassLabel):
    return list(feature.names)
  values = ds[column]
  first = {}  # kind -> (row, value): the first row of each kind of label
  for row, value in enumerate(values):
    if isinstance(value, (list, dict)):
      raise ValueError(f"column {column!r} row {row} is {value!r}: expected one label per row, a string or a "
                       "number (several labels per row: task.name='multi_label')")
    first.setdefault(isinstance(value, str), (row, value))
  if len(first) > 1:
    (text_row, text), (number_row, number) = first[True], first[False]
    raise ValueError(f'column {column!r} mixes strings and numbers (row {text_row}: {text!r}, row {number_row}: '
                     f'{number!r}): expected labels of one kind')
  return [str(v) for v in sorted(set(values))]  # numbers in numeric order: 2 before 10


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
