"""The BERT family of post-LayerNorm encoders (BERT, RoBERTa, DistilBERT) and their task heads, in Flax linen.

One module covers the three families; `BertConfig.family` selects what differs: RoBERTa counts positions from
its padding id, DistilBERT has no token types and no dropout after attention. The backbone's parameters sit
under params[family] with the same sub-names for every family ('roberta/layer_0/attention/query'), so LoRA
targets and layer-wise learning-rate patterns work for all of them. The heads carry Hugging Face's module names.

Every parameter names its logical axes; activations are constrained by logical names too. The rules that map
them onto the mesh come from the config (see configs/common.py), never from here.
Shape suffixes: B batch, L length, D embed, H heads, K head dim, F mlp, C classes, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtune.models.layers import LORA_PARAMS, REMAT_POLICIES, Dense, Dropout, merge_lora  # noqa: F401  (re-exported)
from jtune.models.layers import apply_layers, dense_dot, gelu, lookup
from jtune.models.layers import normal_init as _normal
from jtune.models.layers import zeros_init as _zeros

Dtype = Any
FAMILIES = ('bert', 'roberta', 'distilbert')
HEADS = ('sequence', 'token', 'qa', 'mlm')


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Encoder hyperparameters; `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int  # 0: no token-type embeddings (DistilBERT)
  layer_norm_eps: float
  initializer_range: float
  hidden_dropout: float
  attention_dropout: float
  classifier_dropout: float
  num_labels: int  # the 'qa' head always has 2 outputs (start, end)
  pad_token_id: int = 0
  family: str = 'bert'  # 'bert', 'roberta' or 'distilbert'; also the name of the backbone's param root
  head: str = 'sequence'  # 'sequence' ([B, C]), 'token' ([B, L, C]), 'qa' ([B, L, 2]) or 'mlm' ([B, L or P, V])
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = 'none'  # recompute each layer's activations in the backward pass: 'none', 'full' or 'dots'
  scan_layers: bool = False  # run the layers as one lax.scan (see layers.apply_layers): one layer to compile
  # LoRA: low-rank adapters on the Dense layers whose module path ('bert/layer_0/attention/query') matches a
  # pattern of lora_targets; the output gains (alpha / rank) * dropout(x) . lora_a . lora_b. Rank 0: none.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ('attention/query$', 'attention/value$')

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f'family={self.family!r}: expected one of {", ".join(FAMILIES)}')
    if self.head not in HEADS:
      raise ValueError(f'head={self.head!r}: expected one of {", ".join(HEADS)} for a {self.family} encoder')
    if self.head == 'mlm' and self.family != 'bert':
      raise ValueError(f"head='mlm': the masked-LM head is built for BERT checkpoints, not {self.family}")
    if self.family == 'distilbert' and self.type_vocab_size:
      raise ValueError(f'type_vocab_size={self.type_vocab_size}: expected 0 for DistilBERT (no token types)')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def has_pooler(self) -> bool:
    """Only Hugging Face's BertForSequenceClassification has a pooler (dense + tanh on [CLS])."""
    return self.family == 'bert' and self.head == 'sequence'

  @property
  def max_length(self) -> int:
    """The longest input the position table covers (RoBERTa's positions start after pad_token_id)."""
    if self.family == 'roberta':
      return self.max_position_embeddings - self.pad_token_id - 1
    return self.max_position_embeddings


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',)),
      bias_init=_zeros(('embed',)))


def position_ids(input_ids_BL: jax.Array, cfg: BertConfig) -> jax.Array:
  """0, 1, 2, ...; RoBERTa: pad_token_id + 1, + 2, ... over non-pad tokens, pad_token_id at padding."""
  if cfg.family != 'roberta':
    return jnp.arange(input_ids_BL.shape[1])[None, :]
  real_BL = (input_ids_BL != cfg.pad_token_id).astype(jnp.int32)
  return jnp.cumsum(real_BL, axis=1) * real_BL + cfg.pad_token_id


