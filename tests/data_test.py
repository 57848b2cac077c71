"""Corpora, loading and checks, tokenization, bucketing, resumable and host-sharded batches."""

import dataclasses
import hashlib
import json
import os
import re

import datasets
import numpy as np
import pandas as pd
import pytest
import transformers

from configs import bert_cls
from jtune import config as config_lib
from jtune.data import batching, corpora, masking, pipeline
from jtune.data.features import Features
from jtune.tasks import classification


@pytest.fixture(scope='module')
def tokenizer(minilm_dir):
  return transformers.AutoTokenizer.from_pretrained(minilm_dir)


def _data_cfg(cache_dir, **kw) -> config_lib.DataConfig:
  cfg = config_lib.from_config_dict(bert_cls.get_config('tiny')).data
  return dataclasses.replace(cfg, cache_dir=str(cache_dir), **kw)


def _read(paths):
  return {s: pd.read_csv(p, keep_default_na=False) for s, p in paths.items()}


def _digest(frame):
  return hashlib.sha256(json.dumps(frame.values.tolist()).encode()).hexdigest()[:16]


def test_polarity_split_is_fixed(cache_dir):
  frames = _read(corpora.prepare('polarity', cache_dir))
  assert {s: len(f) for s, f in frames.items()} == {'train': 3200, 'validation': 400, 'test': 400}
  train = frames['train']
  assert set(train.label) == {'negative', 'positive'}
  assert abs((train.label == 'positive').mean() - 0.5) < 0.02
  texts = [set(f.text) for f in frames.values()]
  assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
  assert train.text[0].startswith('it has more than a few moments that are insightful enough to')
  assert _digest(train) == '02558a5c86f1ffbc'
  assert (frames['validation'].label == 'positive').sum() == 207  # majority class rate 51.75%


def test_bbc_news_keeps_repeated_articles_in_one_split(cache_dir):
  frames = _read(corpora.prepare('bbc_news', cache_dir))
  assert {s: len(f) for s, f in frames.items()} == {'train': 1798, 'validation': 214, 'test': 213}
  assert sum(len(set(f.text)) for f in frames.values()) == 2125  # 100 articles appear twice
  for f in frames.values():
    assert set(f.label) == {'business', 'entertainment', 'politics', 'sports', 'tech'}
  texts = [set(f.text) for f in frames.values()]
  assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
  assert any('£15.8m signing from Parma' in t for t in texts[0] | texts[1] | texts[2])  # the latin-1 file
  assert _digest(frames['train']) == 'f63a1e5229432612'


def test_prepare_rewrites_a_stale_split(cache_dir, tmp_path):
  (tmp_path / 'pypi').symlink_to(os.path.join(os.path.expanduser(cache_dir), 'pypi'))  # reuse the download
  paths = corpora.prepare('polarity', tmp_path)
  manifest = tmp_path / 'data' / 'polarity' / 'split.json'
  assert json.loads(manifest.read_text())['rows'] == {'train': 3200, 'validation': 400, 'test': 400}
  manifest.write_text(json.dumps({'version': corpora.SPLIT_VERSION - 1}))
  with open(paths['train'], 'w') as f:
    f.write('label,text\nstale,stale\n')
  assert _digest(_read(corpora.prepare('polarity', tmp_path))['train']) == '02558a5c86f1ffbc'
  with pytest.raises(ValueError, match="unknown corpus 'imdb': expected one of"):
    corpora.prepare('imdb', tmp_path)


def _write(tmp_path, fmt, rows, name='data'):
  df = pd.DataFrame(rows, columns=['label', 'text', 'text2'][:len(rows[0])])
  path = tmp_path / f'{name}.{fmt}'
  if fmt == 'csv':
    df.to_csv(path, index=False)
  elif fmt == 'json':
    df.to_json(path, orient='records')  # one JSON array
  elif fmt == 'jsonl':
    df.to_json(path, orient='records', lines=True)
  else:
    df.to_parquet(path)
  return str(path)


