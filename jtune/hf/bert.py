"""BERT <-> Hugging Face: config fields and the explicit safetensors name map, both directions.

The machinery here serves every encoder family of jtune.models.bert: a `Layout` says what one family's
checkpoints look like (hf/roberta.py and hf/distilbert.py define theirs), and `load`, `export_state`,
`export_config` and `adapter` read and write any of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import transformers

from jtune.models import bert
from jtune.models import layers

MODEL_TYPES = ('bert',)
INPUTS = ('input_ids', 'attention_mask', 'token_type_ids')

PROBLEM_TYPES = ('single_label_classification', 'regression', 'multi_label_classification')
HEAD_CLASSES = {'sequence': 'ForSequenceClassification', 'token': 'ForTokenClassification',
                'qa': 'ForQuestionAnswering', 'mlm': 'ForMaskedLM'}
# Keys (without the family prefix) that no family loads: task heads from an earlier fine-tune (heads are always
# initialised fresh) and buffers.
COMMON_IGNORED = ('classifier.', 'pre_classifier.', 'qa_outputs.', 'embeddings.position_ids',
                  'embeddings.token_type_ids')


@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str  # key without the family prefix ('bert.') for backbone entries
  path: tuple[str, ...]  # path in jtune's param tree
  kind: str  # how the tensor is laid out: see _to_jtune / _to_hf
  optional: bool = False  # loaded when the checkpoint has it, else left freshly initialised


@dataclasses.dataclass(frozen=True)
class Layout:
  """What one encoder family's Hugging Face checkpoints look like."""
  name: str  # for messages: 'BERT'
  class_prefix: str  # 'Bert': exports are 'BertForSequenceClassification', ...
  config_class: Any  # transformers.BertConfig
  backbone: Callable[[bert.BertConfig], list[Entry]]  # keys without the prefix, paths from params[cfg.family]
  sequence_head: tuple[Entry, ...]  # the 'sequence' head's entries; 'token' and 'qa' are the same everywhere
  ignored: tuple[str, ...]  # key prefixes (without the family prefix) of pretraining heads


def layer_norm_entries(hf: str, path: tuple[str, ...]) -> list[Entry]:
  return [Entry(f'{hf}.weight', path + ('scale',), 'copy'), Entry(f'{hf}.bias', path + ('bias',), 'copy')]


def dense_entries(hf: str, path: tuple[str, ...], kernel_kind: str, bias_kind: str = 'copy',
           optional: bool = False) -> list[Entry]:
  return [Entry(f'{hf}.weight', path + ('kernel',), kernel_kind, optional),
          Entry(f'{hf}.bias', path + ('bias',), bias_kind, optional)]


def backbone_map(cfg: bert.BertConfig) -> list[Entry]:
  """BERT and RoBERTa backbone entries: Hugging Face key (without 'bert.') -> jtune path under cfg.family.

  The pooler is optional: a checkpoint saved without one (from a token classifier, say) leaves it fresh.
  """
  emb = (cfg.family, 'embeddings')
  entries = [
      Entry('embeddings.word_embeddings.weight', emb + ('word_embeddings', 'embedding'), 'copy'),
      Entry('embeddings.position_embeddings.weight', emb + ('position_embeddings', 'embedding'), 'copy'),
      Entry('embeddings.token_type_embeddings.weight', emb + ('token_type_embeddings', 'embedding'),
            'copy'),
      *layer_norm_entries('embeddings.LayerNorm', emb + ('LayerNorm',)),
  ]
  dense, layer_norm = dense_entries, layer_norm_entries
  for i in range(cfg.num_layers):
    hf, jt = f'encoder.layer.{i}', (cfg.family, f'layer_{i}')
    for name in ('query', 'key', 'value'):
      entries += dense(f'{hf}.attention.self.{name}', jt + ('attention', name), 'qkv_kernel', 'qkv_bias')
    entries += dense(f'{hf}.attention.output.dense', jt + ('attention', 'output'), 'out_kernel')
    entries += layer_norm(f'{hf}.attention.output.LayerNorm', jt + ('attention_LayerNorm',))
    entries += dense(f'{hf}.intermediate.dense', jt + ('intermediate',), 'linear')
    entries += dense(f'{hf}.output.dense', jt + ('output',), 'linear')
    entries += layer_norm(f'{hf}.output.LayerNorm', jt + ('output_LayerNorm',))
  if cfg.has_pooler:
    entries += dense_entries('pooler.dense', (cfg.family, 'pooler'), 'linear', optional=True)
  return entries


