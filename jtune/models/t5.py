"""The T5 family of encoder-decoders (T5 v1.0, T5 v1.1, Flan-T5) in Flax linen, as transformers computes them.

Pre-norm blocks with T5's RMS norm (no mean, no bias), attention without 1/sqrt(K) scaling and no Dense biases.
Positions enter only as a learned bias per (relative-position bucket, head), held by layer 0 of each stack and
added to the self-attention scores of every layer: bidirectional buckets in the encoder, causal ones in the
decoder, none in cross-attention. A tied model scales the decoder output by D**-0.5 before the shared embedding
(transformers' scale_decoder_outputs); an untied one has its own lm_head and no scaling.

Parameter tree (LoRA targets match these paths, e.g. 'attention/query$' also matches 'cross_attention/query'):
  shared/embedding [V, D]
  encoder/layer_{i}/attention_norm/scale, attention/{query,key,value}/kernel [D, H, K], attention/output/kernel
    [H, K, D], mlp_norm/scale, mlp/{wi | wi_0, wi_1}/kernel [D, F], mlp/wo/kernel [F, D]
  encoder/layer_0/attention/relative_attention_bias [N, H]; encoder/final_norm/scale
  decoder/...: the same, with cross_attention_norm/scale and cross_attention/{query,key,value,output}/kernel
    between attention and mlp; decoder/layer_0/attention/relative_attention_bias; decoder/final_norm/scale
  lm_head/kernel [D, V] (untied only)

Generation keeps an explicit cache (`start_cache`, `decode`): per decoder layer the cross-attention keys and
values, projected once from the encoder output, and one self-attention key/value slot per decoder token.
Shape suffixes: B batch, S encoder tokens (attention keys in general), T decoder tokens (the new ones when
decoding), C decoder key slots (T, or the cache's slots), D embed, H heads, K head dim, F mlp, V vocab, N buckets.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jtune.models.layers import (REMAT_POLICIES, REMATS, Dense, Dropout, RMSNorm, apply_layers, embed_logits, gelu,
                                 lookup)
from jtune.models.layers import normal_init as _normal

Dtype = Any
Cache = dict[str, Any]
ACTIVATIONS = {'relu': nn.relu, 'gelu': gelu,
               'gelu_new': functools.partial(nn.gelu, approximate=True), 'silu': nn.silu}
# transformers' feed_forward_proj values; 'gated-gelu' (T5 v1.1, Flan-T5) uses gelu_new, the tanh approximation.
FEED_FORWARDS = tuple(ACTIVATIONS) + tuple(f'gated-{name}' for name in ACTIVATIONS)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Encoder-decoder hyperparameters; `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters."""
  vocab_size: int
  hidden_size: int
  num_layers: int  # encoder layers
  num_decoder_layers: int
  num_heads: int
  head_dim: int  # d_kv; num_heads * head_dim need not equal hidden_size
  intermediate_size: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward: str = 'relu'  # one of FEED_FORWARDS: 'relu' (T5 v1.0), 'gated-gelu' (T5 v1.1, Flan-T5), ...
  norm_eps: float = 1e-6
  tie_embeddings: bool = True  # logits = (x * D**-0.5) . shared^T, no lm_head (T5 v1.0)
  initializer_range: float = 0.02
  hidden_dropout: float = 0.0  # T5's dropout_rate everywhere but on the attention probabilities
  attention_dropout: float = 0.0  # on the attention probabilities
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = 'none'  # recompute each layer's activations in the backward pass: 'none', 'full' or 'dots'
  scan_layers: bool = False  # layers 1... of each stack as one lax.scan (layers.apply_layers); not with a cache
  lora_rank: int = 0  # LoRA on the Dense layers whose path matches lora_targets (see jtune.models.layers)
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ('attention/query$', 'attention/value$')
  head: str = 'seq2seq'

  def __post_init__(self):
    for field, value, allowed in (('feed_forward', self.feed_forward, FEED_FORWARDS),
                                  ('remat', self.remat, REMATS), ('head', self.head, ('seq2seq',))):
      if value not in allowed:
        raise ValueError(f'{field}={value!r}: expected one of {", ".join(allowed)} for T5')
    if self.relative_attention_num_buckets < 4:
      raise ValueError(f'relative_attention_num_buckets={self.relative_attention_num_buckets}: expected at least 4')
    if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
      raise ValueError(f'relative_attention_max_distance={self.relative_attention_max_distance}: expected more '
                       f'than relative_attention_num_buckets // 2 = {self.relative_attention_num_buckets // 2}')


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """transformers' T5Attention._relative_position_bucket (int32, same float32 steps): `max_exact` exact
  distances, then logarithmic bins up to `max_distance`; bidirectional buckets give later keys their own half."""
  buckets = jnp.zeros(relative_position.shape, jnp.int32)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / np.float32(
      math.log(max_distance / max_exact))
  large = jnp.minimum(max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32), num_buckets - 1)
  return buckets + jnp.where(distance < max_exact, distance, large).astype(jnp.int32)


