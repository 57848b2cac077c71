"""The training loop keeps the hot path honest: one trace of the train step per batch bucket across a run."""

import json

import pytest

from configs import bert_cls, bert_qa
from jtune import config as config_lib
from jtune import executables, trainer
from jtune.tasks import squad
from tests import task_data


@pytest.mark.parametrize('cache_executables', [False, True])
def test_train_step_is_traced_once_per_bucket(tmp_path, cache_dir, cache_executables):
  c = bert_cls.get_config('tiny')
  c.cache_dir = cache_dir
  c.data.max_length = 64
  c.data.buckets = (16, 32, 48, 64)  # polarity sentences of every length: several buckets in one run
  c.train.batch_size = 8
  c.train.num_steps = 12
  c.train.eval_every_steps = 12
  c.train.export = False
  c.train.cache_executables = cache_executables
  run = trainer.setup(config_lib.from_config_dict(c), str(tmp_path / 'run'))
  assert isinstance(run.train_fn, executables.CachedStep) == cache_executables
  start = run.train_iter.get_state()
  widths = [next(run.train_iter)['input_ids'].shape[1] for _ in range(run.total_steps)]
  run.train_iter.set_state(start)
  assert len(set(widths)) >= 2, widths  # the run really sees several buckets
  trainer.train(run, c.to_dict())
  size = (run.train_fn.cache_size() if cache_executables
          else run.train_fn._cache_size())  # pylint: disable=protected-access
  assert size == len(set(widths))


def _description(c, tmp_path, name):
  return trainer.setup(config_lib.from_config_dict(c), str(tmp_path / name)).train_fn.description


def test_compiled_steps_are_kept_across_loop_settings_only(tmp_path, cache_dir):
  c = bert_cls.get_config('tiny')
  c.cache_dir = cache_dir
  base = _description(c, tmp_path, 'a')
  # what only the loop reads: the steps get None for it (trainer.LOOP_ONLY), so the same compiled step serves
  c.train.eval_every_steps, c.train.keep_checkpoints, c.train.export = 3, 5, False
  assert _description(c, tmp_path, 'b') == base
  c.train.label_smoothing = 0.1  # what the step computes: another program
  assert _description(c, tmp_path, 'c') != base


@pytest.mark.parametrize('group', [True, False])
def test_group_by_length_reaches_the_training_batches(tmp_path, cache_dir, group):
  c = bert_cls.get_config('tiny')
  c.cache_dir = cache_dir
  c.data.group_by_length = group
  run = trainer.setup(config_lib.from_config_dict(c), str(tmp_path / 'run'))
  tokens = [list(next(run.train_iter)['attention_mask'].sum(1)) for _ in range(4)]
  # grouped: each batch a run of its megabatch sorted by length, longest first; plain: random rows
  assert all(t == sorted(t, reverse=True) for t in tokens) == group, tokens


def test_prepare_trains_on_the_whole_split_that_eval_also_samples(tmp_path, cache_dir):
  path = task_data.qa(tmp_path, n_train=12, n_eval=1)['train']
  c = bert_qa.get_config('tiny')
  c.cache_dir = cache_dir
  c.data.data_files['train'] = c.data.data_files['validation'] = path
  c.data.eval_split, c.data.max_train_examples, c.data.max_eval_examples = 'train', -1, 3
  _, model, _, train, evaluation = trainer.prepare(config_lib.from_config_dict(c))
  assert len(evaluation.host['answers']) == 3 and 'offsets' in evaluation.host  # evaluation features of 3 rows
  rows = [json.loads(line) for line in open(path)]
  windows = squad.train_features([r['question'] for r in rows], [r['context'] for r in rows],
                                 [r['answers'] for r in rows], model.tokenizer, c.data.max_length, c.task.stride)
  assert len(train) == len(windows['input_ids']) and 'start_positions' in train.rows  # all 12 rows, to train


def test_lora_targets_that_match_no_layer_are_a_config_error():
  """With LoRA on, targets that name no layer would train the head alone (an encoder) without a word."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  model = config_lib.from_config_dict(bert_cls.get_config('tiny,lora')).model
  layer = {'kernel': np.zeros((2, 2))}
  params = {'bert': {'layer_0': {'attention': {'query': dict(layer, lora_a=np.zeros((2, 1))), 'key': layer}}},
            'classifier': layer}
  trainer._check_lora_targets(model, params)  # pylint: disable=protected-access
  del params['bert']['layer_0']['attention']['query']['lora_a']
  typo = dataclasses.replace(model, lora_targets=('attention/qury$',))
  with pytest.raises(config_lib.ConfigError, match=r"^config.model.lora.targets=\('attention/qury\$',\): match no "
                                                   r'layer of this model, so LoRA would adapt nothing; expected '
                                                   r'patterns of its layer paths \(e.g. bert/layer_0/attention/key, '
                                                   r'bert/layer_0/attention/query, classifier\)$'):
    trainer._check_lora_targets(typo, params)  # pylint: disable=protected-access
  trainer._check_lora_targets(dataclasses.replace(typo, lora_rank=0), params)  # pylint: disable=protected-access