LAYOUT = Layout('BERT', 'Bert', transformers.BertConfig, backbone_map,
                tuple(dense_entries('classifier', ('classifier',), 'linear')), ignored=('cls.',))


def head_map(cfg: bert.BertConfig, layout: Layout) -> list[Entry]:
  """The task head's entries (keys are top-level in every *For* class)."""
  if cfg.head == 'mlm':  # the decoder is the word-embedding matrix (tied) and not stored apart
    return [*dense_entries('cls.predictions.transform.dense', ('transform',), 'linear'),
            *layer_norm_entries('cls.predictions.transform.LayerNorm', ('transform_LayerNorm',)),
            Entry('cls.predictions.bias', ('bias',), 'copy')]
  if cfg.head == 'qa':
    return dense_entries('qa_outputs', ('qa_outputs',), 'linear')
  if cfg.head == 'token':
    return dense_entries('classifier', ('classifier',), 'linear')
  return list(layout.sequence_head)


def _to_jtune(kind: str, w: np.ndarray, cfg: bert.BertConfig) -> np.ndarray:
  """torch layout -> jtune layout. torch Linear weights are (out, in); jtune kernels are (in, out)."""
  heads = (cfg.num_heads, cfg.head_dim)
  if kind == 'copy':
    return w
  if kind == 'linear':
    return w.T
  if kind == 'qkv_kernel':
    return w.T.reshape((w.shape[1],) + heads)
  if kind == 'qkv_bias':
    return w.reshape(heads)
  if kind == 'out_kernel':
    return w.T.reshape(heads + (w.shape[0],))
  raise ValueError(f'unknown tensor kind {kind!r}')


def _to_hf(kind: str, w: np.ndarray) -> np.ndarray:
  """jtune layout -> torch layout (inverse of _to_jtune)."""
  if kind == 'copy':
    return w
  if kind == 'linear':
    return w.T
  if kind == 'qkv_kernel':
    return w.reshape(w.shape[0], -1).T
  if kind == 'qkv_bias':
    return w.reshape(-1)
  if kind == 'out_kernel':
    return w.reshape(-1, w.shape[-1]).T
  raise ValueError(f'unknown tensor kind {kind!r}')


def _normalise(key: str, prefix: str) -> str:
  """The family prefix ('bert.') off; legacy TF names (LayerNorm.gamma/beta) to today's (weight/bias)."""
  key = key.removeprefix(prefix)
  return key.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta', 'LayerNorm.bias')


def _listing(keys: list[str], limit: int = 20) -> str:
  more = f' ... ({len(keys) - limit} more)' if len(keys) > limit else ''
  return ', '.join(keys[:limit]) + more


def load(tensors: dict[str, np.ndarray], cfg: bert.BertConfig, layout: Layout) -> dict[str, Any]:
  """The backbone param tree ({cfg.family: ...}, numpy) from a state dict of the base model (no prefix) or
  of any *For* class ('bert.' prefix); pretraining and task heads and buffers are skipped.

  Raises:
    ValueError: listing the missing keys, or the unexpected ones, in one line.
  """
  by_key = {_normalise(k, f'{cfg.family}.'): v for k, v in tensors.items()}
  entries = layout.backbone(cfg)
  missing = [e.hf for e in entries if e.hf not in by_key and not e.optional]
  if missing:
    raise ValueError(f'checkpoint is missing {len(missing)} {layout.name} keys: {_listing(missing)}')
  known = {e.hf for e in entries}
  ignored = COMMON_IGNORED + layout.ignored + (() if cfg.has_pooler else ('pooler.',))
  unexpected = sorted(k for k in by_key if k not in known and not k.startswith(ignored))
  if unexpected:
    raise ValueError(f'checkpoint has {len(unexpected)} unexpected keys for a '
                     f'{cfg.num_layers}-layer {layout.name}: {_listing(unexpected)}')
  return _param_tree(entries, by_key, cfg)


def _param_tree(entries: list[Entry], by_key: dict[str, np.ndarray], cfg: bert.BertConfig) -> dict[str, Any]:
  """jtune's param tree (numpy) of the `entries` that `by_key` holds (absent optional ones are left out)."""
  params: dict[str, Any] = {}
  for e in entries:
    if e.hf not in by_key:
      continue
    node = params
    for name in e.path[:-1]:
      node = node.setdefault(name, {})
    node[e.path[-1]] = _to_jtune(e.kind, np.asarray(by_key[e.hf]), cfg)
  return params


