"""Llama, Mistral and Qwen2 <-> Hugging Face: config fields and the explicit safetensors name map, both ways.

Also the name-map machinery every decoder family shares (hf/gpt2.py uses it): an `Entry` says where one
Hugging Face tensor (or one slice of a fused one) lives in jtune's tree and how it is laid out; `load`,
`export_state` and `adapter` read and write any list of entries.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import transformers

from jtune.hf import bert as hf_bert
from jtune.models import decoder

MODEL_TYPES = ('llama', 'mistral', 'qwen2')
INPUTS = ('input_ids', 'positions', 'segment_ids')
ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM', 'qwen2': 'Qwen2ForCausalLM'}
PREFIX = 'model.'  # of every key but lm_head's, in a *ForCausalLM checkpoint


@dataclasses.dataclass(frozen=True)
class Entry:
  """One Hugging Face tensor (without the family prefix) -> one jtune parameter of shape `shape`.

  kind: 'copy' (same layout), 'bias' (flattened heads), 'linear' (torch Linear weight, (out, in): transposed)
  or 'conv1d' (GPT-2's Conv1D weight, already (in, out)). A kernel's first `in_axes` dims are its inputs.
  part = (i, n): the i-th of n equal slices of the tensor's output axis (GPT-2's fused query|key|value).
  """
  hf: str
  path: tuple[str, ...]
  kind: str
  shape: tuple[int, ...]
  in_axes: int = 1
  part: tuple[int, int] = (0, 1)

  def hf_shape(self) -> tuple[int, ...]:
    """The whole tensor's shape in the checkpoint."""
    if self.kind == 'copy':
      return self.shape
    n = self.part[1]
    if self.kind == 'bias':
      return (math.prod(self.shape) * n,)
    fan_in, fan_out = math.prod(self.shape[:self.in_axes]), math.prod(self.shape[self.in_axes:]) * n
    return (fan_out, fan_in) if self.kind == 'linear' else (fan_in, fan_out)


def linear_entries(hf: str, path: tuple[str, ...], in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                   bias: bool, kind: str = 'linear', part: tuple[int, int] = (0, 1)) -> list[Entry]:
  """A projection's weight (and bias) entries; `in_shape + out_shape` is jtune's kernel shape."""
  entries = [Entry(f'{hf}.weight', path + ('kernel',), kind, in_shape + out_shape, len(in_shape), part)]
  if bias:
    entries.append(Entry(f'{hf}.bias', path + ('bias',), 'bias', out_shape, 0, part))
  return entries


def _to_jtune(e: Entry, w: np.ndarray) -> np.ndarray:
  if w.shape != e.hf_shape():
    raise ValueError(f'{e.hf} has shape {tuple(w.shape)} in the checkpoint: expected {e.hf_shape()}')
  if e.kind == 'linear':
    w = w.T
  i, n = e.part
  if n > 1:
    size = w.shape[-1] // n
    w = w[..., i * size:(i + 1) * size]
  return np.asarray(w).reshape(e.shape)


def _to_hf(e: Entry, w: np.ndarray) -> np.ndarray:
  """One part of the tensor, in the checkpoint's layout (parts are concatenated along the last axis)."""
  if e.kind == 'copy':
    return w
  if e.kind == 'bias':
    return w.reshape(-1)
  w = w.reshape(math.prod(e.shape[:e.in_axes]), -1)
  return w.T if e.kind == 'linear' else w


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _listing(keys: list[str], limit: int = 20) -> str:
  more = f' ... ({len(keys) - limit} more)' if len(keys) > limit else ''
  return ', '.join(keys[:limit]) + more