ROWS = [('yes', 'a fine film', 'truly'), ('no', 'a dull film', 'sadly'), ('yes', 'great', 'indeed')]


@pytest.mark.parametrize('fmt', ['csv', 'json', 'jsonl', 'parquet'])
def test_local_files_and_text_pairs(tmp_path, tokenizer, fmt):
  path = _write(tmp_path, fmt, ROWS)
  cfg = _data_cfg(tmp_path, dataset='json' if fmt == 'jsonl' else fmt,
                  data_files=(('train', path), ('validation', path)), text_pair_column='text2')
  train, evaluation = pipeline.load_splits(cfg)
  assert isinstance(train, datasets.Dataset) and len(train) == len(evaluation) == 3
  names = pipeline.label_names(train, 'label')
  assert names == ['no', 'yes']
  tok = classification.featurize(train, 'train', cfg, None, tokenizer, names, training=True)
  assert list(tok.labels) == [1, 0, 1] and tok.labels.dtype == np.int32
  want = tokenizer('a fine film', 'truly')
  np.testing.assert_array_equal(tok.input_ids[0], want['input_ids'])
  np.testing.assert_array_equal(tok.tokens['token_type_ids'][0], want['token_type_ids'])
  assert tok.tokens['token_type_ids'][0].max() == 1  # the pair is the second segment
  assert tok.lengths[0] == len(want['input_ids']) and tok.lengths.dtype == np.int32


def test_polarity_end_to_end_with_the_real_tokenizer(cache_dir, tokenizer):
  cfg = _data_cfg(cache_dir)  # tiny: 256 train / 100 eval examples, max_length 32, buckets (16, 32)
  train, evaluation = pipeline.load_splits(cfg)
  assert (len(train), len(evaluation)) == (256, 100)
  names = pipeline.label_names(train, 'label')
  assert names == ['negative', 'positive']
  tok = classification.featurize(train, 'train', cfg, None, tokenizer, names, training=True)
  assert tok.lengths.max() == 32 and all(len(x) == n for x, n in zip(tok.input_ids, tok.lengths))
  it = batching.TrainIterator(tok, 16, cfg.buckets, 0, tokenizer.pad_token_id)
  batch = next(it)
  assert {k: (v.dtype, v.shape[0]) for k, v in batch.items()} == {
      'input_ids': (np.int32, 16), 'attention_mask': (np.int32, 16), 'token_type_ids': (np.int32, 16),
      'labels': (np.int32, 16), 'weights': (np.float32, 16)}
  assert batch['input_ids'].shape[1] in cfg.buckets
  assert (batch['input_ids'][:, 0] == tokenizer.cls_token_id).all()


def test_tokenization_is_cached(tmp_path, tokenizer):
  path = _write(tmp_path, 'csv', [('yes', f'sentence number {i}', 'x') for i in range(50)])
  cfg = _data_cfg(tmp_path, dataset='csv', data_files=(('train', path), ('validation', path)))
  split, _ = pipeline.load_splits(cfg)
  folder = os.path.dirname(split.cache_files[0]['filename'])
  first = classification.featurize(split, 'train', cfg, None, tokenizer, ['yes'], training=True)
  cached = sorted(f for f in os.listdir(folder) if f.startswith('cache-'))
  assert len(cached) == 1  # the token ids, under a fingerprint of data, tokenizer and max_length
  again = classification.featurize(pipeline.load_splits(cfg)[0], 'train', cfg, None, tokenizer, ['yes'],
                                   training=True)
  assert sorted(f for f in os.listdir(folder) if f.startswith('cache-')) == cached
  np.testing.assert_array_equal(np.concatenate(again.input_ids), np.concatenate(first.input_ids))
  classification.featurize(split, 'train', dataclasses.replace(cfg, max_length=16), None, tokenizer, ['yes'],
                           training=True)
  assert len([f for f in os.listdir(folder) if f.startswith('cache-')]) == 2