def load_head(tensors: dict[str, np.ndarray], cfg: bert.BertConfig, layout: Layout) -> dict[str, Any]:
  """The task head's param tree (numpy) from the state dict of a fine-tuned *For<cfg.head> class (an export).

  Raises:
    ValueError: the checkpoint has no such head, naming the missing keys.
  """
  entries = head_map(cfg, layout)
  tensors = {_normalise(k, ''): v for k, v in tensors.items()}
  missing = [e.hf for e in entries if e.hf not in tensors]
  if missing:
    raise ValueError(f'checkpoint has no {cfg.head} head (missing {_listing(missing)}): expected a '
                     f'{layout.class_prefix}{HEAD_CLASSES[cfg.head]} folder, such as a jtune export')
  return _param_tree(entries, tensors, cfg)


def export_state(params: dict[str, Any], cfg: bert.BertConfig, layout: Layout) -> dict[str, np.ndarray]:
  """The state dict (float32, contiguous) of the family's *For<cfg.head> class from jtune's param tree."""
  out = {f'{cfg.family}.{e.hf}': _to_hf(e.kind, _get(params, e.path)) for e in layout.backbone(cfg)}
  out.update({e.hf: _to_hf(e.kind, _get(params, e.path)) for e in head_map(cfg, layout)})
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _get_node(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> np.ndarray:
  return np.asarray(_get_node(tree, path))


def export_config(hf_config: transformers.PretrainedConfig, cfg: bert.BertConfig, layout: Layout,
                  id2label: dict[int, str], problem_type: str | None) -> transformers.PretrainedConfig:
  """The pretrained config, made the *For<cfg.head> class: labels (qa: start, end) and problem type."""
  config = layout.config_class.from_dict(hf_config.to_dict())
  config.architectures = [layout.class_prefix + HEAD_CLASSES[cfg.head]]
  config.dtype = 'float32'  # what export_state writes
  if cfg.head == 'mlm':  # predicts the vocabulary: no labels
    if problem_type is not None:
      raise ValueError(f'problem_type={problem_type!r}: expected None for the mlm head')
    config.tie_word_embeddings = True
    return config
  if cfg.head == 'qa':
    id2label = {0: 'LABEL_0', 1: 'LABEL_1'}  # start, end: what the QA classes expect (num_labels == 2)
  else:
    id2label = dict(id2label) or {i: f'LABEL_{i}' for i in range(cfg.num_labels)}
    if len(id2label) != cfg.num_labels:
      raise ValueError(f'id2label has {len(id2label)} labels: expected num_labels={cfg.num_labels} of the model')
  if cfg.head == 'sequence':
    problem_type = problem_type or ('regression' if cfg.num_labels == 1 else 'single_label_classification')
    if problem_type not in PROBLEM_TYPES:
      raise ValueError(f'problem_type={problem_type!r}: expected one of {", ".join(PROBLEM_TYPES)}')
  elif problem_type is not None:
    raise ValueError(f'problem_type={problem_type!r}: expected None for the {cfg.head!r} head')
  config.id2label = id2label
  config.label2id = {v: k for k, v in id2label.items()}
  config.problem_type = problem_type
  return config


def adapter(params_np: dict[str, Any], cfg: bert.BertConfig, layout: Layout
            ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """(PEFT state dict, adapted module names, modules_to_save): the LoRA adapters and the trained head.

  PEFT's lora_A is (r, in_features) and lora_B (out_features, r), on the torch module named by the map;
  jtune's A is (in..., r) and B (r, out...): flattened and transposed. The head is saved whole (with any
  adapters of its own merged), under its top-level Hugging Face module names.
  """
  state, modules, rank = {}, [], cfg.lora_rank
  for entry in layout.backbone(cfg):
    if entry.path[-1] != 'kernel':
      continue
    node = _get_node(params_np, entry.path[:-1])
    if 'lora_a' not in node:
      continue
    module = f'{cfg.family}.' + entry.hf.removesuffix('.weight')
    modules.append(module)
    state[f'base_model.model.{module}.lora_A.weight'] = np.ascontiguousarray(node['lora_a'].reshape(-1, rank).T)
    state[f'base_model.model.{module}.lora_B.weight'] = np.ascontiguousarray(node['lora_b'].reshape(rank, -1).T)
  head = head_map(cfg, layout)
  roots = list(dict.fromkeys(e.path[0] for e in head))
  merged = layers.merge_lora({r: params_np[r] for r in roots}, cfg) if rank else params_np
  for entry in head:
    state[f'base_model.model.{entry.hf}'] = np.ascontiguousarray(_to_hf(entry.kind, _get(merged, entry.path)))
  return state, modules, list(dict.fromkeys(e.hf.split('.')[0] for e in head))


def check_head(head: str, num_labels: int, name: str) -> int:
  """The head's width: 2 for 'qa', 0 for 'mlm' (it predicts the vocabulary), else num_labels (at least 1)."""
  if head not in HEAD_CLASSES:
    raise ValueError(f'head={head!r}: expected one of {", ".join(HEAD_CLASSES)} for a {name} model')
  if head == 'qa':
    return 2
  if head == 'mlm':
    return 0  # the vocabulary (BertConfig accepts it for BERT checkpoints only)
  if num_labels < 1:
    raise ValueError(f'num_labels={num_labels}: expected at least 1 for the {head!r} head')
  return num_labels


def check_model_type(hf_config: transformers.PretrainedConfig, model_types: tuple[str, ...], name: str) -> None:
  model_type = getattr(hf_config, 'model_type', None)
  if model_type not in model_types:
    raise ValueError(f'model_type={model_type!r} in config.json: expected a {name} checkpoint '
                     f'({", ".join(model_types)})')


def bert_like_config(hf_config: transformers.PretrainedConfig, family: str, *, head: str, num_labels: int,
                     hidden_dropout: float, attention_dropout: float, classifier_dropout: float,
                     dtype: Any, param_dtype: Any) -> bert.BertConfig:
  """jtune's BertConfig from a BertConfig-shaped Hugging Face config (BERT, RoBERTa)."""
  for field, want in (('hidden_act', 'gelu'), ('position_embedding_type', 'absolute'), ('is_decoder', False),
                      ('add_cross_attention', False)):
    value = getattr(hf_config, field, want)
    if value != want:
      raise ValueError(f'{field}={value!r} in config.json: expected {want}')
  if hf_config.hidden_size % hf_config.num_attention_heads:
    raise ValueError(f'hidden_size={hf_config.hidden_size} in config.json: expected a multiple of '
                     f'num_attention_heads={hf_config.num_attention_heads}')
  return bert.BertConfig(
      vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
      num_layers=hf_config.num_hidden_layers, num_heads=hf_config.num_attention_heads,
      intermediate_size=hf_config.intermediate_size,
      max_position_embeddings=hf_config.max_position_embeddings,
      type_vocab_size=hf_config.type_vocab_size, layer_norm_eps=hf_config.layer_norm_eps,
      initializer_range=hf_config.initializer_range, hidden_dropout=hidden_dropout,
      attention_dropout=attention_dropout, classifier_dropout=classifier_dropout,
      num_labels=check_head(head, num_labels, family), pad_token_id=hf_config.pad_token_id or 0,
      family=family, head=head, dtype=dtype, param_dtype=param_dtype)


def model_config_from_hf(hf_config: transformers.PretrainedConfig, *, head: str, num_labels: int,
                         hidden_dropout: float, attention_dropout: float, classifier_dropout: float,
                         dtype: Any, param_dtype: Any) -> bert.BertConfig:
  """jtune's BertConfig from a Hugging Face BertConfig; dropout rates come from jtune's config."""
  check_model_type(hf_config, MODEL_TYPES, LAYOUT.name)
  return bert_like_config(hf_config, 'bert', head=head, num_labels=num_labels, hidden_dropout=hidden_dropout,
                          attention_dropout=attention_dropout, classifier_dropout=classifier_dropout,
                          dtype=dtype, param_dtype=param_dtype)


def hf_to_params(tensors: dict[str, np.ndarray], cfg: bert.BertConfig) -> dict[str, Any]:
  """The backbone param tree ({'bert': ...}, numpy) from a Hugging Face BERT state dict."""
  return load(tensors, cfg, LAYOUT)


def params_to_hf(params: dict[str, Any], cfg: bert.BertConfig) -> dict[str, np.ndarray]:
  """A `BertFor<cfg.head>` state dict (float32, contiguous) from jtune's param tree."""
  return export_state(params, cfg, LAYOUT)


def hf_config_for_export(hf_config: transformers.PretrainedConfig, cfg: bert.BertConfig,
                         id2label: dict[int, str], problem_type: str | None) -> transformers.BertConfig:
  """The pretrained config, made a `BertFor<cfg.head>` over `id2label`."""
  return export_config(hf_config, cfg, LAYOUT, id2label, problem_type)


def peft_adapter(params_np: dict[str, Any], cfg: bert.BertConfig
                 ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """(PEFT state dict, adapted module names, modules_to_save) for a LoRA run on BERT."""
  return adapter(params_np, cfg, LAYOUT)
