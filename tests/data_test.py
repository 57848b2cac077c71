"""Corpora, loading and checks, tokenization, bucketing, resumable and host-sharded batches."""

import dataclasses
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import transformers

from configs import bert_cls
from jtune import config as config_lib
from jtune.data import batching, corpora, pipeline


@pytest.fixture(scope='module')
def tokenizer(minilm_dir):
  return transformers.AutoTokenizer.from_pretrained(minilm_dir)


def _data_cfg(cache_dir, **kw) -> config_lib.DataConfig:
  cfg = config_lib.from_config_dict(bert_cls.get_config('tiny')).data
  return dataclasses.replace(cfg, cache_dir=cache_dir, **kw)


def test_polarity_split_is_fixed(cache_dir):
  paths = corpora.prepare('polarity', cache_dir)
  frames = {s: pd.read_csv(p, keep_default_na=False) for s, p in paths.items()}
  assert {s: len(f) for s, f in frames.items()} == {'train': 3200, 'validation': 400, 'test': 400}
  train = frames['train']
  assert set(train.label) == {'negative', 'positive'}
  assert abs((train.label == 'positive').mean() - 0.5) < 0.02
  texts = [set(f.text) for f in frames.values()]
  assert not (texts[0] & texts[1]) and not (texts[0] & texts[2])
  assert train.text[0].startswith('it has more than a few moments that are insightful enough to')
  assert hashlib.sha256(json.dumps(train.values.tolist()).encode()).hexdigest()[:16] == '02558a5c86f1ffbc'
  assert (frames['validation'].label == 'positive').sum() == 207  # majority class rate 51.75%


def test_bbc_news(cache_dir):
  frames = [pd.read_csv(p, keep_default_na=False) for p in corpora.prepare('bbc_news', cache_dir).values()]
  assert sum(len(f) for f in frames) == 2225
  assert set(frames[0].label) == {'business', 'entertainment', 'politics', 'sports', 'tech'}


def _write(tmp_path, fmt, rows):
  df = pd.DataFrame(rows, columns=['label', 'text', 'text2'])
  path = tmp_path / f'data.{fmt}'
  if fmt == 'csv':
    df.to_csv(path, index=False)
  elif fmt == 'json':
    df.to_json(path, orient='records', lines=True)
  else:
    df.to_parquet(path)
  return str(path)


ROWS = [('yes', 'a fine film', 'truly'), ('no', 'a dull film', 'sadly'), ('yes', 'great', 'indeed')]


@pytest.mark.parametrize('fmt', ['csv', 'json', 'parquet'])
def test_local_files_and_text_pairs(tmp_path, cache_dir, tokenizer, fmt):
  path = _write(tmp_path, fmt, ROWS)
  cfg = _data_cfg(cache_dir, dataset=fmt, data_files=(('train', path), ('validation', path)),
                  text_pair_column='text2')
  splits = pipeline.load_splits(cfg)
  names = pipeline.label_names(splits['train'], 'label')
  assert names == ['no', 'yes']
  tok = pipeline.tokenize(splits['train'], 'train', cfg, tokenizer, names)
  assert list(tok.labels) == [1, 0, 1]
  assert tok.token_type_ids[0].max() == 1  # the pair is the second segment
  assert tok.lengths[0] == len(tokenizer('a fine film', 'truly')['input_ids'])


@pytest.mark.parametrize('case,error,needle', [
    ('missing_file', FileNotFoundError, 'config.data.data_files.train='),
    ('missing_column', ValueError, "column 'text' not in split 'train' (columns: label, sentence"),
    ('empty_split', ValueError, "split 'validation' of 'csv' is empty"),
    ('empty_text', ValueError, "split 'train' row 1: column 'text' is ''"),
    ('missing_split', ValueError, "split 'validation' not in 'csv' (splits: train)"),
])
def test_bad_data(tmp_path, cache_dir, case, error, needle):
  good = _write(tmp_path, 'csv', ROWS)
  files = {'train': good, 'validation': good}
  if case == 'missing_file':
    files['train'] = str(tmp_path / 'nope.csv')
  elif case == 'missing_column':
    (tmp_path / 'b.csv').write_text('label,sentence\nyes,fine\n')
    files['train'] = str(tmp_path / 'b.csv')
  elif case == 'empty_split':
    (tmp_path / 'b.csv').write_text('label,text\n')
    files['validation'] = str(tmp_path / 'b.csv')
  elif case == 'empty_text':
    (tmp_path / 'b.csv').write_text('label,text\nyes,fine\nno,\n')
    files['train'] = str(tmp_path / 'b.csv')
  elif case == 'missing_split':
    del files['validation']
  cfg = _data_cfg(cache_dir, dataset='csv', data_files=tuple(files.items()))
  with pytest.raises(error) as e:
    pipeline.load_splits(cfg)
  assert needle in str(e.value)


