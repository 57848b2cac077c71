"""T5 (v1.0, v1.1, Flan-T5) <-> Hugging Face: config fields and the explicit safetensors name map, both ways.

Keys have no prefix. encoder/decoder.embed_tokens.weight are tied copies of shared.weight and are not read.
transformers 5 reads config.json's tie_word_embeddings as scale_decoder_outputs and keeps lm_head.weight apart
from shared.weight only when the checkpoint holds both with different values; jtune ties (and scales) exactly
when scale_decoder_outputs is true. An unscaled checkpoint without lm_head.weight (a T5 v1.1 model made by
transformers 5) gets lm_head as a copy of shared.weight, which is what transformers computes with.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import transformers

from jtune.hf import bert as hf_bert
from jtune.hf import llama as hf_decoder  # the name-map machinery
from jtune.hf.llama import Entry, linear_entries
from jtune.models import t5

MODEL_TYPES = ('t5',)
INPUTS = ('input_ids', 'attention_mask', 'decoder_input_ids')
PREFIX = ''  # T5ForConditionalGeneration keys are top-level
# Tied copies of shared.weight, and a cross-attention bias table that older checkpoints carry and T5 never uses.
IGNORED = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight',
           'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight')


def _attention_entries(hf: str, path: tuple[str, ...], cfg: t5.T5Config) -> list[Entry]:
  D, H, K = cfg.hidden_size, cfg.num_heads, cfg.head_dim
  entries = []
  for proj, name in (('q', 'query'), ('k', 'key'), ('v', 'value')):
    entries += linear_entries(f'{hf}.{proj}', path + (name,), (D,), (H, K), False)
  return entries + linear_entries(f'{hf}.o', path + ('output',), (H, K), (D,), False)


def name_map(cfg: t5.T5Config) -> list[Entry]:
  """Every T5ForConditionalGeneration tensor but the tied copies (lm_head.weight only when untied)."""
  D, F = cfg.hidden_size, cfg.intermediate_size
  entries = [Entry('shared.weight', ('shared', 'embedding'), 'copy', (cfg.vocab_size, D))]
  mlp = ('wi_0', 'wi_1') if cfg.feed_forward.startswith('gated-') else ('wi',)
  for stack, num_layers in (('encoder', cfg.num_layers), ('decoder', cfg.num_decoder_layers)):
    attentions = [('SelfAttention', 'attention')] + ([('EncDecAttention', 'cross_attention')]
                                                     if stack == 'decoder' else [])
    for i in range(num_layers):
      hf, jt = f'{stack}.block.{i}.layer', (stack, f'layer_{i}')
      for j, (hf_name, name) in enumerate(attentions):
        entries.append(Entry(f'{hf}.{j}.layer_norm.weight', jt + (f'{name}_norm', 'scale'), 'copy', (D,)))
        entries += _attention_entries(f'{hf}.{j}.{hf_name}', jt + (name,), cfg)
      if i == 0:
        entries.append(Entry(f'{hf}.0.SelfAttention.relative_attention_bias.weight',
                             jt + ('attention', 'relative_attention_bias'), 'copy',
                             (cfg.relative_attention_num_buckets, cfg.num_heads)))
      j = len(attentions)
      entries.append(Entry(f'{hf}.{j}.layer_norm.weight', jt + ('mlp_norm', 'scale'), 'copy', (D,)))
      for name in mlp:
        entries += linear_entries(f'{hf}.{j}.DenseReluDense.{name}', jt + ('mlp', name), (D,), (F,), False)
      entries += linear_entries(f'{hf}.{j}.DenseReluDense.wo', jt + ('mlp', 'wo'), (F,), (D,), False)
    entries.append(Entry(f'{stack}.final_layer_norm.weight', (stack, 'final_norm', 'scale'), 'copy', (D,)))
  if not cfg.tie_embeddings:
    entries.append(Entry('lm_head.weight', ('lm_head', 'kernel'), 'linear', (D, cfg.vocab_size)))
  return entries


def _tied(hf_config: transformers.PretrainedConfig) -> bool:
  """transformers 5's scale_decoder_outputs; older versions read tie_word_embeddings for both."""
  return bool(getattr(hf_config, 'scale_decoder_outputs', getattr(hf_config, 'tie_word_embeddings', True)))