def test_max_examples_is_a_fixed_subset_in_dataset_order(tmp_path):
  rows = [('a' if i < 50 else 'b', f'text {i}') for i in range(100)]
  path = _write(tmp_path, 'csv', rows)  # sorted by label: the first 10 rows are all 'a'
  cfg = _data_cfg(tmp_path, dataset='csv', data_files=(('train', path), ('validation', path)),
                  max_train_examples=10, max_eval_examples=-1)
  train, evaluation = pipeline.load_splits(cfg)
  assert len(train) == 10 and len(evaluation) == 100
  assert set(train['label']) == {'a', 'b'}
  numbers = [int(t.split()[1]) for t in train['text']]
  assert numbers == sorted(numbers) and numbers == [int(t.split()[1]) for t in
                                                    pipeline.load_splits(cfg)[0]['text']]


def test_eval_split_may_be_the_train_split(tmp_path):
  path = _write(tmp_path, 'csv', [('a' if i % 2 else 'b', f'text {i}') for i in range(40)])
  cfg = _data_cfg(tmp_path, dataset='csv', data_files=(('train', path),), eval_split='train',
                  max_train_examples=30, max_eval_examples=5)
  train, evaluation = pipeline.load_splits(cfg)
  assert (len(train), len(evaluation)) == (30, 5)  # the eval subset no longer replaces the training data
  assert set(evaluation['text']) < {f'text {i}' for i in range(40)}


def test_nan_label_is_a_missing_label():
  ds = datasets.Dataset.from_dict({'label': [1.0, 2.5, float('nan')]})
  with pytest.raises(ValueError, match=r"^split 'train' row 2: column 'label' is nan: expected a label$"):
    pipeline.check_labels(ds, 'train', 'label')
  pipeline.check_labels(ds.select([0, 1]), 'train', 'label')


def test_label_names():
  ints = datasets.Dataset.from_dict({'label': [10, 2, 1, 2]})
  assert pipeline.label_names(ints, 'label') == ['1', '2', '10']
  np.testing.assert_array_equal(pipeline.encode_labels(ints, 'train', 'label', ['1', '2', '10']),
                                [2, 1, 0, 1])
  features = datasets.Features({'label': datasets.ClassLabel(names=['neg', 'pos'])})
  classes = datasets.Dataset.from_dict({'label': [1, 1]}, features=features)
  assert pipeline.label_names(classes, 'label') == ['neg', 'pos']  # every name, even one not seen
  np.testing.assert_array_equal(pipeline.encode_labels(classes, 'train', 'label', ['neg', 'pos']), [1, 1])
  unlabelled = datasets.Dataset.from_dict({'label': [0, -1]}, features=features)  # GLUE's test splits
  with pytest.raises(ValueError, match=r"label -1 in split 'test' row 1 is not in the label set"):
    pipeline.encode_labels(unlabelled, 'test', 'label', ['neg', 'pos'])


def test_hub_dataset(tmp_path, monkeypatch):
  features = datasets.Features({'sentence': datasets.Value('string'),
                                'label': datasets.ClassLabel(names=['negative', 'positive'])})
  fake = datasets.DatasetDict({s: datasets.Dataset.from_dict({'sentence': ['ok', 'bad'], 'label': [1, 0]},
                                                             features=features)
                               for s in ('train', 'validation')})
  calls = []
  monkeypatch.setattr(datasets, 'load_dataset', lambda *a, **kw: calls.append(a) or fake)
  cfg = _data_cfg(tmp_path, dataset='glue', dataset_config='sst2', text_column='sentence')
  _, evaluation = pipeline.load_splits(cfg)
  assert calls == [('glue', 'sst2')] and len(evaluation) == 2
  with pytest.raises(ValueError, match=r"split 'dev' not in 'glue' \(splits: train, validation\)"):
    pipeline.load_splits(dataclasses.replace(cfg, eval_split='dev'))

  def unreachable(*args, **kwargs):  # what datasets raises offline, after its retries
    raise ConnectionError(f"Couldn't reach '{args[0]}' on the Hub (LocalEntryNotFoundError)")
  monkeypatch.setattr(datasets, 'load_dataset', unreachable)
  with pytest.raises(ValueError, match=r"^config.data.dataset='glu': Couldn't reach 'glu' on the Hub "
                                       r"\(LocalEntryNotFoundError\): expected one of jtune's corpora \(polarity, "
                                       r'bbc_news, bbc_headlines\), a file format \(csv, json, parquet\) with '):
    pipeline.load_splits(dataclasses.replace(cfg, dataset='glu'))