def load(tensors: dict[str, np.ndarray], entries: list[Entry], prefix: str, ignored: tuple[str, ...],
         name: str) -> dict[str, Any]:
  """jtune's numpy param tree from a state dict with or without `prefix` ('model.'); keys ending in one of
  `ignored` (buffers, a tied lm_head) are skipped.

  Raises:
    ValueError: listing the missing keys, the unexpected ones, or a tensor of the wrong shape, in one line.
  """
  by_key = {k.removeprefix(prefix): v for k, v in tensors.items()}
  missing = list(dict.fromkeys(e.hf for e in entries if e.hf not in by_key))
  if missing:
    raise ValueError(f'checkpoint is missing {len(missing)} {name} keys: {_listing(missing)}')
  known = {e.hf for e in entries}
  unexpected = sorted(k for k in by_key if k not in known and not k.endswith(ignored))
  if unexpected:
    raise ValueError(f'checkpoint has {len(unexpected)} unexpected keys for this {name}: {_listing(unexpected)}')
  params: dict[str, Any] = {}
  for e in entries:
    _set(params, e.path, _to_jtune(e, np.asarray(by_key[e.hf])))
  return params


def _export_key(hf: str, prefix: str) -> str:
  return hf if hf.startswith('lm_head.') else prefix + hf


def export_state(params: dict[str, Any], entries: list[Entry], prefix: str) -> dict[str, np.ndarray]:
  """The *ForCausalLM state dict (float32, contiguous); fused tensors are concatenated back."""
  parts: dict[str, list[np.ndarray]] = {}
  for e in entries:
    parts.setdefault(_export_key(e.hf, prefix), []).append(_to_hf(e, np.asarray(_get(params, e.path))))
  return {k: np.ascontiguousarray(np.concatenate(v, axis=-1) if len(v) > 1 else v[0], dtype=np.float32)
          for k, v in parts.items()}


def adapter(params_np: dict[str, Any], entries: list[Entry], prefix: str, rank: int
            ) -> tuple[dict[str, np.ndarray], list[str]]:
  """(PEFT state dict, adapted module names) of the LoRA adapters on the torch modules of `entries`.

  PEFT's lora_A is (r, in_features) and lora_B (out_features, r); jtune's A is (in..., r) and B (r, out...).
  A fused module (GPT-2's c_attn) takes its adapted parts' B in their rows, zeros elsewhere; with k parts adapted
  it is one adapter of rank k * r, the parts' A stacked and their B side by side (the caller's adapter config
  gives that module rank k * r and alpha k * alpha, which keeps PEFT's scale alpha / r).
  """
  parts: dict[str, list[tuple[int, int, np.ndarray, np.ndarray]]] = {}
  for e in entries:
    node = _get(params_np, e.path[:-1])
    if e.path[-1] != 'kernel' or 'lora_a' not in node:
      continue
    a_RI = np.asarray(node['lora_a']).reshape(-1, rank).T
    b_OR = np.asarray(node['lora_b']).reshape(rank, -1).T
    parts.setdefault(_export_key(e.hf, prefix).removesuffix('.weight'), []).append((*e.part, a_RI, b_OR))
  state: dict[str, np.ndarray] = {}
  for module, adapted in parts.items():
    out, n = adapted[0][3].shape[0], adapted[0][1]
    full_OR = np.zeros((out * n, rank * len(adapted)), adapted[0][3].dtype)
    for j, (i, _, _, b_OR) in enumerate(adapted):
      full_OR[i * out:(i + 1) * out, j * rank:(j + 1) * rank] = b_OR
    key = f'base_model.model.{module}'
    state[f'{key}.lora_A.weight'] = np.ascontiguousarray(np.concatenate([a for _, _, a, _ in adapted]))
    state[f'{key}.lora_B.weight'] = np.ascontiguousarray(full_OR)
  return state, list(parts)


def check_head(head: str, name: str) -> None:
  if head != 'causal_lm':
    raise ValueError(f"head={head!r}: expected 'causal_lm' for a {name} decoder")


def export_config(hf_config: transformers.PretrainedConfig, architecture: str,
                  problem_type: str | None) -> transformers.PretrainedConfig:
  """A copy of the pretrained config, made `architecture` with float32 weights."""
  if problem_type is not None:
    raise ValueError(f'problem_type={problem_type!r}: expected None for a causal LM')
  config = type(hf_config).from_dict(hf_config.to_dict())
  config.architectures = [architecture]
  config.dtype = 'float32'  # what export_state writes
  return config