def model_config_from_hf(hf_config: transformers.PretrainedConfig, *, head: str, num_labels: int,
                         hidden_dropout: float, attention_dropout: float, classifier_dropout: float,
                         dtype: Any, param_dtype: Any) -> t5.T5Config:
  """jtune's T5Config from a T5Config; dropout rates come from jtune's config (hidden_dropout for T5's
  dropout_rate everywhere but on the attention probabilities)."""
  del num_labels, classifier_dropout  # the LM head is the vocabulary; no classifier
  hf_bert.check_model_type(hf_config, MODEL_TYPES, 'T5')
  if head != 'seq2seq':
    raise ValueError(f"head={head!r}: expected 'seq2seq' for a T5 model")
  feed_forward = hf_config.feed_forward_proj
  if feed_forward not in t5.FEED_FORWARDS:
    raise ValueError(f'feed_forward_proj={feed_forward!r} in config.json: expected one of '
                     f'{", ".join(t5.FEED_FORWARDS)}')
  eos = hf_config.eos_token_id
  eos = eos[0] if isinstance(eos, (list, tuple)) else eos
  pad = hf_config.pad_token_id if hf_config.pad_token_id is not None else 0
  start = getattr(hf_config, 'decoder_start_token_id', None)
  return t5.T5Config(
      vocab_size=hf_config.vocab_size, hidden_size=hf_config.d_model, num_layers=hf_config.num_layers,
      num_decoder_layers=hf_config.num_decoder_layers or hf_config.num_layers, num_heads=hf_config.num_heads,
      head_dim=hf_config.d_kv, intermediate_size=hf_config.d_ff,
      relative_attention_num_buckets=hf_config.relative_attention_num_buckets,
      relative_attention_max_distance=hf_config.relative_attention_max_distance, feed_forward=feed_forward,
      norm_eps=hf_config.layer_norm_epsilon, tie_embeddings=_tied(hf_config), hidden_dropout=hidden_dropout,
      attention_dropout=attention_dropout, pad_token_id=pad, eos_token_id=1 if eos is None else eos,
      decoder_start_token_id=pad if start is None else start, dtype=dtype, param_dtype=param_dtype)


def hf_to_params(tensors: dict[str, np.ndarray], cfg: t5.T5Config) -> dict[str, Any]:
  """The param tree (numpy; with lm_head when untied) from a T5ForConditionalGeneration state dict.

  Raises:
    ValueError: missing or unexpected keys, a misshapen tensor, or a tied model's lm_head.weight that differs
      from shared.weight (transformers would then use it untied but scaled, which jtune does not build).
  """
  head, shared = tensors.get('lm_head.weight'), tensors.get('shared.weight')
  if cfg.tie_embeddings and head is not None and shared is not None and not np.array_equal(head, shared):
    raise ValueError('lm_head.weight differs from shared.weight in a checkpoint with scale_decoder_outputs=True: '
                     'expected the tied head of T5 v1.0 (or scale_decoder_outputs=False with its own head)')
  if not cfg.tie_embeddings and head is None and shared is not None:
    tensors = {**tensors, 'lm_head.weight': shared}  # transformers ties a missing head to the embedding
  ignored = IGNORED + (('lm_head.weight',) if cfg.tie_embeddings else ())
  name = f'T5 ({cfg.num_layers} encoder + {cfg.num_decoder_layers} decoder layers)'
  return hf_decoder.load(tensors, name_map(cfg), PREFIX, ignored, name)


def params_to_hf(params: dict[str, Any], cfg: t5.T5Config) -> dict[str, np.ndarray]:
  """A T5ForConditionalGeneration state dict (float32, contiguous) without the tied copies of shared.weight."""
  return hf_decoder.export_state(params, name_map(cfg), PREFIX)


def hf_config_for_export(hf_config: transformers.PretrainedConfig, cfg: t5.T5Config,
                         id2label: dict[int, str], problem_type: str | None) -> transformers.PretrainedConfig:
  """The pretrained config as a T5ForConditionalGeneration; tie_word_embeddings and scale_decoder_outputs say
  whether the head is tied, so transformers 4 and 5 both read it (labels do not apply to a seq2seq LM)."""
  del id2label
  if problem_type is not None:
    raise ValueError(f'problem_type={problem_type!r}: expected None for a seq2seq model')
  config = hf_decoder.export_config(hf_config, 'T5ForConditionalGeneration', None)
  config.tie_word_embeddings = cfg.tie_embeddings
  config.scale_decoder_outputs = cfg.tie_embeddings
  return config


def peft_adapter(params_np: dict[str, Any], cfg: t5.T5Config) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """(PEFT state dict, adapted module names, modules_to_save) for a LoRA run; the LM head stays frozen."""
  state, modules = hf_decoder.adapter(params_np, name_map(cfg), PREFIX, cfg.lora_rank)
  return state, modules, []