class OneHotEmbed(nn.Embed):
  """nn.Embed (same parameter) that looks rows up as a one-hot product, for tables of a few rows (token types).

  The gradient of a gather is a scatter-add: with every token of the batch on one of two rows, a GPU serialises
  B * L atomic adds on the same addresses; the gradient of the product is one small matmul."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    (embedding,) = self.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
    one_hot = jax.nn.one_hot(inputs, self.num_embeddings, dtype=embedding.dtype)
    return jnp.dot(one_hot, embedding, precision=jax.lax.Precision.HIGHEST)  # exact rows, as a gather (no TF32)


class Embeddings(nn.Module):
  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids_BL, token_type_ids_BL, deterministic: bool) -> jax.Array:
    cfg = self.cfg
    embed = lambda n, size, names, cls=nn.Embed: cls(  # noqa: E731
        size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=n,
        embedding_init=_normal(cfg, names))
    x_BLD = lookup(embed('word_embeddings', cfg.vocab_size, ('vocab', 'embed')), input_ids_BL)
    x_BLD = self.perturb('word_delta', x_BLD)  # adversarial training's entry point (jtune/robust.py)
    x_BLD += lookup(embed('position_embeddings', cfg.max_position_embeddings, (None, 'embed')),
                    position_ids(input_ids_BL, cfg))
    if cfg.type_vocab_size:
      if token_type_ids_BL is None:
        token_type_ids_BL = jnp.zeros_like(input_ids_BL)
      x_BLD += embed('token_type_embeddings', cfg.type_vocab_size, (None, 'embed'), OneHotEmbed)(token_type_ids_BL)
    x_BLD = _layer_norm(cfg, 'LayerNorm')(x_BLD)
    x_BLD = Dropout(cfg.hidden_dropout)(x_BLD, deterministic=deterministic)
    return nn.with_logical_constraint(x_BLD, ('batch', 'length', 'act_embed'))


def attend(q_BQHK, k_BLHK, v_BLHK, bias_B11L, dropout) -> jax.Array:
  """softmax(q k^T + bias) v per head, the probabilities through `dropout`; [batch, length, heads, kv] in and out.
  The products run on [batch, heads, length, kv] copies: XLA:CPU then runs them as batched matmuls, where from the
  [B, L, H, K] layout it fused the whole attention into one slow YNNPACK kernel: BERT-base's 16 x 128 eval step
  took 1.72 s against 1.51 s, its train step within 1% of the same (benchmarks/README.md)."""
  q_BHQK, k_BHLK, v_BHLK = (x.transpose(0, 2, 1, 3) for x in (q_BQHK, k_BLHK, v_BLHK))
  scores_BHQL = jnp.einsum('bhqk,bhsk->bhqs', q_BHQK, k_BHLK, preferred_element_type=jnp.float32)
  probs_BHQL = jax.nn.softmax(scores_BHQL + bias_B11L, axis=-1).astype(v_BLHK.dtype)
  return jnp.einsum('bhqs,bhsk->bhqk', dropout(probs_BHQL), v_BHLK).transpose(0, 2, 1, 3)


class SelfAttention(nn.Module):
  cfg: BertConfig

  @nn.compact
  def __call__(self, x_BLD, bias_B11L, deterministic: bool, queries_BQD=None) -> jax.Array:
    """Attention of `queries_BQD` (x_BLD's first positions, default all of them) over every position of x_BLD."""
    cfg = self.cfg
    heads = (cfg.num_heads, cfg.head_dim)
    proj = lambda n, x: Dense(cfg, heads, ('embed', 'heads', 'kv'), name=n)(x, deterministic)  # noqa: E731
    q_BLHK = proj('query', x_BLD if queries_BQD is None else queries_BQD)
    k_BLHK, v_BLHK = proj('key', x_BLD), proj('value', x_BLD)
    q_BLHK = nn.with_logical_constraint(q_BLHK, ('batch', 'length', 'act_heads', 'kv'))
    k_BLHK = nn.with_logical_constraint(k_BLHK, ('batch', 'length', 'act_heads', 'kv'))
    v_BLHK = nn.with_logical_constraint(v_BLHK, ('batch', 'length', 'act_heads', 'kv'))
    q_BLHK = q_BLHK / jnp.sqrt(cfg.head_dim).astype(cfg.dtype)
    dropout = functools.partial(Dropout(cfg.attention_dropout), deterministic=deterministic)
    out_BLHK = attend(q_BLHK, k_BLHK, v_BLHK, bias_B11L, dropout)
    out_BLHK = nn.with_logical_constraint(out_BLHK, ('batch', 'length', 'act_heads', 'kv'))
    return Dense(cfg, (cfg.hidden_size,), ('heads', 'kv', 'embed'), in_axes=2, name='output')(
        out_BLHK, deterministic)


class Layer(nn.Module):
  """One post-LN encoder layer: x = LN(x + Attn(x)); x = LN(x + MLP(x)).

  first_only: the output at the first position only, [B, 1, D] (keys and values still from every position).
  """
  cfg: BertConfig
  first_only: bool = False

  @nn.compact
  def __call__(self, x_BLD, bias_B11L, deterministic: bool) -> jax.Array:
    cfg, first_only = self.cfg, self.first_only
    drop = lambda y: Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)  # noqa: E731
    queries_BQD = x_BLD[:, :1] if first_only else None
    attn_BLD = SelfAttention(cfg, name='attention')(x_BLD, bias_B11L, deterministic, queries_BQD)
    if first_only:
      x_BLD = queries_BQD
    if cfg.family != 'distilbert':  # DistilBERT adds the attention output undropped
      attn_BLD = drop(attn_BLD)
    x_BLD = _layer_norm(cfg, 'attention_LayerNorm')(x_BLD + attn_BLD)
    h_BLF = Dense(cfg, (cfg.intermediate_size,), ('embed', 'mlp'), name='intermediate')(x_BLD, deterministic)
    h_BLF = nn.with_logical_constraint(gelu(h_BLF), ('batch', 'length', 'act_mlp'))
    out_BLD = Dense(cfg, (cfg.hidden_size,), ('mlp', 'embed'), name='output')(h_BLF, deterministic)
    x_BLD = _layer_norm(cfg, 'output_LayerNorm')(x_BLD + drop(out_BLD))
    return nn.with_logical_constraint(x_BLD, ('batch', 'length', 'act_embed'))