@flax.struct.dataclass
class Context:
  """What every layer of one stack attends with; a pytree, so it passes through nn.remat."""
  buckets_TC: jax.Array  # the relative-position bucket of each (query, key slot); layer 0 turns it into the bias
  mask_B1TC: jax.Array  # self-attention: may the query see the key (broadcastable: [B or 1, 1, T or 1, C])
  cross_mask_B11S: jax.Array | None = None  # decoder: the encoder's real tokens
  encoded_BSD: jax.Array | None = None  # decoder without a cache: the encoder output
  cache_index: jax.Array | None = None  # decoder with a cache: the slot of the first new token


class Attention(nn.Module):
  """Multi-head attention without 1/sqrt(K) scaling; self-attention scores may carry the relative position bias."""
  cfg: T5Config
  relative_bias: bool = False  # holds the stack's bias table (layer 0's self-attention)

  def setup(self):
    cfg = self.cfg
    proj = lambda: Dense(cfg, (cfg.num_heads, cfg.head_dim), ('embed', 'heads', 'kv'), use_bias=False)  # noqa: E731
    self.query, self.key, self.value = proj(), proj(), proj()
    self.output = Dense(cfg, (cfg.hidden_size,), ('heads', 'kv', 'embed'), in_axes=2, use_bias=False)
    if self.relative_bias:
      self.relative_attention_bias = self.param(
          'relative_attention_bias', _normal(cfg, (None, 'heads')),
          (cfg.relative_attention_num_buckets, cfg.num_heads), cfg.param_dtype)
    self.dropout = Dropout(cfg.attention_dropout)

  def position_bias(self, buckets_TC: jax.Array) -> jax.Array:
    """[1, H, T, C] float32: the learned bias of each (query, key slot) bucket."""
    bias_TCH = jnp.take(jnp.asarray(self.relative_attention_bias, jnp.float32), buckets_TC, axis=0)
    return jnp.transpose(bias_TCH, (2, 0, 1))[None]

  def key_value(self, y_BSD: jax.Array, deterministic: bool) -> tuple[jax.Array, jax.Array]:
    """The keys and values [B, S, H, K] of the tokens `y_BSD`."""
    names = ('batch', 'length', 'act_heads', 'kv')
    return (nn.with_logical_constraint(self.key(y_BSD, deterministic), names),
            nn.with_logical_constraint(self.value(y_BSD, deterministic), names))

  def __call__(self, x_BTD, k_BSHK, v_BSHK, bias_1HTS: jax.Array | None, mask_B1TS: jax.Array,
               deterministic: bool) -> jax.Array:
    cfg = self.cfg
    q_BTHK = nn.with_logical_constraint(self.query(x_BTD, deterministic), ('batch', 'length', 'act_heads', 'kv'))
    # The products on heads-first copies, as bert.attend's (faster on a CPU, benchmarks/README.md)
    q_BHTK, k_BHSK = q_BTHK.transpose(0, 2, 1, 3), k_BSHK.astype(q_BTHK.dtype).transpose(0, 2, 1, 3)
    scores_BHTS = jnp.einsum('bhtk,bhsk->bhts', q_BHTK, k_BHSK, preferred_element_type=jnp.float32)
    if bias_1HTS is not None:
      scores_BHTS += bias_1HTS
    scores_BHTS = jnp.where(mask_B1TS, scores_BHTS, jnp.finfo(jnp.float32).min)
    probs_BHTS = self.dropout(jax.nn.softmax(scores_BHTS, axis=-1).astype(cfg.dtype), deterministic=deterministic)
    out_BHTK = jnp.einsum('bhts,bhsk->bhtk', probs_BHTS, v_BSHK.astype(cfg.dtype).transpose(0, 2, 1, 3))
    out_BTHK = out_BHTK.transpose(0, 2, 1, 3)
    out_BTHK = nn.with_logical_constraint(out_BTHK, ('batch', 'length', 'act_heads', 'kv'))
    return self.output(out_BTHK, deterministic)