@pytest.mark.parametrize('case,error,needle', [
    ('missing_file', FileNotFoundError, "config.data.data_files.train='{tmp}/nope.csv'"),
    ('missing_column', ValueError, "column 'text' not in split 'train' (columns: label, sentence)"),
    ('missing_pair_column', ValueError, "column 'text2' not in split 'train' (columns: label, text)"),
    ('empty_split', ValueError, "split 'validation' of 'csv' is empty"),
    ('empty_text', ValueError, "split 'train' row 1: column 'text' is ''"),
    ('blank_text', ValueError, "split 'train' row 0: column 'text' is '  '"),
    ('empty_label', ValueError, "split 'validation' row 1: column 'label' is ''"),
    ('missing_split', ValueError, "split 'validation' not in 'csv' (splits: train)"),
])
def test_bad_data(tmp_path, case, error, needle):
  good = _write(tmp_path, 'csv', ROWS)
  files = {'train': good, 'validation': good}
  pair = ''
  bad = tmp_path / 'b.csv'
  if case == 'missing_file':
    files['train'] = str(tmp_path / 'nope.csv')
  elif case == 'missing_column':
    bad.write_text('label,sentence\nyes,fine\n')
    files['train'] = str(bad)
  elif case == 'missing_pair_column':
    bad.write_text('label,text\nyes,fine\n')
    files['train'], pair = str(bad), 'text2'
  elif case == 'empty_split':
    bad.write_text('label,text\n')
    files['validation'] = str(bad)
  elif case == 'empty_text':
    bad.write_text('label,text\nyes,fine\nno,\n')
    files['train'] = str(bad)
  elif case == 'blank_text':
    bad.write_text('label,text\nyes,"  "\n')
    files['train'] = str(bad)
  elif case == 'empty_label':
    bad.write_text('label,text\nyes,fine\n,fine\n')
    files['validation'] = str(bad)
  elif case == 'missing_split':
    del files['validation']
  cfg = _data_cfg(tmp_path, dataset='csv', data_files=tuple(files.items()), text_pair_column=pair)
  with pytest.raises(error) as e:
    pipeline.load_splits(cfg)
  assert needle.format(tmp=tmp_path) in str(e.value)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('column,needle', [
    ('text', "split 'train' row 1: column 'text' is None"),
    ('text2', "split 'train' row 2: column 'text2' is None"),
    ('label', "split 'train' row 0: column 'label' is None"),
])
def test_null_values(tmp_path, column, needle):
  rows = [dict(zip(('label', 'text', 'text2'), r)) for r in ROWS]
  rows[{'text': 1, 'text2': 2, 'label': 0}[column]][column] = None
  path = tmp_path / 'nulls.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  cfg = _data_cfg(tmp_path, dataset='json', data_files=(('train', str(path)), ('validation', str(path))),
                  text_pair_column='text2')
  with pytest.raises(ValueError) as e:
    pipeline.load_splits(cfg)
  assert needle in str(e.value)


