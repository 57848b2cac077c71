"""GPT-2 <-> Hugging Face: config fields and the explicit safetensors name map, both ways.

GPT-2's projections are Conv1D modules whose weights are already (in, out); c_attn fuses query|key|value along
its output axis and is split into jtune's three projections (and concatenated back on export). The LM head is
tied to the token embeddings (wte) unless tie_word_embeddings is false.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import transformers

from jtune.hf import bert as hf_bert
from jtune.hf import llama as hf_decoder  # the decoder name-map machinery
from jtune.hf.llama import Entry, linear_entries
from jtune.models import decoder

MODEL_TYPES = ('gpt2',)
INPUTS = ('input_ids', 'positions', 'segment_ids')
PREFIX = 'transformer.'  # of every key but lm_head's, in a GPT2LMHeadModel checkpoint
ACTIVATIONS = {'gelu_new': 'gelu_new', 'gelu_pytorch_tanh': 'gelu_new', 'gelu': 'gelu'}
# Buffers of older checkpoints: the causal mask and its fill value.
BUFFERS = ('.attn.bias', '.attn.masked_bias')


def name_map(cfg: decoder.DecoderConfig) -> list[Entry]:
  """Every GPT-2 tensor, without the 'transformer.' prefix (lm_head.weight is top-level)."""
  D, H, K, F = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
  entries = [Entry('wte.weight', ('decoder', 'embed_tokens', 'embedding'), 'copy', (cfg.vocab_size, D)),
             Entry('wpe.weight', ('decoder', 'position_embeddings', 'embedding'), 'copy',
                   (cfg.max_position_embeddings, D))]
  norm = lambda hf, path: [Entry(f'{hf}.weight', path + ('scale',), 'copy', (D,)),  # noqa: E731
                           Entry(f'{hf}.bias', path + ('bias',), 'copy', (D,))]
  for i in range(cfg.num_layers):
    hf, jt = f'h.{i}', ('decoder', f'layer_{i}')
    entries += norm(f'{hf}.ln_1', jt + ('attention_norm',))
    for part, name in enumerate(('query', 'key', 'value')):
      entries += linear_entries(f'{hf}.attn.c_attn', jt + ('attention', name), (D,), (H, K), True, 'conv1d',
                                (part, 3))
    entries += linear_entries(f'{hf}.attn.c_proj', jt + ('attention', 'output'), (H, K), (D,), True, 'conv1d')
    entries += norm(f'{hf}.ln_2', jt + ('mlp_norm',))
    entries += linear_entries(f'{hf}.mlp.c_fc', jt + ('mlp', 'up'), (D,), (F,), True, 'conv1d')
    entries += linear_entries(f'{hf}.mlp.c_proj', jt + ('mlp', 'down'), (F,), (D,), True, 'conv1d')
  entries += norm('ln_f', ('decoder', 'final_norm'))
  if not cfg.tie_embeddings:
    entries.append(Entry('lm_head.weight', ('lm_head', 'kernel'), 'linear', (D, cfg.vocab_size)))
  return entries


def _check_supported(hf_config: transformers.PretrainedConfig) -> None:
  for field, want in (('scale_attn_weights', True), ('scale_attn_by_inverse_layer_idx', False),
                      ('add_cross_attention', False)):
    value = getattr(hf_config, field, want)
    if value != want:
      raise ValueError(f'{field}={value!r} in config.json: expected {want}')
  act = getattr(hf_config, 'activation_function', 'gelu_new')
  if act not in ACTIVATIONS:
    raise ValueError(f'activation_function={act!r} in config.json: expected one of {", ".join(ACTIVATIONS)}')
  if hf_config.n_embd % hf_config.n_head:
    raise ValueError(f'n_embd={hf_config.n_embd} in config.json: expected a multiple of n_head={hf_config.n_head}')


def model_config_from_hf(hf_config: transformers.PretrainedConfig, *, head: str, num_labels: int,
                         hidden_dropout: float, attention_dropout: float, classifier_dropout: float,
                         dtype: Any, param_dtype: Any) -> decoder.DecoderConfig:
  """jtune's DecoderConfig from a GPT2Config; dropout rates come from jtune's config (hidden_dropout also
  after the embeddings, as GPT-2's embd_pdrop)."""
  del num_labels, classifier_dropout  # the LM head is the vocabulary; no classifier
  hf_bert.check_model_type(hf_config, MODEL_TYPES, 'GPT-2')
  hf_decoder.check_head(head, 'GPT-2')
  _check_supported(hf_config)
  D, H = hf_config.n_embd, hf_config.n_head
  return decoder.DecoderConfig(
      vocab_size=hf_config.vocab_size, hidden_size=D, num_layers=hf_config.n_layer, num_heads=H,
      num_kv_heads=H, head_dim=D // H, intermediate_size=hf_config.n_inner or 4 * D,
      max_position_embeddings=hf_config.n_positions, norm='layer', norm_eps=hf_config.layer_norm_epsilon,
      positions='learned', mlp=ACTIVATIONS[getattr(hf_config, 'activation_function', 'gelu_new')],
      attention_bias=True, output_bias=True,
      tie_embeddings=bool(getattr(hf_config, 'tie_word_embeddings', True)),
      initializer_range=hf_config.initializer_range, embedding_dropout=hidden_dropout,
      attention_dropout=attention_dropout, hidden_dropout=hidden_dropout,
      pad_token_id=getattr(hf_config, 'pad_token_id', None) or 0, dtype=dtype, param_dtype=param_dtype)


def _ignored(cfg: decoder.DecoderConfig) -> tuple[str, ...]:
  return BUFFERS + (('lm_head.weight',) if cfg.tie_embeddings else ())


def hf_to_params(tensors: dict[str, np.ndarray], cfg: decoder.DecoderConfig) -> dict[str, Any]:
  """The param tree (numpy; with lm_head when untied) from a GPT2LMHeadModel or GPT2Model state dict."""
  return hf_decoder.load(tensors, name_map(cfg), PREFIX, _ignored(cfg), f'{cfg.num_layers}-layer GPT-2')


def params_to_hf(params: dict[str, Any], cfg: decoder.DecoderConfig) -> dict[str, np.ndarray]:
  """A GPT2LMHeadModel state dict (float32, contiguous); no lm_head.weight when tied."""
  return hf_decoder.export_state(params, name_map(cfg), PREFIX)


def hf_config_for_export(hf_config: transformers.PretrainedConfig, cfg: decoder.DecoderConfig,
                         id2label: dict[int, str], problem_type: str | None) -> transformers.PretrainedConfig:
  """The pretrained config as a GPT2LMHeadModel (labels do not apply to a causal LM)."""
  del cfg, id2label
  return hf_decoder.export_config(hf_config, 'GPT2LMHeadModel', problem_type)


def peft_adapter(params_np: dict[str, Any], cfg: decoder.DecoderConfig
                 ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """(PEFT state dict, adapted module names, modules_to_save) for a LoRA run.

  PEFT adapts the fused c_attn as one module with one rank-r adapter, so at most one of query, key and value
  may carry adapters (the others get zero rows); otherwise this raises ValueError.
  """
  state, modules = hf_decoder.adapter(params_np, name_map(cfg), PREFIX, cfg.lora_rank)
  return state, modules, []
