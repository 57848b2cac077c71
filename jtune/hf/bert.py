"""BERT <-> Hugging Face: config fields and the explicit safetensors name map, both directions."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import transformers

from jtune.models import bert

# Keys a BERT checkpoint may carry that fine-tuning does not use: pretraining heads, a buffer, and a
# classification head from an earlier fine-tune (the head is always initialised fresh).
IGNORED_PREFIXES = ('cls.', 'classifier.', 'embeddings.position_ids')
HEAD = ('classifier',)


@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str  # key without the 'bert.' prefix for backbone entries
  path: tuple[str, ...]  # path in jtune's param tree
  kind: str  # how the tensor is laid out: see _to_jtune / _to_hf


def model_config_from_hf(hf_config: transformers.PretrainedConfig, *, num_labels: int,
                         hidden_dropout: float, attention_dropout: float, classifier_dropout: float,
                         dtype: Any, param_dtype: Any) -> bert.BertConfig:
  """jtune's BertConfig from a Hugging Face BertConfig; dropout rates come from jtune's config."""
  if hf_config.model_type != 'bert':
    raise ValueError(f'model_type={hf_config.model_type!r} in config.json: expected a BERT checkpoint')
  if hf_config.hidden_act != 'gelu':
    raise ValueError(f'hidden_act={hf_config.hidden_act!r} in config.json: expected gelu')
  position = getattr(hf_config, 'position_embedding_type', 'absolute')
  if position != 'absolute':
    raise ValueError(f'position_embedding_type={position!r} in config.json: expected absolute')
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
      num_labels=num_labels, pad_token_id=hf_config.pad_token_id or 0, dtype=dtype,
      param_dtype=param_dtype)


def _layer_norm(hf: str, path: tuple[str, ...]) -> list[Entry]:
  return [Entry(f'{hf}.weight', path + ('scale',), 'copy'), Entry(f'{hf}.bias', path + ('bias',), 'copy')]


def _dense(hf: str, path: tuple[str, ...], kernel_kind: str, bias_kind: str = 'copy') -> list[Entry]:
  return [Entry(f'{hf}.weight', path + ('kernel',), kernel_kind),
          Entry(f'{hf}.bias', path + ('bias',), bias_kind)]


def name_map(num_layers: int) -> list[Entry]:
  """Backbone entries: Hugging Face key (without 'bert.') -> jtune path under 'bert'."""
  emb = ('bert', 'embeddings')
  entries = [
      Entry('embeddings.word_embeddings.weight', emb + ('word_embeddings', 'embedding'), 'copy'),
      Entry('embeddings.position_embeddings.weight', emb + ('position_embeddings', 'embedding'), 'copy'),
      Entry('embeddings.token_type_embeddings.weight', emb + ('token_type_embeddings', 'embedding'),
            'copy'),
      *_layer_norm('embeddings.LayerNorm', emb + ('LayerNorm',)),
  ]
  for i in range(num_layers):
    hf, jt = f'encoder.layer.{i}', ('bert', f'layer_{i}')
    for name in ('query', 'key', 'value'):
      entries += _dense(f'{hf}.attention.self.{name}', jt + ('attention', name), 'qkv_kernel', 'qkv_bias')
    entries += _dense(f'{hf}.attention.output.dense', jt + ('attention', 'output'), 'out_kernel')
    entries += _layer_norm(f'{hf}.attention.output.LayerNorm', jt + ('attention_LayerNorm',))
    entries += _dense(f'{hf}.intermediate.dense', jt + ('intermediate',), 'linear')
    entries += _dense(f'{hf}.output.dense', jt + ('output',), 'linear')
    entries += _layer_norm(f'{hf}.output.LayerNorm', jt + ('output_LayerNorm',))
  entries += _dense('pooler.dense', ('bert', 'pooler'), 'linear')
  return entries


HEAD_MAP = _dense('classifier', HEAD, 'linear')


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


def _normalise(key: str) -> str:
  """'bert.' prefix off; legacy TF names (LayerNorm.gamma/beta) to today's (weight/bias)."""
  key = key.removeprefix('bert.')
  return key.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta', 'LayerNorm.bias')


def hf_to_params(tensors: dict[str, np.ndarray], cfg: bert.BertConfig) -> dict[str, Any]:
  """The backbone param tree ({'bert': ...}, numpy) from a Hugging Face BERT state dict.

  Raises:
    ValueError: listing the missing keys, or the unexpected ones, in one line.
  """
  by_key = {_normalise(k): v for k, v in tensors.items()}
  entries = name_map(cfg.num_layers)
  missing = [e.hf for e in entries if e.hf not in by_key]
  if missing:
    raise ValueError(f'checkpoint is missing {len(missing)} BERT keys: {", ".join(missing)}')
  known = {e.hf for e in entries}
  unexpected = sorted(k for k in by_key if k not in known and not k.startswith(IGNORED_PREFIXES))
  if unexpected:
    raise ValueError(f'checkpoint has {len(unexpected)} unexpected keys for a '
                     f'{cfg.num_layers}-layer BERT: {", ".join(unexpected)}')
  params: dict[str, Any] = {}
  for e in entries:
    node = params
    for name in e.path[:-1]:
      node = node.setdefault(name, {})
    node[e.path[-1]] = _to_jtune(e.kind, np.asarray(by_key[e.hf]), cfg)
  return params


def params_to_hf(params: dict[str, Any], cfg: bert.BertConfig) -> dict[str, np.ndarray]:
  """A `BertForSequenceClassification` state dict (float32, contiguous) from jtune's param tree."""
  out = {}
  for e in name_map(cfg.num_layers):
    out[f'bert.{e.hf}'] = _to_hf(e.kind, _get(params, e.path))
  for e in HEAD_MAP:
    out[e.hf] = _to_hf(e.kind, _get(params, e.path))
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _get_node(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> np.ndarray:
  return np.asarray(_get_node(tree, path))


def hf_config_for_export(hf_config: transformers.PretrainedConfig,
                         id2label: dict[int, str]) -> transformers.BertConfig:
  """The pretrained config, made a sequence classifier over `id2label`."""
  config = transformers.BertConfig.from_dict(hf_config.to_dict())
  config.architectures = ['BertForSequenceClassification']
  config.id2label = dict(id2label)
  config.label2id = {v: k for k, v in id2label.items()}
  config.problem_type = 'single_label_classification'
  return config


def peft_adapter(params_np: dict[str, Any], cfg: bert.BertConfig) -> tuple[dict[str, np.ndarray], list[str]]:
  """The LoRA adapters (and the trained classifier) as a PEFT state dict, and the adapted module names.

  PEFT's lora_A is (r, in_features) and lora_B (out_features, r), on the torch module named by this map;
  jtune's A is (in..., r) and B (r, out...): flattened and transposed.
  """
  state, modules = {}, []
  for entry in name_map(cfg.num_layers):
    if entry.path[-1] != 'kernel':
      continue
    node = _get_node(params_np, entry.path[:-1])
    if 'lora_a' not in node:
      continue
    module = 'bert.' + entry.hf.removesuffix('.weight')
    modules.append(module)
    rank = cfg.lora_rank
    state[f'base_model.model.{module}.lora_A.weight'] = np.ascontiguousarray(node['lora_a'].reshape(-1, rank).T)
    state[f'base_model.model.{module}.lora_B.weight'] = np.ascontiguousarray(node['lora_b'].reshape(rank, -1).T)
  for entry in HEAD_MAP:
    state[f'base_model.model.{entry.hf}'] = np.ascontiguousarray(_to_hf(entry.kind, _get(params_np, entry.path)))
  return state, modules