def test_label_outside_the_label_set(tmp_path):
  (tmp_path / 'v.csv').write_text('label,text\nyes,fine\nmaybe,odd\n')
  cfg = _data_cfg(tmp_path, dataset='csv',
                  data_files=(('train', _write(tmp_path, 'csv', ROWS)), ('validation', str(tmp_path / 'v.csv'))))
  _, evaluation = pipeline.load_splits(cfg)
  with pytest.raises(ValueError, match=r"label 'maybe' in split 'validation' row 1 is not in the label set "
                                       r"\['no', 'yes'\]"):
    pipeline.encode_labels(evaluation, 'validation', 'label', ['no', 'yes'])


def _toy_split(lengths, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.empty(len(lengths), object)
  ids[:] = [rng.integers(1, 100, n).astype(np.int32) for n in lengths]
  types = np.empty(len(lengths), object)
  types[:] = [np.zeros(n, np.int32) for n in lengths]
  return Features(tokens={'input_ids': ids, 'token_type_ids': types},
                  rows={'labels': np.arange(len(lengths), dtype=np.int32)}, lengths=np.asarray(lengths, np.int32))


def test_bucket_length():
  assert [batching.bucket_length(n, (16, 32)) for n in (1, 16, 17, 32)] == [16, 16, 32, 32]
  with pytest.raises(ValueError, match='33 tokens is longer than the largest bucket 32'):
    batching.bucket_length(33, (16, 32))


def test_train_iterator_epochs_and_padding():
  split = _toy_split(np.random.default_rng(1).integers(2, 30, 37))
  it = batching.TrainIterator(split, 8, (16, 32), seed=3, pad_id=0)
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
  again = batching.TrainIterator(split, 8, (16, 32), seed=3, pad_id=0)
  np.testing.assert_array_equal(next(again)['labels'], epochs[0][0]['labels'])


@pytest.mark.parametrize('group', [False, True])
def test_train_iterator_resumes_exactly(group):
  split = _toy_split(np.random.default_rng(7).integers(2, 30, 260))  # grouped: megabatches of 4 batches of 16
  make = lambda: batching.TrainIterator(split, 16, (16, 32), 0, 0, group_by_length=group)  # noqa: E731
  it = make()
  for _ in range(18):  # into the second epoch
    next(it)
  state = it.get_state()
  assert state == {'epoch': 1, 'index': 2, 'group_by_length': group, 'batch_size': 16}
  expected = [next(it)['labels'] for _ in range(5)]
  resumed = make()
  resumed.set_state(json.loads(json.dumps(state)))
  for want in expected:
    np.testing.assert_array_equal(next(resumed)['labels'], want)


def _masked_toy_split(lengths):
  """A masked-LM split: every token a word of its own."""
  split = _toy_split(lengths)
  units = np.empty(len(lengths), object)
  units[:] = [np.full(n, masking.WORD_START, np.int32) for n in lengths]
  return dataclasses.replace(split, tokens={**split.tokens, 'units': units}, masking=masking.Masking(103, 100))


@pytest.mark.parametrize('group,masked', [(False, False), (True, False), (False, True)])
def test_processes_take_their_share_of_each_global_batch(group, masked):
  """Two processes' batches joined are one process's, masked-LM masks included (drawn for the global batch)."""
  lengths = np.random.default_rng(2).integers(2, 30, 260)
  split = _masked_toy_split(lengths) if masked else _toy_split(lengths)
  make = lambda local=None: batching.TrainIterator(split, 16, (16, 32), 5, 0, local, group_by_length=group)  # noqa: E731
  whole, parts = make(), [make(slice(8 * p, 8 * p + 8)) for p in range(2)]
  for _ in range(18):  # into the second epoch
    w, a, b = next(whole), next(parts[0]), next(parts[1])
    assert ('labels' in w and (w['input_ids'] == 103).any()) if masked else 'units' not in w
    for key in w:
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), w[key], err_msg=key)
  if masked:  # evaluation's batches likewise
    whole = list(batching.eval_batches(split, 16, (16, 32), 0))
    parts = [list(batching.eval_batches(split, 16, (16, 32), 0, slice(8 * p, 8 * p + 8))) for p in range(2)]
    for w, a, b in zip(whole, *parts):
      for key in w:
        np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), w[key], err_msg=key)