def test_label_outside_the_label_set(tmp_path, cache_dir):
  (tmp_path / 'v.csv').write_text('label,text\nyes,fine\nmaybe,odd\n')
  cfg = _data_cfg(cache_dir, dataset='csv',
                  data_files=(('train', _write(tmp_path, 'csv', ROWS)), ('validation', str(tmp_path / 'v.csv'))))
  splits = pipeline.load_splits(cfg)
  with pytest.raises(ValueError, match=r"label 'maybe' in split 'validation' row 1 is not in the label set "
                                       r"\['no', 'yes'\]"):
    pipeline.encode_labels(splits['validation'], 'validation', 'label', ['no', 'yes'])


def _toy_split(lengths, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.empty(len(lengths), object)
  ids[:] = [rng.integers(1, 100, n).astype(np.int32) for n in lengths]
  types = np.empty(len(lengths), object)
  types[:] = [np.zeros(n, np.int32) for n in lengths]
  return pipeline.Tokenized(input_ids=ids, token_type_ids=types,
                            labels=np.arange(len(lengths), dtype=np.int32),
                            lengths=np.asarray(lengths, np.int32))


def test_bucket_length():
  assert [batching.bucket_length(n, (16, 32)) for n in (1, 16, 17, 32)] == [16, 16, 32, 32]
  with pytest.raises(ValueError, match='33 tokens is longer than the largest bucket 32'):
    batching.bucket_length(33, (16, 32))


def test_train_iterator_epochs_and_padding():
  split = _toy_split(np.random.default_rng(1).integers(2, 30, 37))
  it = batching.TrainIterator(split, 8, (16, 32), seed=3, process_index=0, process_count=1, pad_id=0)
  assert it.steps_per_epoch == 4  # 37 // 8, the last partial batch dropped
  epochs = [[next(it) for _ in range(4)] for _ in range(2)]
  for epoch in epochs:
    seen = np.concatenate([b['labels'] for b in epoch])
    assert len(set(seen)) == 32  # no example twice within an epoch
    for b in epoch:
      length = b['input_ids'].shape[1]
      assert length == batching.bucket_length(int(split.lengths[b['labels']].max()), (16, 32))
      np.testing.assert_array_equal(b['attention_mask'].sum(1), split.lengths[b['labels']])
      assert (b['input_ids'][b['attention_mask'] == 0] == 0).all()
  assert not np.array_equal(epochs[0][0]['labels'], epochs[1][0]['labels'])
  again = batching.TrainIterator(split, 8, (16, 32), seed=3, process_index=0, process_count=1, pad_id=0)
  np.testing.assert_array_equal(next(again)['labels'], epochs[0][0]['labels'])


def test_train_iterator_resumes_exactly():
  split = _toy_split([5] * 40)
  make = lambda: batching.TrainIterator(split, 8, (16,), 0, 0, 1, 0)  # noqa: E731
  it = make()
  for _ in range(7):  # into the second epoch
    next(it)
  state = it.get_state()
  assert state == {'epoch': 1, 'index': 2}
  expected = [next(it)['labels'] for _ in range(5)]
  resumed = make()
  resumed.set_state(json.loads(json.dumps(state)))
  for want in expected:
    np.testing.assert_array_equal(next(resumed)['labels'], want)


def test_processes_take_their_share_of_each_global_batch():
  split = _toy_split(np.random.default_rng(2).integers(2, 30, 64))
  whole = batching.TrainIterator(split, 16, (16, 32), 5, 0, 1, 0)
  parts = [batching.TrainIterator(split, 16, (16, 32), 5, p, 2, 0) for p in range(2)]
  for _ in range(5):
    w, a, b = next(whole), next(parts[0]), next(parts[1])
    for key in w:
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), w[key])


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_counts_every_example_once(process_count):
  split = _toy_split(np.random.default_rng(3).integers(2, 30, 21))
  batches = [list(batching.eval_batches(split, 8, (16, 32), p, process_count, 0))
             for p in range(process_count)]
  assert all(len(b) == 3 for b in batches)
  weights = np.concatenate([b['weights'] for proc in batches for b in proc])
  labels = np.concatenate([b['labels'] for proc in batches for b in proc])
  assert weights.sum() == 21
  assert sorted(labels[weights > 0]) == list(range(21))
  assert all(b['labels'].shape == (8 // process_count,) for proc in batches for b in proc)
