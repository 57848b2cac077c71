"""GGUF (llama.cpp) checkpoints -> Hugging Face folders, converted once into the cache.

A Llama-architecture GGUF file becomes a float32 `LlamaForCausalLM` folder that the rest of jtune reads like any
other: every tensor is dequantized with the `gguf` package (numpy, no torch) and renamed through an explicit map,
the query/key rows that llama.cpp's converter permutes (for its interleaved RoPE) are put back in Hugging Face's
rotate-half order, config.json comes from the `llama.*` metadata and the byte-level BPE tokenizer is rebuilt from
the `tokenizer.ggml.*` metadata with `tokenizers`. Llama-family files (Llama, Mistral, SmolLM) all carry the
architecture name 'llama'.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any

import numpy as np
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors

from jtune.hf import io as hf_io

SUFFIX = '.gguf'
ARCHITECTURE = 'llama'
# GGUF tensor name (per layer: blk.{i}.NAME) -> Hugging Face LlamaForCausalLM name (model.layers.{i}.NAME).
GLOBAL_NAMES = {'token_embd.weight': 'model.embed_tokens.weight', 'output_norm.weight': 'model.norm.weight',
                'output.weight': 'lm_head.weight'}
LAYER_NAMES = {
    'attn_norm.weight': 'input_layernorm.weight',
    'attn_q.weight': 'self_attn.q_proj.weight',
    'attn_k.weight': 'self_attn.k_proj.weight',
    'attn_v.weight': 'self_attn.v_proj.weight',
    'attn_output.weight': 'self_attn.o_proj.weight',
    'ffn_norm.weight': 'post_attention_layernorm.weight',
    'ffn_gate.weight': 'mlp.gate_proj.weight',
    'ffn_up.weight': 'mlp.up_proj.weight',
    'ffn_down.weight': 'mlp.down_proj.weight',
}
# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp applies before byte-level BPE.
_GPT2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
PRE_TOKENIZERS = {
    'default': lambda: _GPT2,
    'gpt2': lambda: _GPT2,
    # llama.cpp's smollm splits every digit off, then applies GPT-2's regex: the Digits + ByteLevel of SmolLM's
    # own tokenizer.json.
    'smollm': lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2]),
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def is_gguf(name_or_path: str) -> bool:
  return name_or_path.lower().endswith(SUFFIX)


class _File:
  """The metadata and tensors of one GGUF file, with one-line errors for what jtune cannot convert."""

  def __init__(self, path: pathlib.Path):
    import gguf  # pylint: disable=g-import-not-at-top  (only GGUF users need it)
    self.path = path
    try:
      self.reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
      reason = ' '.join(str(e).split())
      raise ValueError(f'{path} is not a readable GGUF file ({reason}): expected a llama.cpp .gguf model') from e
    self.dequantize = gguf.quants.dequantize
    arch = self.get('general.architecture')
    if arch != ARCHITECTURE:
      raise ValueError(f'general.architecture={arch!r} in {path}: expected {ARCHITECTURE!r} (Llama-family GGUF '
                       'files); convert others with transformers and load the folder')

  def get(self, key: str, default: Any = ...) -> Any:
    field = self.reader.fields.get(key)
    if field is None:
      if default is ...:
        raise ValueError(f'{self.path} has no metadata key {key!r}: expected a complete llama.cpp GGUF file')
      return default
    return field.contents()

  def tensors(self) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32, in numpy (row-major) order: a linear weight is (out, in)."""
    out = {}
    for t in self.reader.tensors:
      shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions fastest first
      out[t.name] = np.asarray(self.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
    return out


def _unpermute(w_OI: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's `permute`: its rows per head are (pair, 2) interleaved; Hugging Face's are (2, pair)."""
  rows = w_OI.shape[0]
  return w_OI.reshape(num_heads, rows // num_heads // 2, 2, *w_OI.shape[1:]).swapaxes(1, 2).reshape(w_OI.shape)


def state_dict(f: _File, num_layers: int, num_heads: int, num_kv_heads: int) -> dict[str, np.ndarray]:
  """The LlamaForCausalLM state dict (float32) of the file's tensors, through the explicit name map."""
  hf = {}
  for name, w in f.tensors().items():
    if name in GLOBAL_NAMES:
      hf[GLOBAL_NAMES[name]] = w
      continue
    block, sep, rest = name.partition('.')
    layer, sep2, local = rest.partition('.')
    if block != 'blk' or not sep or not sep2 or not layer.isdigit() or local not in LAYER_NAMES:
      raise ValueError(f'tensor {name!r} in {f.path}: expected one of {", ".join(GLOBAL_NAMES)} or '
                       f'blk.N.{{{", ".join(LAYER_NAMES)}}}')
    if int(layer) >= num_layers:
      raise ValueError(f'tensor {name!r} in {f.path}: expected layers 0 to {num_layers - 1} (block_count)')
    if local == 'attn_q.weight':
      w = _unpermute(w, num_heads)
    elif local == 'attn_k.weight':
      w = _unpermute(w, num_kv_heads)
    hf[f'model.layers.{layer}.{LAYER_NAMES[local]}'] = np.ascontiguousarray(w)
  return hf


def hf_config(f: _File, tied: bool) -> transformers.LlamaConfig:
  """A LlamaConfig from the `llama.*` metadata."""
  key = lambda name, default=...: f.get(f'{ARCHITECTURE}.{name}', default)  # noqa: E731
  hidden, heads = int(key('embedding_length')), int(key('attention.head_count'))
  head_dim = int(key('rope.dimension_count', hidden // heads))
  if head_dim != int(key('attention.key_length', head_dim)):
    raise ValueError(f'rope.dimension_count={head_dim} differs from attention.key_length in {f.path}: expected '
                     'RoPE over whole heads')
  rope = {'rope_type': 'default', 'rope_theta': float(key('rope.freq_base', 10000.0))}
  scaling = str(key('rope.scaling.type', 'none'))
  legacy = float(key('rope.scale_linear', 1.0))  # older files: a linear factor alone
  if scaling == 'none' and legacy != 1.0:
    scaling = 'linear'
  if scaling == 'linear':
    rope.update(rope_type='linear', factor=float(key('rope.scaling.factor', legacy)))
  elif scaling != 'none':
    raise ValueError(f'{ARCHITECTURE}.rope.scaling.type={scaling!r} in {f.path}: expected none or linear')
  return transformers.LlamaConfig(
      vocab_size=len(f.get('tokenizer.ggml.tokens')), hidden_size=hidden,
      intermediate_size=int(key('feed_forward_length')), num_hidden_layers=int(key('block_count')),
      num_attention_heads=heads, num_key_value_heads=int(key('attention.head_count_kv', heads)),
      head_dim=head_dim, max_position_embeddings=int(key('context_length')),
      rms_norm_eps=float(key('attention.layer_norm_rms_epsilon')),
      rope_parameters=rope,
      tie_word_embeddings=tied, bos_token_id=f.get('tokenizer.ggml.bos_token_id', None),
      eos_token_id=f.get('tokenizer.ggml.eos_token_id', None),
      pad_token_id=f.get('tokenizer.ggml.padding_token_id', None), architectures=['LlamaForCausalLM'],
      dtype='float32')


def tokenizer(f: _File) -> transformers.PreTrainedTokenizerFast:
  """The byte-level BPE tokenizer of `tokenizer.ggml.*`: vocabulary, merges, pre-tokenizer, special tokens."""
  kind, pre = f.get('tokenizer.ggml.model'), f.get('tokenizer.ggml.pre', 'default')
  if kind != 'gpt2':
    raise ValueError(f'tokenizer.ggml.model={kind!r} in {f.path}: expected \'gpt2\' (byte-level BPE)')
  if pre not in PRE_TOKENIZERS:
    raise ValueError(f'tokenizer.ggml.pre={pre!r} in {f.path}: expected one of {", ".join(PRE_TOKENIZERS)}')
  tokens = list(f.get('tokenizer.ggml.tokens'))
  types = list(f.get('tokenizer.ggml.token_type', [1] * len(tokens)))
  merges = [tuple(m.split(' ', 1)) for m in f.get('tokenizer.ggml.merges')]
  tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
  tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t, kind in zip(tokens, types) if kind == CONTROL])
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                  for t, kind in zip(tokens, types) if kind == USER_DEFINED])
  special = lambda name: (tokens[f.get(f'tokenizer.ggml.{name}_token_id')]  # noqa: E731
                          if f.get(f'tokenizer.ggml.{name}_token_id', None) is not None else None)
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=special('bos'), eos_token=special('eos'), unk_token=special('unknown'),
      pad_token=special('padding'), chat_template=f.get('tokenizer.chat_template', None),
      model_max_length=int(f.get(f'{ARCHITECTURE}.context_length')), clean_up_tokenization_spaces=False)


