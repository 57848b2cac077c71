"""RoBERTa <-> Hugging Face: BERT's names under 'roberta.', RoBERTa's own sequence head, positions from pad.

The backbone's keys are BERT's (jtune/hf/bert.py holds the map and the machinery); only the prefix, the
pretraining head ('lm_head.') and the sequence head (`classifier` = {dense, out_proj}) differ.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import transformers

from jtune.hf import bert as hf_bert
from jtune.models import bert

MODEL_TYPES = ('roberta',)
INPUTS = ('input_ids', 'attention_mask', 'token_type_ids')

LAYOUT = hf_bert.Layout(
    'RoBERTa', 'Roberta', transformers.RobertaConfig, hf_bert.backbone_map,
    tuple(hf_bert.dense_entries('classifier.dense', ('classifier', 'dense'), 'linear')
          + hf_bert.dense_entries('classifier.out_proj', ('classifier', 'out_proj'), 'linear')),
    ignored=('lm_head.',))


def model_config_from_hf(hf_config: transformers.PretrainedConfig, *, head: str, num_labels: int,
                         hidden_dropout: float, attention_dropout: float, classifier_dropout: float,
                         dtype: Any, param_dtype: Any) -> bert.BertConfig:
  """jtune's BertConfig (family 'roberta') from a Hugging Face RobertaConfig."""
  hf_bert.check_model_type(hf_config, MODEL_TYPES, LAYOUT.name)
  pad = hf_config.pad_token_id
  if pad is None or pad < 0:
    raise ValueError(f'pad_token_id={pad!r} in config.json: expected the padding id RoBERTa counts positions '
                     'from (1)')
  if hf_config.max_position_embeddings <= pad + 1:
    raise ValueError(f'max_position_embeddings={hf_config.max_position_embeddings} in config.json: expected '
                     f'more than pad_token_id + 1 = {pad + 1} (positions start after the padding id)')
  return hf_bert.bert_like_config(
      hf_config, 'roberta', head=head, num_labels=num_labels, hidden_dropout=hidden_dropout,
      attention_dropout=attention_dropout, classifier_dropout=classifier_dropout, dtype=dtype,
      param_dtype=param_dtype)


def hf_to_params(tensors: dict[str, np.ndarray], cfg: bert.BertConfig) -> dict[str, Any]:
  """The backbone param tree ({'roberta': ...}, numpy) from a Hugging Face RoBERTa state dict."""
  return hf_bert.load(tensors, cfg, LAYOUT)


def params_to_hf(params: dict[str, Any], cfg: bert.BertConfig) -> dict[str, np.ndarray]:
  """A `RobertaFor<cfg.head>` state dict (float32, contiguous) from jtune's param tree."""
  return hf_bert.export_state(params, cfg, LAYOUT)


def hf_config_for_export(hf_config: transformers.PretrainedConfig, cfg: bert.BertConfig,
                         id2label: dict[int, str], problem_type: str | None) -> transformers.RobertaConfig:
  """The pretrained config, made a `RobertaFor<cfg.head>` over `id2label`."""
  return hf_bert.export_config(hf_config, cfg, LAYOUT, id2label, problem_type)


def peft_adapter(params_np: dict[str, Any], cfg: bert.BertConfig
                 ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """(PEFT state dict, adapted module names, modules_to_save) for a LoRA run on RoBERTa."""
  return hf_bert.adapter(params_np, cfg, LAYOUT)