def name_map(cfg: decoder.DecoderConfig) -> list[Entry]:
  """Every Llama-family tensor, without the 'model.' prefix (lm_head.weight is top-level)."""
  D, H, G, K, F, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                      cfg.vocab_size)
  entries = [Entry('embed_tokens.weight', ('decoder', 'embed_tokens', 'embedding'), 'copy', (V, D))]
  for i in range(cfg.num_layers):
    hf, jt = f'layers.{i}', ('decoder', f'layer_{i}')
    entries.append(Entry(f'{hf}.input_layernorm.weight', jt + ('attention_norm', 'scale'), 'copy', (D,)))
    for proj, name, heads in (('q_proj', 'query', H), ('k_proj', 'key', G), ('v_proj', 'value', G)):
      entries += linear_entries(f'{hf}.self_attn.{proj}', jt + ('attention', name), (D,), (heads, K),
                                cfg.attention_bias)
    entries += linear_entries(f'{hf}.self_attn.o_proj', jt + ('attention', 'output'), (H, K), (D,),
                              cfg.output_bias)
    entries.append(Entry(f'{hf}.post_attention_layernorm.weight', jt + ('mlp_norm', 'scale'), 'copy', (D,)))
    for proj, name in (('gate_proj', 'gate'), ('up_proj', 'up')):
      entries += linear_entries(f'{hf}.mlp.{proj}', jt + ('mlp', name), (D,), (F,), cfg.output_bias)
    entries += linear_entries(f'{hf}.mlp.down_proj', jt + ('mlp', 'down'), (F,), (D,), cfg.output_bias)
  entries.append(Entry('norm.weight', ('decoder', 'final_norm', 'scale'), 'copy', (D,)))
  if not cfg.tie_embeddings:
    entries.append(Entry('lm_head.weight', ('lm_head', 'kernel'), 'linear', (D, V)))
  return entries


def _ignored(cfg: decoder.DecoderConfig) -> tuple[str, ...]:
  return ('rotary_emb.inv_freq',) + (('lm_head.weight',) if cfg.tie_embeddings else ())


def _rope(hf_config: transformers.PretrainedConfig) -> tuple[float, decoder.RopeScaling | None]:
  """(rope_theta, scaling) from config.json's rope_parameters (transformers' reading of rope_scaling)."""
  params = dict(getattr(hf_config, 'rope_parameters', None) or {})
  theta = float(params.get('rope_theta', getattr(hf_config, 'rope_theta', 10000.0)))
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if params.get('partial_rotary_factor', 1.0) != 1.0:
    raise ValueError(f'partial_rotary_factor={params["partial_rotary_factor"]} in config.json: expected 1.0')
  if rope_type == 'default':
    return theta, None
  if rope_type not in decoder.ROPE_TYPES:
    raise ValueError(f'rope_scaling type {rope_type!r} in config.json: expected default, '
                     f'{", ".join(decoder.ROPE_TYPES)}')
  keys = ('low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')
  extra = {k: params[k] for k in keys if k in params and rope_type == 'llama3'}
  return theta, decoder.RopeScaling(rope_type, float(params['factor']), **extra)


def _biases(hf_config: transformers.PretrainedConfig) -> tuple[bool, bool]:
  """(attention_bias, output_bias): Qwen2 has query/key/value biases only; Llama biases all or none."""
  if hf_config.model_type == 'qwen2':
    return True, False
  if hf_config.model_type == 'mistral':
    return False, False
  attention, mlp = bool(getattr(hf_config, 'attention_bias', False)), bool(getattr(hf_config, 'mlp_bias', False))
  if attention != mlp:
    raise ValueError(f'mlp_bias={mlp} in config.json with attention_bias={attention}: expected both true or '
                     'both false')
  return attention, attention