def _write(f: _File, out: pathlib.Path) -> None:
  heads = int(f.get(f'{ARCHITECTURE}.attention.head_count'))
  kv_heads = int(f.get(f'{ARCHITECTURE}.attention.head_count_kv', heads))
  tensors = state_dict(f, int(f.get(f'{ARCHITECTURE}.block_count')), heads, kv_heads)
  config = hf_config(f, tied='lm_head.weight' not in tensors)
  hf_io.export(out, tensors, config, tokenizer(f))


def convert(path: str | os.PathLike, cache_dir: str) -> pathlib.Path:
  """The Hugging Face folder of a local .gguf file under `cache_dir/gguf/`, converted on first use.

  The folder is named after the file and a hash of its absolute path, size and modification time, so an
  edited file is converted again; it appears complete or not at all.
  """
  path = pathlib.Path(path).expanduser().absolute()
  if not path.is_file():
    raise FileNotFoundError(f'GGUF file {str(path)!r} does not exist: expected a llama.cpp .gguf model file')
  stat = path.stat()
  digest = hashlib.sha256(f'{path}|{stat.st_size}|{stat.st_mtime_ns}'.encode()).hexdigest()[:12]
  out = pathlib.Path(cache_dir).expanduser() / 'gguf' / f'{path.stem}-{digest}'
  if not (out / 'config.json').is_file():
    _write(_File(path), out)
  return out
