"""Every variant converts to the typed config; bad values are one-line ConfigErrors naming the field."""

import pytest

from configs import bert_cls, common
from jtune import config as config_lib


@pytest.mark.parametrize('variant', [None, 'topics', 'tiny', 'hub', 'lora', 'frozen', 'adafactor', 'tiny,lora'])
def test_variants_validate(variant):
  cfg = config_lib.from_config_dict(bert_cls.get_config(variant))
  assert cfg.data.buckets[-1] == cfg.data.max_length
  assert cfg.mesh.rules[0] == ('batch', ('data', 'fsdp'))


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown variant 'tinyy'"):
    bert_cls.get_config('tinyy')
  with pytest.raises(ValueError, match=r"variants \['fsdp', 'dp'\] name two mesh presets"):
    bert_cls.get_config('tiny,fsdp,dp')


@pytest.mark.parametrize('variant,mesh', [
    (None, (-1, 1, 1)), ('dp', (-1, 1, 1)), ('tiny,fsdp', (1, -1, 1)), ('fsdp_tp,topics', (1, -1, 2))])
def test_mesh_presets_set_the_shape_and_the_rules(variant, mesh):
  cfg = config_lib.from_config_dict(bert_cls.get_config(variant))
  assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == mesh
  assert cfg.mesh.rules == config_lib.parse_rules(common.RULES)
  assert dict(cfg.mesh.rules)['heads'] == 'tensor' and dict(cfg.mesh.rules)['embed'] == 'fsdp'
  if variant and 'tiny' in variant:
    assert cfg.model.init == 'random'


@pytest.mark.parametrize('field,value,needle', [
    ('optim.learning_rate', -1.0, 'config.optim.learning_rate=-1.0: expected a positive learning rate'),
    ('train.batch_size', 0, 'config.train.batch_size=0: expected a positive integer'),
    ('optim.warmup_ratio', 1.5, 'config.optim.warmup_ratio=1.5: expected a fraction in [0, 1)'),
    ('optim.schedule', 'step', "config.optim.schedule='step': expected 'constant', 'linear', 'cosine' or"),
    ('optim.name', 'adam', "config.optim.name='adam': expected 'adamw', 'adafactor', 'sgd' or 'lion'"),
    ('optim.layer_decay', 1.5, 'config.optim.layer_decay=1.5: expected a factor in (0, 1]'),
    ('optim.b2', 1.0, 'config.optim.b2=1.0: expected a decay rate in [0, 1)'),
    ('optim.eps', 0.0, 'config.optim.eps=0.0: expected a positive epsilon'),
    ('optim.trainable', ('[',), "config.optim: pattern '[' is not a regular expression"),
    ('model.init', 'zeros', "config.model.init='zeros'"),
    ('data.buckets', (64, 32, 128), 'config.data.buckets=(64, 32, 128): expected increasing'),
    ('model.hidden_dropout', 1.0, 'config.model.hidden_dropout=1.0: expected a rate in [0, 1)'),
    ('mesh.tensor', 0, 'config.mesh.tensor=0'),
    ('train.keep_best', -1, 'config.train.keep_best=-1: expected a non-negative integer'),
    ('train.best_metric', 'accuracy', "config.train.best_metric='accuracy': expected an evaluation metric of task "
                                      "'classification': eval_loss, eval_accuracy"),
    ('train.best_metric', 'eval_pearson', "config.train.best_metric='eval_pearson': expected an evaluation"),
    ('task.name', 'ner', "config.task.name='ner': expected one of classification, regression, multi_label"),
    ('task.threshold', 1.0, 'config.task.threshold=1.0: expected a probability in (0, 1)'),
    ('model.architecture', 'gpt3', "config.model.architecture='gpt3': expected one of auto, bert, roberta"),
    ('train.best_mode', 'up', "config.train.best_mode='up': expected 'max' or 'min'"),
    ('train.early_stopping_patience', 0, 'config.train.early_stopping_patience=0: expected -1 (never)'),
    ('train.max_nonfinite_steps', 0, 'config.train.max_nonfinite_steps=0: expected a positive integer'),
    ('train.export_checkpoint', 'first', "config.train.export_checkpoint='first': expected 'best' or 'last'"),
    ('task.prompt_template', 'Review: {} {text}', "config.task.prompt_template='Review: {} {text}': expected a "
                                                  "str.format template whose fields name a row's columns"),
    ('task.response_template', ' {0}', "config.task.response_template=' {0}': expected a str.format template"),
    ('task.prompt_template', 'Review: {text', "config.task.prompt_template='Review: {text': expected a str.format"),
    ('task.prompt_template', '{text:{}}', "config.task.prompt_template='{text:{}}': expected a str.format"),
    ('train.dropout_rng', 'rbg',
     "config.train.dropout_rng='rbg': expected 'auto', 'threefry2x32', 'unsafe_rbg' or 'rbg_xor_fold'"),
    ('mesh.rules', (('batch', ('data', 'fsdp')), ('embed', 'model')),
     "config.mesh.rules[1]=('embed', 'model'): expected a (logical axis, mesh axes) pair, the mesh axes None, "
     "one of ('data', 'fsdp', 'tensor') or a tuple of them"),
    ('mesh.rules', (('batch', ('data', 'model')),), "config.mesh.rules[0]=('batch', ('data', 'model')): expected"),
    ('mesh.rules', (('batch',),), "config.mesh.rules[0]=('batch',): expected a (logical axis, mesh axes) pair"),
    ('mesh.rules', (('batch', 3),), "config.mesh.rules[0]=('batch', 3): expected a (logical axis, mesh axes) pair"),
    ('mesh.rules', (('batch', ('data', 'data')),), "config.mesh.rules[0]=('batch', ('data', 'data')): expected"),
    ('model.lora', {'rank': 4, 'alpha': -1.0, 'dropout': 0.0, 'targets': ('query$',)},
     'config.model.lora.alpha=-1.0: expected a positive scale'),
    ('model.lora', {'rank': 4, 'alpha': 8.0, 'dropout': 0.0, 'targets': ('attention/(query',)},
     "config.model.lora.targets: pattern 'attention/(query' is not a regular expression (missing ), "),
    ('data.max_train_examples', 0, 'config.data.max_train_examples=0: expected -1 (all) or a positive number'),
    ('data.max_eval_examples', -5, 'config.data.max_eval_examples=-5: expected -1 (all) or a positive number'),
    ('model.lm_head_chunks', 0, 'config.model.lm_head_chunks=0: expected a positive number of slices'),
    ('model.lm_head_chunks', 2, "config.model.lm_head_chunks=2: expected 1 with task.name='classification' (it "
                                "applies to task 'causal_lm')"),
])
def test_bad_values(field, value, needle):
  c = bert_cls.get_config('tiny')
  section, name = field.split('.')
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.from_config_dict(c)
  assert needle in str(e.value)
  assert '\n' not in str(e.value)