def _padded_tokens(batches):
  return sum(b['input_ids'].size for b in batches)


def test_group_by_length_pads_less_and_keeps_the_epoch():
  lengths = np.random.default_rng(4).integers(2, 64, 403)
  lengths[[7, 300]] = 64  # the longest rows: their batch goes first
  split = _toy_split(lengths)
  grouped = batching.TrainIterator(split, 8, (8, 16, 32, 64), seed=3, pad_id=0, group_by_length=True)
  plain = batching.TrainIterator(split, 8, (8, 16, 32, 64), seed=3, pad_id=0)
  assert grouped.steps_per_epoch == 50
  epochs = [[next(grouped) for _ in range(50)] for _ in range(2)]
  for epoch in epochs:
    seen = np.concatenate([b['labels'] for b in epoch])
    assert len(set(seen)) == 400  # every kept row once, as without grouping
    assert int(lengths[epoch[0]['labels']].max()) == 64  # the batch holding the longest row first
    for b in epoch:  # a batch is a run of a megabatch sorted by length, longest first
      assert list(lengths[b['labels']]) == sorted(lengths[b['labels']], reverse=True)
  # megabatches of min(50, 403 // 32) = 12 batches: a batch's rows are within a few tokens of each other
  spread = np.mean([np.ptp(lengths[b['labels']]) for b in epochs[0]])
  assert spread < 10, spread
  assert _padded_tokens(epochs[0]) < 0.8 * _padded_tokens([next(plain) for _ in range(50)])  # 0.73 here
  assert not np.array_equal(np.concatenate([b['labels'] for b in epochs[0]]),
                            np.concatenate([b['labels'] for b in epochs[1]]))
  # the batches are shuffled over the epoch, not each megabatch's run from longest to shortest
  longest = [int(lengths[b['labels']].max()) for b in epochs[0][1:]]
  assert sum(a >= b for a, b in zip(longest, longest[1:])) < 36, longest