class BertModel(nn.Module):
  """The backbone: the last hidden state [B, L, D] and the pooled [CLS] vector [B, D] (None without a pooler).

  first_only: the last layer computes the first position alone ([B, 1, D] out), all that the sequence heads read:
  its queries, attention output and MLP run on 1 of L positions, its keys and values on all of them, so a
  MiniLM-L6 train step does 14% fewer matmul FLOPs (BERT-base 7%) and returns the same logits.
  """
  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids_BL, attention_mask_BL, token_type_ids_BL=None, *, deterministic: bool,
               first_only: bool = False) -> tuple[jax.Array, jax.Array | None]:
    cfg = self.cfg
    x_BLD = Embeddings(cfg, name='embeddings')(input_ids_BL, token_type_ids_BL, deterministic)
    # Additive mask over keys, in float32: 0 where attended, a large negative at padding.
    bias_B11L = jnp.where(attention_mask_BL[:, None, None, :] > 0, 0.0,
                          jnp.finfo(jnp.float32).min).astype(jnp.float32)
    names = [f'layer_{i}' for i in range(cfg.num_layers)]
    if self.is_initializing():  # creates the layers' parameters one by one
      for name in names:
        x_BLD = Layer(cfg, first_only and name == names[-1], name=name)(x_BLD, bias_B11L, deterministic)
    else:
      alike = names[:-1] if first_only else names  # a first_only last layer is not like the others
      run = functools.partial(apply_layers, self, deterministic=deterministic, remat=cfg.remat)
      if alike:
        x_BLD = run(Layer(cfg, parent=None), alike, x_BLD, bias_B11L, scan=cfg.scan_layers)
      if first_only:
        x_BLD = run(Layer(cfg, True, parent=None), names[-1:], x_BLD, bias_B11L, start=len(alike))
    if not cfg.has_pooler:
      return x_BLD, None
    pooled_BD = jnp.tanh(Dense(cfg, (cfg.hidden_size,), ('embed', 'act_embed'), name='pooler')(
        x_BLD[:, 0], deterministic))
    return x_BLD, pooled_BD