class Mlp(nn.Module):
  """wo(act(wi(x))), or wo(act(wi_0(x)) * wi_1(x)) for a gated feed-forward."""
  cfg: T5Config

  @nn.compact
  def __call__(self, x_BLD: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.cfg
    dense = lambda features, names, name: Dense(cfg, features, names, use_bias=False, name=name)  # noqa: E731
    name = cfg.feed_forward.removeprefix('gated-')
    act = ACTIVATIONS['gelu_new' if cfg.feed_forward == 'gated-gelu' else name]
    up = lambda name: dense((cfg.intermediate_size,), ('embed', 'mlp'), name)(x_BLD, deterministic)  # noqa: E731
    if cfg.feed_forward.startswith('gated-'):
      h_BLF = act(up('wi_0')) * up('wi_1')
    else:
      h_BLF = act(up('wi'))
    h_BLF = nn.with_logical_constraint(h_BLF, ('batch', 'length', 'act_mlp'))
    h_BLF = Dropout(cfg.hidden_dropout)(h_BLF, deterministic=deterministic)
    return dense((cfg.hidden_size,), ('mlp', 'embed'), 'wo')(h_BLF, deterministic)


class Block(nn.Module):
  """x += SelfAttn(norm(x)); in the decoder x += CrossAttn(norm(x), encoder output); x += MLP(norm(x)).

  Returns the position bias too: layer 0 computes it from the buckets, later layers reuse the one they are given.
  """
  cfg: T5Config
  is_decoder: bool
  relative_bias: bool  # layer 0

  def setup(self):
    cfg = self.cfg
    self.attention_norm = RMSNorm(cfg)
    self.attention = Attention(cfg, self.relative_bias)
    if self.is_decoder:
      self.cross_attention_norm = RMSNorm(cfg)
      self.cross_attention = Attention(cfg)
    self.mlp_norm = RMSNorm(cfg)
    self.mlp = Mlp(cfg)
    self.dropout = Dropout(cfg.hidden_dropout)

  def __call__(self, x_BTD, bias_1HTC: jax.Array | None, ctx: Context, deterministic: bool,
               cache: Cache | None = None) -> tuple[jax.Array, jax.Array, Cache | None]:
    if bias_1HTC is None:
      bias_1HTC = self.attention.position_bias(ctx.buckets_TC)
    h_BTD = self.attention_norm(x_BTD)
    k_BCHK, v_BCHK = self.attention.key_value(h_BTD, deterministic)
    if cache is not None:  # write the new tokens' keys and values at their slots, then attend to every slot
      write = lambda old, new: jax.lax.dynamic_update_slice(  # noqa: E731
          old, new.astype(old.dtype), (0, ctx.cache_index, 0, 0))
      k_BCHK, v_BCHK = write(cache['key'], k_BCHK), write(cache['value'], v_BCHK)
      cache = {**cache, 'key': k_BCHK, 'value': v_BCHK}
    attn_BTD = self.attention(h_BTD, k_BCHK, v_BCHK, bias_1HTC, ctx.mask_B1TC, deterministic)
    x_BTD = x_BTD + self.dropout(attn_BTD, deterministic=deterministic)
    if self.is_decoder:
      h_BTD = self.cross_attention_norm(x_BTD)
      if cache is None:
        k_BSHK, v_BSHK = self.cross_attention.key_value(ctx.encoded_BSD, deterministic)
      else:
        k_BSHK, v_BSHK = cache['cross_key'], cache['cross_value']
      cross_BTD = self.cross_attention(h_BTD, k_BSHK, v_BSHK, None, ctx.cross_mask_B11S, deterministic)
      x_BTD = x_BTD + self.dropout(cross_BTD, deterministic=deterministic)
    x_BTD = x_BTD + self.dropout(self.mlp(self.mlp_norm(x_BTD), deterministic), deterministic=deterministic)
    return nn.with_logical_constraint(x_BTD, ('batch', 'length', 'act_embed')), bias_1HTC, cache

  def cross_key_value(self, encoded_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.cross_attention.key_value(encoded_BSD, True)


class Stack(nn.Module):
  """The encoder or the decoder: dropout on the embedded tokens, the blocks, the final norm and dropout."""
  cfg: T5Config
  is_decoder: bool

  def setup(self):
    cfg = self.cfg
    block_cls = Block
    if cfg.remat != 'none':  # 'dots' keeps the matmul outputs and recomputes the rest
      block_cls = nn.remat(Block, static_argnums=(4,), policy=REMAT_POLICIES[cfg.remat])
    num_layers = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
    self.layers = [block_cls(cfg, self.is_decoder, i == 0, name=f'layer_{i}') for i in range(num_layers)]
    self.final_norm = RMSNorm(cfg)
    self.dropout = Dropout(cfg.hidden_dropout)

  def __call__(self, x_BTD, ctx: Context, deterministic: bool, cache: Cache | None = None
               ) -> tuple[jax.Array, Cache | None]:
    x_BTD = nn.with_logical_constraint(self.dropout(x_BTD, deterministic=deterministic),
                                       ('batch', 'length', 'act_embed'))
    bias_1HTC, new_cache = None, None if cache is None else {}
    if cache is None and not self.is_initializing() and len(self.layers) > 1:
      # layer 0 holds the position bias table: it runs alone, the alike rest through apply_layers
      x_BTD, bias_1HTC, _ = self.layers[0](x_BTD, None, ctx, deterministic)
      names = [f'layer_{i}' for i in range(1, len(self.layers))]
      x_BTD = apply_layers(self, Block(self.cfg, self.is_decoder, False, parent=None), names, x_BTD, bias_1HTC,
                           ctx, deterministic=deterministic, remat=self.cfg.remat, scan=self.cfg.scan_layers,
                           first_output=True, start=1)
      return self.dropout(self.final_norm(x_BTD), deterministic=deterministic), None
    for i, layer in enumerate(self.layers):
      name = f'layer_{i}'
      x_BTD, bias_1HTC, layer_cache = layer(x_BTD, bias_1HTC, ctx, deterministic,
                                            None if cache is None else cache[name])
      if new_cache is not None:
        new_cache[name] = layer_cache
    return self.dropout(self.final_norm(x_BTD), deterministic=deterministic), new_cache

  def cross_key_values(self, encoded_BSD: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """Every layer's cross-attention keys and values [B, S, H, K] (decoder only)."""
    return [layer.cross_key_value(encoded_BSD) for layer in self.layers]


class T5ForConditionalGeneration(nn.Module):
  """Next-token logits [B, T, V] (float32) of the decoder given the encoded input; `decode` runs it on a cache."""
  cfg: T5Config

  def setup(self):
    cfg = self.cfg
    self.shared = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                           embedding_init=_normal(cfg, ('vocab', 'embed')))
    self.encoder = Stack(cfg, is_decoder=False)
    self.decoder = Stack(cfg, is_decoder=True)
    if not cfg.tie_embeddings:
      self.lm_head = Dense(cfg, (cfg.vocab_size,), ('embed', 'vocab'), use_bias=False)

  def __call__(self, input_ids_BS, attention_mask_BS, decoder_input_ids_BT, *, deterministic: bool) -> jax.Array:
    """Teacher forcing: attention_mask_BS is 1 on the encoder's tokens and 0 on its padding; the decoder is causal,
    so right-padded decoder inputs need no mask."""
    encoded_BSD = self._encode(input_ids_BS, attention_mask_BS, deterministic)
    T = decoder_input_ids_BT.shape[1]
    ctx = self._decoder_context(jnp.arange(T), T, attention_mask_BS, encoded_BSD=encoded_BSD)
    x_BTD, _ = self.decoder(lookup(self.shared, decoder_input_ids_BT), ctx, deterministic)
    return self._logits(x_BTD, deterministic)

  def encode(self, input_ids_BS: jax.Array, attention_mask_BS: jax.Array) -> jax.Array:
    """The encoder output [B, S, D] (deterministic), for `start_cache`."""
    return self._encode(input_ids_BS, attention_mask_BS, True)

  def start_cache(self, encoded_BSD: jax.Array, num_slots: int) -> Cache:
    """{'layer_{i}': {'cross_key', 'cross_value': [B, S, H, K], 'key', 'value': [B, num_slots, H, K] zeros}}.

    Every leaf has the batch first, so beam search may reorder rows with tree_map(lambda x: x[rows], cache).
    """
    cfg = self.cfg
    zeros = jnp.zeros((encoded_BSD.shape[0], num_slots, cfg.num_heads, cfg.head_dim), cfg.dtype)
    return {f'layer_{i}': {'key': zeros, 'value': zeros, 'cross_key': k_BSHK, 'cross_value': v_BSHK}
            for i, (k_BSHK, v_BSHK) in enumerate(self.decoder.cross_key_values(encoded_BSD))}

  def decode(self, decoder_input_ids_BT, attention_mask_BS, cache: Cache, cache_index: jax.Array
             ) -> tuple[jax.Array, Cache]:
    """(logits [B, T, V], the cache with these T tokens written at slots cache_index ... cache_index + T - 1).

    Deterministic. The query in slot p sees key slots <= p; attention_mask_BS masks the encoder's padding.
    """
    num_slots = cache['layer_0']['key'].shape[1]
    T = decoder_input_ids_BT.shape[1]
    ctx = self._decoder_context(cache_index + jnp.arange(T), num_slots, attention_mask_BS, cache_index=cache_index)
    x_BTD, cache = self.decoder(lookup(self.shared, decoder_input_ids_BT), ctx, True, cache)
    return self._logits(x_BTD, True), cache

  def _encode(self, input_ids_BS, attention_mask_BS, deterministic: bool) -> jax.Array:
    cfg = self.cfg
    positions_S = jnp.arange(input_ids_BS.shape[1])
    buckets_SS = relative_position_bucket(positions_S[None, :] - positions_S[:, None], True,
                                          cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
    ctx = Context(buckets_SS, (attention_mask_BS > 0)[:, None, None, :])
    encoded_BSD, _ = self.encoder(lookup(self.shared, input_ids_BS), ctx, deterministic)
    return encoded_BSD

  def _decoder_context(self, q_slots_T, num_slots: int, attention_mask_BS, **fields) -> Context:
    """Causal self-attention of the queries in `q_slots_T` over key slots 0 ... num_slots - 1."""
    cfg = self.cfg
    k_slots_C = jnp.arange(num_slots)
    buckets_TC = relative_position_bucket(k_slots_C[None, :] - q_slots_T[:, None], False,
                                          cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
    mask_11TC = (k_slots_C[None, :] <= q_slots_T[:, None])[None, None]
    return Context(buckets_TC, mask_11TC, (attention_mask_BS > 0)[:, None, None, :], **fields)

  def _logits(self, x_BTD: jax.Array, deterministic: bool) -> jax.Array:
    if self.cfg.tie_embeddings:
      logits_BTV = embed_logits(self.shared, x_BTD * (self.cfg.hidden_size ** -0.5))
    else:
      logits_BTV = self.lm_head(x_BTD, deterministic)
    return nn.with_logical_constraint(logits_BTV.astype(jnp.float32), ('batch', 'length', 'vocab'))


def build(cfg: T5Config) -> nn.Module:
  """The encoder-decoder, called as module.apply(variables, input_ids_BS, attention_mask_BS, decoder_input_ids_BT,
  deterministic=...); generation uses method='encode', then 'start_cache', then 'decode' once per step."""
  return T5ForConditionalGeneration(cfg)
