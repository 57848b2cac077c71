"""DistilBERT <-> Hugging Face: its config fields (dim, n_layers, ...) and its own safetensors name map.

The backbone computes what BERT's does without token types; jtune keeps BERT's sub-names
('distilbert/layer_0/attention/query'), so only this map differs. The machinery is jtune/hf/bert.py's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import transformers

from jtune.hf import bert as hf_bert
from jtune.models import bert

MODEL_TYPES = ('distilbert',)
INPUTS = ('input_ids', 'attention_mask')
LAYER_NORM_EPS = 1e-12  # fixed in Hugging Face's DistilBERT


def backbone_map(cfg: bert.BertConfig) -> list[hf_bert.Entry]:
  """Hugging Face key (without 'distilbert.') -> jtune path under 'distilbert'."""
  dense, layer_norm = hf_bert.dense_entries, hf_bert.layer_norm_entries
  emb = ('distilbert', 'embeddings')
  entries = [
      hf_bert.Entry('embeddings.word_embeddings.weight', emb + ('word_embeddings', 'embedding'), 'copy'),
      hf_bert.Entry('embeddings.position_embeddings.weight', emb + ('position_embeddings', 'embedding'), 'copy'),
      *layer_norm('embeddings.LayerNorm', emb + ('LayerNorm',)),
  ]
  for i in range(cfg.num_layers):
    hf, jt = f'transformer.layer.{i}', ('distilbert', f'layer_{i}')
    for hf_name, name in (('q_lin', 'query'), ('k_lin', 'key'), ('v_lin', 'value')):
      entries += dense(f'{hf}.attention.{hf_name}', jt + ('attention', name), 'qkv_kernel', 'qkv_bias')
    entries += dense(f'{hf}.attention.out_lin', jt + ('attention', 'output'), 'out_kernel')
    entries += layer_norm(f'{hf}.sa_layer_norm', jt + ('attention_LayerNorm',))
    entries += dense(f'{hf}.ffn.lin1', jt + ('intermediate',), 'linear')
    entries += dense(f'{hf}.ffn.lin2', jt + ('output',), 'linear')
    entries += layer_norm(f'{hf}.output_layer_norm', jt + ('output_LayerNorm',))
  return entries


LAYOUT = hf_bert.Layout(
    'DistilBERT', 'DistilBert', transformers.DistilBertConfig, backbone_map,
    tuple(hf_bert.dense_entries('pre_classifier', ('pre_classifier',), 'linear')
          + hf_bert.dense_entries('classifier', ('classifier',), 'linear')),
    ignored=('vocab_transform.', 'vocab_layer_norm.', 'vocab_projector.'))


def model_config_from_hf(hf_config: transformers.PretrainedConfig, *, head: str, num_labels: int,
                         hidden_dropout: float, attention_dropout: float, classifier_dropout: float,
                         dtype: Any, param_dtype: Any) -> bert.BertConfig:
  """jtune's BertConfig (family 'distilbert') from a Hugging Face DistilBertConfig."""
  hf_bert.check_model_type(hf_config, MODEL_TYPES, LAYOUT.name)
  for field, want in (('activation', 'gelu'), ('sinusoidal_pos_embds', False)):
    value = getattr(hf_config, field, want)
    if value != want:
      raise ValueError(f'{field}={value!r} in config.json: expected {want}')
  if hf_config.dim % hf_config.n_heads:
    raise ValueError(f'dim={hf_config.dim} in config.json: expected a multiple of n_heads={hf_config.n_heads}')
  return bert.BertConfig(
      vocab_size=hf_config.vocab_size, hidden_size=hf_config.dim, num_layers=hf_config.n_layers,
      num_heads=hf_config.n_heads, intermediate_size=hf_config.hidden_dim,
      max_position_embeddings=hf_config.max_position_embeddings, type_vocab_size=0,
      layer_norm_eps=LAYER_NORM_EPS, initializer_range=hf_config.initializer_range,
      hidden_dropout=hidden_dropout, attention_dropout=attention_dropout, classifier_dropout=classifier_dropout,
      num_labels=hf_bert.check_head(head, num_labels, LAYOUT.name), pad_token_id=hf_config.pad_token_id or 0,
      family='distilbert', head=head, dtype=dtype, param_dtype=param_dtype)


def hf_to_params(tensors: dict[str, np.ndarray], cfg: bert.BertConfig) -> dict[str, Any]:
  """The backbone param tree ({'distilbert': ...}, numpy) from a Hugging Face DistilBERT state dict."""
  return hf_bert.load(tensors, cfg, LAYOUT)


def params_to_hf(params: dict[str, Any], cfg: bert.BertConfig) -> dict[str, np.ndarray]:
  """A `DistilBertFor<cfg.head>` state dict (float32, contiguous) from jtune's param tree."""
  return hf_bert.export_state(params, cfg, LAYOUT)


def hf_config_for_export(hf_config: transformers.PretrainedConfig, cfg: bert.BertConfig,
                         id2label: dict[int, str], problem_type: str | None) -> transformers.DistilBertConfig:
  """The pretrained config, made a `DistilBertFor<cfg.head>` over `id2label`."""
  return hf_bert.export_config(hf_config, cfg, LAYOUT, id2label, problem_type)


def peft_adapter(params_np: dict[str, Any], cfg: bert.BertConfig
                 ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """(PEFT state dict, adapted module names, modules_to_save) for a LoRA run on DistilBERT."""
  return hf_bert.adapter(params_np, cfg, LAYOUT)