def _check_head(cfg: BertConfig, head: str) -> None:
  if cfg.head != head:
    raise ValueError(f'head={cfg.head!r} in the model config: expected {head!r} for this module (use build())')


def _dropout(cfg: BertConfig, x: jax.Array, deterministic: bool) -> jax.Array:
  return Dropout(cfg.classifier_dropout)(x, deterministic=deterministic)


class BertForSequenceClassification(nn.Module):
  """Logits [B, C] in float32 from the first token, with the family's Hugging Face head.

  BERT: pooler -> dropout -> classifier. RoBERTa: classifier = {dense, out_proj}: dropout -> dense -> tanh ->
  dropout -> out_proj. DistilBERT: pre_classifier -> ReLU -> dropout -> classifier. first_only: the last layer
  at the first position alone (see BertModel), the same logits; False computes every position as Hugging Face does.
  """
  cfg: BertConfig
  first_only: bool = True

  @nn.compact
  def __call__(self, input_ids_BL, attention_mask_BL, token_type_ids_BL=None, *, deterministic: bool
               ) -> jax.Array:
    cfg = self.cfg
    _check_head(cfg, 'sequence')
    x_BLD, pooled_BD = BertModel(cfg, name=cfg.family)(input_ids_BL, attention_mask_BL, token_type_ids_BL,
                                                       deterministic=deterministic, first_only=self.first_only)
    dense = lambda features, names, name: Dense(cfg, features, names, name=name)  # noqa: E731
    classes = ((cfg.num_labels,), ('embed', 'classes'))
    if cfg.family == 'bert':
      logits_BC = dense(*classes, 'classifier')(_dropout(cfg, pooled_BD, deterministic), deterministic)
    elif cfg.family == 'roberta':
      logits_BC = RobertaClassificationHead(cfg, name='classifier')(x_BLD[:, 0], deterministic)
    else:
      h_BD = dense((cfg.hidden_size,), ('embed', 'act_embed'), 'pre_classifier')(x_BLD[:, 0], deterministic)
      h_BD = _dropout(cfg, nn.relu(h_BD), deterministic)
      logits_BC = dense(*classes, 'classifier')(h_BD, deterministic)
    return logits_BC.astype(jnp.float32)


class RobertaClassificationHead(nn.Module):
  """dropout -> dense -> tanh -> dropout -> out_proj, on the <s> vector [B, D]."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, x_BD, deterministic: bool) -> jax.Array:
    cfg = self.cfg
    x_BD = Dense(cfg, (cfg.hidden_size,), ('embed', 'act_embed'), name='dense')(
        _dropout(cfg, x_BD, deterministic), deterministic)
    x_BD = _dropout(cfg, jnp.tanh(x_BD), deterministic)
    return Dense(cfg, (cfg.num_labels,), ('embed', 'classes'), name='out_proj')(x_BD, deterministic)


class BertForTokenClassification(nn.Module):
  """Logits [B, L, C] in float32: dropout -> classifier at every position."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids_BL, attention_mask_BL, token_type_ids_BL=None, *, deterministic: bool
               ) -> jax.Array:
    cfg = self.cfg
    _check_head(cfg, 'token')
    x_BLD, _ = BertModel(cfg, name=cfg.family)(input_ids_BL, attention_mask_BL, token_type_ids_BL,
                                               deterministic=deterministic)
    logits_BLC = Dense(cfg, (cfg.num_labels,), ('embed', 'classes'), name='classifier')(
        _dropout(cfg, x_BLD, deterministic), deterministic)
    return nn.with_logical_constraint(logits_BLC.astype(jnp.float32), ('batch', 'length', 'classes'))