def test_a_state_resumes_only_with_its_own_grouping_and_batch_size():
  split = _toy_split(np.random.default_rng(6).integers(2, 30, 64))
  grouped = batching.TrainIterator(split, 8, (16, 32), 0, 0, group_by_length=True)
  plain = batching.TrainIterator(split, 8, (16, 32), 0, 0)
  with pytest.raises(ValueError, match=r'saved with data.group_by_length=False: expected the same setting'):
    grouped.set_state(plain.get_state())
  with pytest.raises(ValueError, match=r'saved with data.group_by_length=True: expected the same setting'):
    plain.set_state(grouped.get_state())
  with pytest.raises(ValueError, match='saved with data.group_by_length=False'):
    grouped.set_state({'epoch': 0, 'index': 1})  # a checkpoint from before the option: plain batches
  plain.set_state({'epoch': 0, 'index': 1})  # nor its batch size: taken as this run's
  assert plain.get_state() == {'epoch': 0, 'index': 1, 'group_by_length': False, 'batch_size': 8}
  other = batching.TrainIterator(split, 4, (16, 32), 0, 0)
  with pytest.raises(ValueError, match=r'saved with train.batch_size=8: expected the same global batch size to '
                                       r'resume it \(--config.train.batch_size=8\)'):
    other.set_state(plain.get_state())
  with pytest.raises(ValueError, match='batch size 8 is larger than the 5 rows to group by length'):
    batching.group_by_length(np.arange(5), np.full(5, 3), 8, np.random.default_rng(0))


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_counts_every_example_once(process_count):
  split = _toy_split(np.random.default_rng(3).integers(2, 30, 21))
  share = 8 // process_count
  batches = [list(batching.eval_batches(split, 8, (16, 32), 0, slice(p * share, (p + 1) * share)))
             for p in range(process_count)]
  assert all(len(b) == 3 for b in batches)
  weights = np.concatenate([b['weights'] for proc in batches for b in proc])
  labels = np.concatenate([b['labels'] for proc in batches for b in proc])
  assert weights.sum() == 21
  assert sorted(labels[weights > 0]) == list(range(21))
  assert all(b['labels'].shape == (8 // process_count,) for proc in batches for b in proc)


def test_padding_uses_the_pad_id_and_keeps_segments():
  split = _toy_split([3, 7, 12, 5])
  split.tokens['token_type_ids'][1][4:] = 1  # a pair: second segment
  batch = next(batching.eval_batches(split, 4, (8, 16), pad_id=7))
  assert batch['input_ids'].shape == (4, 16)  # longest is 12: the 16 bucket
  for row, n in enumerate(split.lengths):
    np.testing.assert_array_equal(batch['input_ids'][row, :n], split.input_ids[row])
    assert (batch['input_ids'][row, n:] == 7).all() and (batch['token_type_ids'][row, n:] == 0).all()
    np.testing.assert_array_equal(batch['attention_mask'][row], np.arange(16) < n)
  np.testing.assert_array_equal(batch['token_type_ids'][1, :7], [0, 0, 0, 0, 1, 1, 1])


def test_iterator_errors():
  split = _toy_split([5] * 10)
  with pytest.raises(ValueError, match='batch size 0 is not positive'):
    batching.TrainIterator(split, 0, (16,), 0, 0)
  with pytest.raises(ValueError, match='local rows 8:12 are not a range inside the global batch of 8'):
    next(batching.eval_batches(split, 8, (16,), 0, slice(8, 12)))
  with pytest.raises(ValueError, match='batch size 16 is larger than the 10 training examples'):
    next(batching.TrainIterator(split, 16, (16,), 0, 0))
  it = batching.TrainIterator(split, 4, (16,), 0, 0)
  with pytest.raises(ValueError, match=r"iterator state \{'epoch': 0, 'index': 3\} is out of range"):
    it.set_state({'epoch': 0, 'index': 3})
  with pytest.raises(ValueError, match='sequence of 17 tokens is longer than the largest bucket 16'):
    next(batching.TrainIterator(_toy_split([17] * 4), 4, (16,), 0, 0))



@pytest.mark.parametrize('labels,needle', [
    ([1, 'neg', 0], r"column 'label' mixes strings and numbers \(row 1: 'neg', row 0: 1\): expected labels of one "
                    r"kind"),
    ([[1, 0], [0, 1]], r"column 'label' row 0 is \[1, 0\]: expected one label per row, a string or a number "
                       r"\(several labels per row: task.name='multi_label'\)"),
])
def test_labels_of_mixed_kinds_or_lists_are_one_line_errors(tmp_path, labels, needle):
  path = tmp_path / 'train.jsonl'  # as datasets reads a JSON Lines file of such labels
  path.write_text(''.join(json.dumps({'text': 'a film', 'label': label}) + '\n' for label in labels))
  train, _ = pipeline.load_splits(_data_cfg(tmp_path, dataset='json',
                                            data_files=(('train', str(path)), ('validation', str(path)))))
  with pytest.raises(ValueError, match=needle):
    pipeline.label_names(train, 'label')
  assert pipeline.label_names(datasets.Dataset.from_dict({'label': [10, 2, 2]}), 'label') == ['2', '10']


@pytest.mark.parametrize('content', ['', '\n\n'])
def test_an_empty_json_lines_file_is_an_empty_split(tmp_path, content):
  (tmp_path / 'empty.jsonl').write_text(content)
  cfg = _data_cfg(tmp_path, dataset='json', data_files=(('train', str(tmp_path / 'empty.jsonl')),
                                                         ('validation', _write(tmp_path, 'json', ROWS))))
  with pytest.raises(ValueError, match=rf"split 'train' of 'json' is empty \({re.escape(str(tmp_path))}/empty.jsonl\): "
                                       'expected at least one example'):
    pipeline.load_splits(cfg)
