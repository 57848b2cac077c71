"""BERT (post-LayerNorm encoder) and a sequence-classification head, in Flax linen.

Every parameter names its logical axes; activations are constrained by logical names too. The rules that map
them onto the mesh come from the config (see configs/bert_cls.py), never from here.
Shape suffixes: B batch, L length, D embed, H heads, K head dim, F mlp, C classes, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtune.models.layers import LORA_PARAMS, Dense, merge_lora  # noqa: F401  (re-exported)
from jtune.models.layers import normal_init as _normal
from jtune.models.layers import zeros_init as _zeros

Dtype = Any


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT hyperparameters; `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  initializer_range: float
  hidden_dropout: float
  attention_dropout: float
  classifier_dropout: float
  num_labels: int
  pad_token_id: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = 'none'  # recompute each layer's activations in the backward pass: 'none', 'full' or 'dots'
  # LoRA: low-rank adapters on the Dense layers whose module path ('bert/layer_0/attention/query') matches a
  # pattern of lora_targets; the output gains (alpha / rank) * dropout(x) . lora_a . lora_b. Rank 0: none.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ('attention/query$', 'attention/value$')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',)),
      bias_init=_zeros(('embed',)))


class Embeddings(nn.Module):
  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids_BL, token_type_ids_BL, deterministic: bool) -> jax.Array:
    cfg = self.cfg
    embed = lambda n, size, names: nn.Embed(  # noqa: E731
        size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=n,
        embedding_init=_normal(cfg, names))
    length = input_ids_BL.shape[1]
    x_BLD = embed('word_embeddings', cfg.vocab_size, ('vocab', 'embed'))(input_ids_BL)
    x_BLD += embed('position_embeddings', cfg.max_position_embeddings, (None, 'embed'))(
        jnp.arange(length)[None, :])
    x_BLD += embed('token_type_embeddings', cfg.type_vocab_size, (None, 'embed'))(token_type_ids_BL)
    x_BLD = _layer_norm(cfg, 'LayerNorm')(x_BLD)
    x_BLD = nn.Dropout(cfg.hidden_dropout)(x_BLD, deterministic=deterministic)
    return nn.with_logical_constraint(x_BLD, ('batch', 'length', 'act_embed'))


class SelfAttention(nn.Module):
  cfg: BertConfig

  @nn.compact
  def __call__(self, x_BLD, bias_B11L, deterministic: bool) -> jax.Array:
    cfg = self.cfg
    heads = (cfg.num_heads, cfg.head_dim)
    proj = lambda n: Dense(cfg, heads, ('embed', 'heads', 'kv'), name=n)(x_BLD, deterministic)  # noqa: E731
    q_BLHK, k_BLHK, v_BLHK = proj('query'), proj('key'), proj('value')
    q_BLHK = nn.with_logical_constraint(q_BLHK, ('batch', 'length', 'act_heads', 'kv'))
    k_BLHK = nn.with_logical_constraint(k_BLHK, ('batch', 'length', 'act_heads', 'kv'))
    v_BLHK = nn.with_logical_constraint(v_BLHK, ('batch', 'length', 'act_heads', 'kv'))
    q_BLHK = q_BLHK / jnp.sqrt(cfg.head_dim).astype(cfg.dtype)
    scores_BHLL = jnp.einsum('bqhk,bshk->bhqs', q_BLHK, k_BLHK, preferred_element_type=jnp.float32)
    scores_BHLL += bias_B11L
    probs_BHLL = jax.nn.softmax(scores_BHLL, axis=-1).astype(cfg.dtype)
    probs_BHLL = nn.Dropout(cfg.attention_dropout)(probs_BHLL, deterministic=deterministic)
    out_BLHK = jnp.einsum('bhqs,bshk->bqhk', probs_BHLL, v_BLHK)
    out_BLHK = nn.with_logical_constraint(out_BLHK, ('batch', 'length', 'act_heads', 'kv'))
    return Dense(cfg, (cfg.hidden_size,), ('heads', 'kv', 'embed'), in_axes=2, name='output')(
        out_BLHK, deterministic)


class Layer(nn.Module):
  """One post-LN encoder layer: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, x_BLD, bias_B11L, deterministic: bool) -> jax.Array:
    cfg = self.cfg
    drop = lambda y: nn.Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)  # noqa: E731
    attn_BLD = SelfAttention(cfg, name='attention')(x_BLD, bias_B11L, deterministic)
    x_BLD = _layer_norm(cfg, 'attention_LayerNorm')(x_BLD + drop(attn_BLD))
    h_BLF = Dense(cfg, (cfg.intermediate_size,), ('embed', 'mlp'), name='intermediate')(x_BLD, deterministic)
    h_BLF = nn.with_logical_constraint(nn.gelu(h_BLF, approximate=False),
                                       ('batch', 'length', 'act_mlp'))
    out_BLD = Dense(cfg, (cfg.hidden_size,), ('mlp', 'embed'), name='output')(h_BLF, deterministic)
    x_BLD = _layer_norm(cfg, 'output_LayerNorm')(x_BLD + drop(out_BLD))
    return nn.with_logical_constraint(x_BLD, ('batch', 'length', 'act_embed'))


REMAT_POLICIES = {'full': None, 'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class BertModel(nn.Module):
  """The backbone: returns the last hidden state [B, L, D] and the pooled [CLS] vector [B, D]."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids_BL, attention_mask_BL, token_type_ids_BL, *, deterministic: bool
               ) -> tuple[jax.Array, jax.Array]:
    cfg = self.cfg
    x_BLD = Embeddings(cfg, name='embeddings')(input_ids_BL, token_type_ids_BL, deterministic)
    # Additive mask over keys, in float32: 0 where attended, a large negative at padding.
    bias_B11L = jnp.where(attention_mask_BL[:, None, None, :] > 0, 0.0,
                          jnp.finfo(jnp.float32).min).astype(jnp.float32)
    layer_cls = Layer
    if cfg.remat != 'none':  # 'dots' keeps the matmul outputs and recomputes the rest
      layer_cls = nn.remat(Layer, static_argnums=(3,), policy=REMAT_POLICIES[cfg.remat])
    for i in range(cfg.num_layers):
      x_BLD = layer_cls(cfg, name=f'layer_{i}')(x_BLD, bias_B11L, deterministic)
    pooled_BD = jnp.tanh(Dense(cfg, (cfg.hidden_size,), ('embed', 'act_embed'), name='pooler')(x_BLD[:, 0]))
    return x_BLD, pooled_BD


class BertForSequenceClassification(nn.Module):
  """BERT with dropout and a linear classifier on the pooled output; logits in float32."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids_BL, attention_mask_BL, token_type_ids_BL, *, deterministic: bool
               ) -> jax.Array:
    cfg = self.cfg
    _, pooled_BD = BertModel(cfg, name='bert')(input_ids_BL, attention_mask_BL, token_type_ids_BL,
                                               deterministic=deterministic)
    pooled_BD = nn.Dropout(cfg.classifier_dropout)(pooled_BD, deterministic=deterministic)
    logits_BC = Dense(cfg, (cfg.num_labels,), ('embed', 'classes'), name='classifier')(pooled_BD)
    return logits_BC.astype(jnp.float32)