class BertForQuestionAnswering(nn.Module):
  """Start and end logits [B, L, 2] in float32 from qa_outputs (DistilBERT applies dropout before it)."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids_BL, attention_mask_BL, token_type_ids_BL=None, *, deterministic: bool
               ) -> jax.Array:
    cfg = self.cfg
    _check_head(cfg, 'qa')
    x_BLD, _ = BertModel(cfg, name=cfg.family)(input_ids_BL, attention_mask_BL, token_type_ids_BL,
                                               deterministic=deterministic)
    if cfg.family == 'distilbert':
      x_BLD = _dropout(cfg, x_BLD, deterministic)
    logits_BL2 = Dense(cfg, (2,), ('embed', 'classes'), name='qa_outputs')(x_BLD, deterministic)
    return nn.with_logical_constraint(logits_BL2.astype(jnp.float32), ('batch', 'length', 'classes'))


class BertForMaskedLM(nn.Module):
  """Vocabulary logits in float32, Hugging Face's BertForMaskedLM head (`cls.predictions`): dense -> GELU ->
  LayerNorm, then the word-embedding matrix (tied, as BERT ties it) and a bias. [B, L, V] at every position, or
  [B, P, V] at `mlm_positions_BP` only (the masked tokens, data/masking.py): the head's product with the
  vocabulary is a fifth of BERT-base's step at every position."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids_BL, attention_mask_BL, token_type_ids_BL=None, mlm_positions_BP=None, *,
               deterministic: bool) -> jax.Array:
    cfg = self.cfg
    _check_head(cfg, 'mlm')
    x_BLD, _ = BertModel(cfg, name=cfg.family)(input_ids_BL, attention_mask_BL, token_type_ids_BL,
                                               deterministic=deterministic)
    if mlm_positions_BP is not None:
      x_BLD = jnp.take_along_axis(x_BLD, mlm_positions_BP[:, :, None], axis=1)
    h_BLD = Dense(cfg, (cfg.hidden_size,), ('embed', 'act_embed'), name='transform')(x_BLD, deterministic)
    h_BLD = _layer_norm(cfg, 'transform_LayerNorm')(gelu(h_BLD))
    embedding_VD = self.variables['params'][cfg.family]['embeddings']['word_embeddings']['embedding']
    embedding_VD = jnp.asarray(nn.unbox(embedding_VD), cfg.dtype)
    bias_V = self.param('bias', _zeros(('vocab',)), (cfg.vocab_size,), cfg.param_dtype)
    logits_BLV = dense_dot(h_BLD, embedding_VD.T, 1, jnp.float32)
    return nn.with_logical_constraint(logits_BLV + bias_V.astype(jnp.float32), ('batch', 'length', 'vocab'))


HEAD_MODULES = {'sequence': BertForSequenceClassification, 'token': BertForTokenClassification,
                'qa': BertForQuestionAnswering, 'mlm': BertForMaskedLM}


def build(cfg: BertConfig) -> nn.Module:
  """The module for `cfg.head`, called as module.apply(variables, input_ids_BL, attention_mask_BL,
  token_type_ids_BL, deterministic=...) (token_type_ids_BL may be left out; DistilBERT ignores it)."""
  return HEAD_MODULES[cfg.head](cfg)