def _sliding_window(hf_config: transformers.PretrainedConfig) -> int:
  """Mistral's window (the model implements it); Qwen2's per-layer windows are not implemented."""
  if hf_config.model_type == 'qwen2':
    if getattr(hf_config, 'use_sliding_window', False):
      raise ValueError('use_sliding_window=True in config.json: expected false (per-layer windows are not '
                       'implemented)')
    return 0
  return int(getattr(hf_config, 'sliding_window', None) or 0)


def model_config_from_hf(hf_config: transformers.PretrainedConfig, *, head: str, num_labels: int,
                         hidden_dropout: float, attention_dropout: float, classifier_dropout: float,
                         dtype: Any, param_dtype: Any) -> decoder.DecoderConfig:
  """jtune's DecoderConfig from a Llama, Mistral or Qwen2 config; dropout rates come from jtune's config."""
  del num_labels, classifier_dropout  # the LM head is the vocabulary; no classifier
  hf_bert.check_model_type(hf_config, MODEL_TYPES, 'Llama-family')
  check_head(head, 'Llama-family')
  act = getattr(hf_config, 'hidden_act', 'silu')
  if act != 'silu':
    raise ValueError(f'hidden_act={act!r} in config.json: expected silu')
  theta, scaling = _rope(hf_config)
  attention_bias, output_bias = _biases(hf_config)
  num_heads = hf_config.num_attention_heads
  return decoder.DecoderConfig(
      vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
      num_layers=hf_config.num_hidden_layers, num_heads=num_heads,
      num_kv_heads=getattr(hf_config, 'num_key_value_heads', None) or num_heads,
      head_dim=getattr(hf_config, 'head_dim', None) or hf_config.hidden_size // num_heads,
      intermediate_size=hf_config.intermediate_size, max_position_embeddings=hf_config.max_position_embeddings,
      norm='rms', norm_eps=hf_config.rms_norm_eps, positions='rope', rope_theta=theta, rope_scaling=scaling,
      sliding_window=_sliding_window(hf_config), mlp='swiglu', attention_bias=attention_bias,
      output_bias=output_bias, tie_embeddings=bool(getattr(hf_config, 'tie_word_embeddings', False)),
      initializer_range=hf_config.initializer_range, embedding_dropout=0.0,
      attention_dropout=attention_dropout, hidden_dropout=hidden_dropout,
      pad_token_id=getattr(hf_config, 'pad_token_id', None) or 0, dtype=dtype, param_dtype=param_dtype)


def hf_to_params(tensors: dict[str, np.ndarray], cfg: decoder.DecoderConfig) -> dict[str, Any]:
  """The param tree (numpy; with lm_head when untied) from a Llama-family state dict."""
  return load(tensors, name_map(cfg), PREFIX, _ignored(cfg), f'{cfg.num_layers}-layer Llama-family model')


def params_to_hf(params: dict[str, Any], cfg: decoder.DecoderConfig) -> dict[str, np.ndarray]:
  """A *ForCausalLM state dict (float32, contiguous); no lm_head.weight when tied."""
  return export_state(params, name_map(cfg), PREFIX)


def hf_config_for_export(hf_config: transformers.PretrainedConfig, cfg: decoder.DecoderConfig,
                         id2label: dict[int, str], problem_type: str | None) -> transformers.PretrainedConfig:
  """The pretrained config as its family's *ForCausalLM (labels do not apply to a causal LM)."""
  del cfg, id2label
  return export_config(hf_config, ARCHITECTURES[hf_config.model_type], problem_type)


def peft_adapter(params_np: dict[str, Any], cfg: decoder.DecoderConfig
                 ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """(PEFT state dict, adapted module names, modules_to_save) for a LoRA run.

  modules_to_save is empty: the LM head is pretrained, and LoRA runs leave it frozen (or adapt it with LoRA,
  when lora_targets matches 'lm_head', which puts it among the adapted modules).
  """
  state, modules = adapter(params_np, name_map(cfg), PREFIX, cfg.lora_rank)
  return state, modules, []
