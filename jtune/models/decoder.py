"""Decoder-only language models in Flax linen: GPT-2 and the Llama family (Llama, Mistral, Qwen2), by config flags.

One pre-norm block serves every family; `DecoderConfig` says what differs: LayerNorm or RMSNorm, learned
positions or RoPE, a GELU MLP or SwiGLU, which projections carry biases, grouped-query attention, tied
embeddings. Rows may pack several examples: attention runs from query i to key j only when j <= i and both
carry the same non-zero segment id (0 is padding), and `positions` restart at 0 for every example.

Generation keeps an explicit KV cache (`init_cache`, `DecoderForCausalLM.decode`): a pytree in, a pytree out,
with one slot per token; a key slot is visible to a query slot when it is not later and has the same segment.
Shape suffixes: B batch, L length, T new tokens, S cache slots, D embed, H query heads, G key/value heads,
R query heads per key/value head, K head dim, F mlp, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtune.models.layers import (REMAT_POLICIES, REMATS, Dense, Dropout, HeadInputs, RMSNorm, apply_layers,
                                 embed_logits, gelu, lookup)
from jtune.models.layers import normal_init as _normal

Dtype = Any
Cache = dict[str, Any]
NORMS = ('layer', 'rms')
POSITIONS = ('learned', 'rope')
MLPS = ('gelu_new', 'gelu', 'swiglu')
ROPE_TYPES = ('linear', 'llama3')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rescaled RoPE frequencies as transformers computes them: 'linear' divides every frequency by `factor`;
  'llama3' divides the low ones, keeps the high ones and blends those in between."""
  type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.type not in ROPE_TYPES:
      raise ValueError(f'rope type {self.type!r}: expected one of {", ".join(ROPE_TYPES)}')


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Decoder hyperparameters; `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  max_position_embeddings: int
  norm: str = 'rms'  # 'layer' (GPT-2) or 'rms' (Llama)
  norm_eps: float = 1e-6
  positions: str = 'rope'  # 'learned' (GPT-2) or 'rope'
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  sliding_window: int = 0  # > 0: a query sees only the last `sliding_window` keys (Mistral); 0: all
  mlp: str = 'swiglu'  # 'gelu_new' (GPT-2's tanh approximation), 'gelu' (exact) or 'swiglu'
  attention_bias: bool = False  # query/key/value biases (GPT-2, Qwen2)
  output_bias: bool = False  # attention output and MLP biases (GPT-2)
  tie_embeddings: bool = False  # logits = x . embed_tokens^T, no lm_head
  initializer_range: float = 0.02
  embedding_dropout: float = 0.0
  attention_dropout: float = 0.0
  hidden_dropout: float = 0.0  # on the attention and MLP outputs, before the residual sum
  pad_token_id: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = 'none'  # recompute each layer's activations in the backward pass: 'none', 'full' or 'dots'
  scan_layers: bool = False  # train and evaluate the layers as one lax.scan (layers.apply_layers); not with a cache
  lora_rank: int = 0  # LoRA on the Dense layers whose path matches lora_targets (see jtune.models.layers)
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ('attention/query$', 'attention/value$')
  head: str = 'causal_lm'
  lm_head_chunks: int = 1  # > 1: the model returns layers.HeadInputs, the loss applies the head in chunks

  def __post_init__(self):
    for field, value, allowed in (('norm', self.norm, NORMS), ('positions', self.positions, POSITIONS),
                                  ('mlp', self.mlp, MLPS), ('remat', self.remat, REMATS),
                                  ('head', self.head, ('causal_lm',))):
      if value not in allowed:
        raise ValueError(f'{field}={value!r}: expected one of {", ".join(allowed)} for a decoder')
    if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_kv_heads={self.num_kv_heads}: expected a divisor of num_heads={self.num_heads}')
    if self.lm_head_chunks < 1:
      raise ValueError(f'lm_head_chunks={self.lm_head_chunks}: expected a positive number of chunks')
    if self.positions == 'rope' and self.head_dim % 2:
      raise ValueError(f'head_dim={self.head_dim}: expected an even size for RoPE')


def _norm(cfg: DecoderConfig, name: str | None = None) -> nn.Module:
  if cfg.norm == 'rms':
    return RMSNorm(cfg, name=name)
  return nn.LayerNorm(
      epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)))


def rope_frequencies(cfg: DecoderConfig) -> np.ndarray:
  """The inverse frequencies [K / 2] (float32) of transformers' rope types 'default', 'linear' and 'llama3'."""
  dim = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  scaling = cfg.rope_scaling
  if scaling is None:
    return inv_freq.astype(np.float32)
  if scaling.type == 'linear':
    return (inv_freq / scaling.factor).astype(np.float32)
  old = scaling.original_max_position_embeddings
  low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BLHK: jax.Array, positions_BL: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates pairs (k, k + K/2) of every head by position * frequency (transformers' rotate_half layout)."""
  freqs_BLk = positions_BL[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  angles_BL1K = jnp.concatenate([freqs_BLk, freqs_BLk], axis=-1)[:, :, None, :]
  x32_BLHK = x_BLHK.astype(jnp.float32)
  half = x_BLHK.shape[-1] // 2
  rotated_BLHK = jnp.concatenate([-x32_BLHK[..., half:], x32_BLHK[..., :half]], axis=-1)
  return (x32_BLHK * jnp.cos(angles_BL1K) + rotated_BLHK * jnp.sin(angles_BL1K)).astype(x_BLHK.dtype)


def attention_mask(q_slots_L: jax.Array, q_segments_BL: jax.Array, k_segments_BS: jax.Array,
                   sliding_window: int = 0) -> jax.Array:
  """[B, 1, 1, L, S] booleans: key slot s is visible to the query in slot q_slots[l] when s <= q_slots[l], the
  segments agree and are not padding (0), and (with a window) q_slots[l] - s < sliding_window."""
  k_slots_S = jnp.arange(k_segments_BS.shape[1])
  visible_LS = k_slots_S[None, :] <= q_slots_L[:, None]
  if sliding_window:
    visible_LS &= q_slots_L[:, None] - k_slots_S[None, :] < sliding_window
  same_BLS = (q_segments_BL[:, :, None] == k_segments_BS[:, None, :]) & (k_segments_BS[:, None, :] != 0)
  return (visible_LS[None] & same_BLS)[:, None, None]


def attend_grouped(q_BLHK, k_BSGK, v_BSGK, mask_B11LS, dropout) -> jax.Array:
  """softmax(q k^T / sqrt(K), masked) v per head, query head g * R + r reading key/value head g, the probabilities
  through `dropout`; [batch, length, heads, kv] in and out. The products run on heads-first copies, as
  bert.attend's do: on a CPU, 35% off the Llama shape's attention forward and 17% off its backward (GPT-2's: 12%
  and 5%), and the same for a decode step over a cache (benchmarks/README.md)."""
  (B, L, H, K), G = q_BLHK.shape, k_BSGK.shape[2]
  q_BGRLK = q_BLHK.reshape(B, L, G, H // G, K).transpose(0, 2, 3, 1, 4)
  k_BGSK, v_BGSK = k_BSGK.transpose(0, 2, 1, 3), v_BSGK.transpose(0, 2, 1, 3)
  scores_BGRLS = jnp.einsum('bgrlk,bgsk->bgrls', q_BGRLK, k_BGSK, preferred_element_type=jnp.float32)
  scores_BGRLS = jnp.where(mask_B11LS, scores_BGRLS / np.sqrt(K).astype(np.float32), jnp.finfo(jnp.float32).min)
  probs_BGRLS = jax.nn.softmax(scores_BGRLS, axis=-1).astype(v_BSGK.dtype)
  out_BGRLK = jnp.einsum('bgrls,bgsk->bgrlk', dropout(probs_BGRLS), v_BGSK)
  return out_BGRLK.transpose(0, 3, 1, 2, 4).reshape(B, L, H, K)


class Attention(nn.Module):
  """Grouped-query self-attention; with a cache, the new keys and values are written at `cache_index` first."""
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x_BLD, positions_BL, mask_B11LS, deterministic: bool, cache: Cache | None = None,
               cache_index: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
    cfg = self.cfg
    H, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    proj = lambda heads, axis, name: Dense(  # noqa: E731
        cfg, (heads, K), ('embed', axis, 'kv'), use_bias=cfg.attention_bias, name=name)(x_BLD, deterministic)
    q_BLHK, k_BLGK, v_BLGK = proj(H, 'heads', 'query'), proj(G, 'kv_heads', 'key'), proj(G, 'kv_heads', 'value')
    if cfg.positions == 'rope':
      inv_freq = rope_frequencies(cfg)
      q_BLHK, k_BLGK = apply_rope(q_BLHK, positions_BL, inv_freq), apply_rope(k_BLGK, positions_BL, inv_freq)
    q_BLHK = nn.with_logical_constraint(q_BLHK, ('batch', 'length', 'act_heads', 'kv'))
    k_BSGK = nn.with_logical_constraint(k_BLGK, ('batch', 'length', 'act_heads', 'kv'))
    v_BSGK = nn.with_logical_constraint(v_BLGK, ('batch', 'length', 'act_heads', 'kv'))
    if cache is not None:
      write = lambda old, new: jax.lax.dynamic_update_slice(  # noqa: E731
          old, new.astype(old.dtype), (0, cache_index, 0, 0))
      k_BSGK, v_BSGK = write(cache['key'], k_BSGK), write(cache['value'], v_BSGK)
      cache = {'key': k_BSGK, 'value': v_BSGK}
    dropout = functools.partial(Dropout(cfg.attention_dropout), deterministic=deterministic)
    out_BLHK = attend_grouped(q_BLHK, k_BSGK, v_BSGK.astype(cfg.dtype), mask_B11LS, dropout)
    out_BLHK = nn.with_logical_constraint(out_BLHK, ('batch', 'length', 'act_heads', 'kv'))
    out_BLD = Dense(cfg, (cfg.hidden_size,), ('heads', 'kv', 'embed'), in_axes=2, use_bias=cfg.output_bias,
                    name='output')(out_BLHK, deterministic)
    return out_BLD, cache


class Mlp(nn.Module):
  """down(silu(gate(x)) * up(x)) (SwiGLU), or down(gelu(up(x)))."""
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x_BLD, deterministic: bool) -> jax.Array:
    cfg = self.cfg
    dense = lambda features, names, name: Dense(  # noqa: E731
        cfg, features, names, use_bias=cfg.output_bias, name=name)
    up_BLF = dense((cfg.intermediate_size,), ('embed', 'mlp'), 'up')(x_BLD, deterministic)
    if cfg.mlp == 'swiglu':
      gate_BLF = dense((cfg.intermediate_size,), ('embed', 'mlp'), 'gate')(x_BLD, deterministic)
      h_BLF = nn.silu(gate_BLF) * up_BLF
    else:
      h_BLF = nn.gelu(up_BLF, approximate=True) if cfg.mlp == 'gelu_new' else gelu(up_BLF)
    h_BLF = nn.with_logical_constraint(h_BLF, ('batch', 'length', 'act_mlp'))
    return dense((cfg.hidden_size,), ('mlp', 'embed'), 'down')(h_BLF, deterministic)


class Block(nn.Module):
  """One pre-norm layer: x += Attn(norm(x)); x += MLP(norm(x))."""
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x_BLD, positions_BL, mask_B11LS, deterministic: bool, cache: Cache | None = None,
               cache_index: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
    cfg = self.cfg
    drop = lambda y: Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)  # noqa: E731
    attn_BLD, cache = Attention(cfg, name='attention')(
        _norm(cfg, 'attention_norm')(x_BLD), positions_BL, mask_B11LS, deterministic, cache, cache_index)
    x_BLD = x_BLD + drop(attn_BLD)
    x_BLD = x_BLD + drop(Mlp(cfg, name='mlp')(_norm(cfg, 'mlp_norm')(x_BLD), deterministic))
    return nn.with_logical_constraint(x_BLD, ('batch', 'length', 'act_embed')), cache


class Decoder(nn.Module):
  """Embeddings, the blocks and the final norm: hidden states [B, L, D] (and the updated cache)."""
  cfg: DecoderConfig

  def setup(self):
    cfg = self.cfg
    embed = lambda size, names: nn.Embed(  # noqa: E731
        size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, embedding_init=_normal(cfg, names))
    self.embed_tokens = embed(cfg.vocab_size, ('vocab', 'embed'))
    if cfg.positions == 'learned':
      self.position_embeddings = embed(cfg.max_position_embeddings, (None, 'embed'))
    block_cls = Block
    if cfg.remat != 'none':  # 'dots' keeps the matmul outputs and recomputes the rest
      block_cls = nn.remat(Block, static_argnums=(4,), policy=REMAT_POLICIES[cfg.remat])
    self.layers = [block_cls(cfg, name=f'layer_{i}') for i in range(cfg.num_layers)]
    self.final_norm = _norm(cfg)
    self.dropout = Dropout(cfg.embedding_dropout)

  def __call__(self, input_ids_BL, positions_BL, segment_ids_BL, deterministic: bool,
               cache: Cache | None = None, cache_index: jax.Array | None = None
               ) -> tuple[jax.Array, Cache | None]:
    cfg = self.cfg
    x_BLD = lookup(self.embed_tokens, input_ids_BL)
    if cfg.positions == 'learned':
      x_BLD += lookup(self.position_embeddings, positions_BL)
    x_BLD = nn.with_logical_constraint(self.dropout(x_BLD, deterministic=deterministic),
                                       ('batch', 'length', 'act_embed'))
    L = input_ids_BL.shape[1]
    if cache is None:
      mask_B11LS = attention_mask(jnp.arange(L), segment_ids_BL, segment_ids_BL, cfg.sliding_window)
      new_cache = None
    else:
      segments_BS = jax.lax.dynamic_update_slice(cache['segment_ids'], segment_ids_BL.astype(jnp.int32),
                                                 (0, cache_index))
      mask_B11LS = attention_mask(cache_index + jnp.arange(L), segment_ids_BL, segments_BS, cfg.sliding_window)
      new_cache = {'segment_ids': segments_BS}
    if cache is None and not self.is_initializing():
      names = [f'layer_{i}' for i in range(cfg.num_layers)]
      x_BLD = apply_layers(self, Block(cfg, parent=None), names, x_BLD, positions_BL, mask_B11LS,
                           deterministic=deterministic, remat=cfg.remat, scan=cfg.scan_layers, first_output=True)
      return self.final_norm(x_BLD), None
    for i, layer in enumerate(self.layers):
      name = f'layer_{i}'
      x_BLD, layer_cache = layer(x_BLD, positions_BL, mask_B11LS, deterministic,
                                 None if cache is None else cache[name], cache_index)
      if new_cache is not None:
        new_cache[name] = layer_cache
    return self.final_norm(x_BLD), new_cache

  def attend(self, x_BLD: jax.Array) -> jax.Array:
    """Logits against the token embeddings (tied LM head)."""
    return embed_logits(self.embed_tokens, x_BLD)

class DecoderForCausalLM(nn.Module):
  """Next-token logits [B, L, V] in float32 ([B, P, V] at given target positions); `decode` runs the same model
  against a KV cache."""
  cfg: DecoderConfig

  def setup(self):
    cfg = self.cfg
    self.decoder = Decoder(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = Dense(cfg, (cfg.vocab_size,), ('embed', 'vocab'), use_bias=False)

  def __call__(self, input_ids_BL, positions_BL, segment_ids_BL, target_positions_BP=None, *,
               deterministic: bool) -> jax.Array | HeadInputs:
    """Logits [B, L, V]; with `target_positions_BP` (the positions that have a target, data/batching.py), [B, P, V]
    at those positions only: the LM head, a fifth of SmolLM2-135M's forward pass at 128 tokens, and the loss over
    the vocabulary then run there only. With cfg.lm_head_chunks > 1, the head's inputs instead (`_head_inputs`)."""
    x_BLD, _ = self.decoder(input_ids_BL, positions_BL, segment_ids_BL, deterministic)
    if target_positions_BP is not None:
      x_BLD = jnp.take_along_axis(x_BLD, target_positions_BP[:, :, None], axis=1)
    if self.cfg.lm_head_chunks > 1 and not self.is_initializing():
      return self._head_inputs(x_BLD)
    return self._logits(x_BLD, deterministic)

  def _head_inputs(self, x_BLD: jax.Array) -> HeadInputs:
    """The hidden states and the head's weight, for a loss that applies the head in cfg.lm_head_chunks chunks."""
    cfg, params = self.cfg, nn.unbox(self.variables['params'])
    if cfg.tie_embeddings:
      return HeadInputs(x_BLD, jnp.asarray(params['decoder']['embed_tokens']['embedding'], cfg.dtype), tied=True,
                        chunks=cfg.lm_head_chunks)
    if 'lora_a' in params['lm_head']:
      raise ValueError(f'lm_head_chunks={cfg.lm_head_chunks} applies the LM head without its LoRA adapters: '
                       f"expected lora_targets {cfg.lora_targets} that do not match 'lm_head', or lm_head_chunks=1")
    return HeadInputs(x_BLD, jnp.asarray(params['lm_head']['kernel'], cfg.dtype), tied=False,
                      chunks=cfg.lm_head_chunks)

  def decode(self, input_ids_BT, positions_BT, segment_ids_BT, cache: Cache, cache_index: jax.Array,
             last_only: bool = False) -> tuple[jax.Array, Cache]:
    """(logits [B, T, V], the cache with these T tokens written at slots cache_index ... cache_index + T - 1).

    A prompt batch is prefilled with T = its length and cache_index 0; each generated token is one more call
    with T = 1. Padding carries segment id 0 and is never attended to. `last_only`: the logits of the last of
    the T tokens only, [B, 1, V], what a prefill needs (the head at every prompt token would be a [B, T, V]
    array: 3.2 GB for 16 prompts padded to 1,024 tokens on SmolLM2's vocabulary).
    """
    x_BTD, cache = self.decoder(input_ids_BT, positions_BT, segment_ids_BT, True, cache, cache_index)
    return self._logits(x_BTD[:, -1:] if last_only else x_BTD, True), cache

  def _logits(self, x_BLD: jax.Array, deterministic: bool) -> jax.Array:
    if self.cfg.tie_embeddings:
      logits_BLV = self.decoder.attend(x_BLD)
    else:
      logits_BLV = self.lm_head(x_BLD, deterministic)
    return nn.with_logical_constraint(logits_BLV.astype(jnp.float32), ('batch', 'length', 'vocab'))


def init_cache(cfg: DecoderConfig, batch_size: int, num_slots: int) -> Cache:
  """An empty KV cache: every slot is padding (segment 0) until `decode` writes it."""
  shape = (batch_size, num_slots, cfg.num_kv_heads, cfg.head_dim)
  layer = lambda: {'key': jnp.zeros(shape, cfg.dtype), 'value': jnp.zeros(shape, cfg.dtype)}  # noqa: E731
  return {'segment_ids': jnp.zeros((batch_size, num_slots), jnp.int32),
          **{f'layer_{i}': layer() for i in range(cfg.num_layers)}}


def build(cfg: DecoderConfig) -> nn.Module:
  """The causal LM, called as module.apply(variables, input_ids_BL, positions_BL, segment_ids_BL[,
  target_positions_BP], deterministic=...); generation uses method='decode' with an `init_cache` cache."""
  return DecoderForCausalLM(cfg)