def test_rules_must_be_a_sequence_of_rules():  # a config file may build its mesh section from scratch
  with pytest.raises(config_lib.ConfigError, match=r"^config.mesh.rules=None: expected a tuple of rules, each a "):
    config_lib.parse_rules(None)


def test_config_is_the_whole_schema():
  c = bert_cls.get_config()
  c.lock()
  with pytest.raises(AttributeError):
    c.train.batchsize = 3  # a misspelt field is an error, not a new field


def test_a_generation_metric_as_best_metric_needs_generation():
  from configs import seq2seq
  c = seq2seq.get_config()
  assert c.train.best_metric == 'eval_rougeL'
  config_lib.from_config_dict(c)
  c.task.generate_examples = 0
  with pytest.raises(config_lib.ConfigError, match=r"^config.train.best_metric='eval_rougeL': expected a metric "
                                                   r'evaluated without generation \(task.generate_examples=0\)'):
    config_lib.from_config_dict(c)
  c.train.best_metric = 'eval_loss'
  config_lib.from_config_dict(c)


def test_data_files_need_a_file_dataset():
  """Files named for a dataset that does not read them (a hub dataset, a packaged corpus) are an error, not
  silently ignored."""
  c = bert_cls.get_config('tiny')
  c.data.data_files.train = 'train.jsonl'
  with pytest.raises(config_lib.ConfigError, match=r"^config.data.data_files=\{'train': 'train.jsonl'\}: expected "
                                                   r"no files with data.dataset='polarity', which does not read "
                                                   r"them \(they are read when data.dataset is csv, json, parquet\)$"):
    config_lib.from_config_dict(c)
  common.use_files(c)
  assert config_lib.from_config_dict(c).data.data_files == (('train', 'train.jsonl'),)


@pytest.mark.parametrize('overrides,limit', [
    ({'max_position_embeddings': 24}, 24),
    ({'model_type': 'roberta', 'max_position_embeddings': 34, 'pad_token_id': 1}, 32)])
def test_max_length_beyond_the_position_table_is_an_error(overrides, limit):
  """A longer data.max_length than the model's learned positions would index past the table (NaN losses)."""
  from jtune import modeling  # pylint: disable=g-import-not-at-top
  c = bert_cls.get_config('tiny')
  c.model.config_overrides.update(overrides)
  c.data.max_length, c.data.buckets = limit + 8, (16, limit + 8)
  cfg = config_lib.from_config_dict(c)
  table = overrides['max_position_embeddings']
  with pytest.raises(config_lib.ConfigError, match=rf'^config.data.max_length={limit + 8}: expected at most '
                                                   rf'{limit}, the positions that model .* has '
                                                   rf'\(max_position_embeddings={table}\)$'):
    modeling.build(cfg, 'sequence', 2)
  c.data.max_length, c.data.buckets = limit, (16, limit)
  assert modeling.build(config_lib.from_config_dict(c), 'sequence', 2).config.max_length == limit



@pytest.mark.parametrize('template', ['{été}: {text:>5}', '{row.text} {row[0]}', '{{literal}} {text:{width}}'])
def test_templates_may_name_any_column(template):
  c = bert_cls.get_config('tiny')
  c.task.prompt_template = template
  assert config_lib.from_config_dict(c).task.prompt_template == template
