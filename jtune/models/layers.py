"""Layers every jtune model shares: a Dense with named axes and optional LoRA adapters, its merge, the token
lookup's placement, RMS norm and dropout.

`cfg` is any model config with `dtype`, `param_dtype`, `initializer_range` and the `lora_*` fields.
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct


def normal_init(cfg: Any, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), names)


def zeros_init(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def dense_dot(x: jax.Array, kernel: jax.Array, in_axes: int, preferred_element_type: Any = None) -> jax.Array:
  """x's trailing `in_axes` dims contracted with the kernel's leading ones, as one [tokens, in] x [in, out] matmul.

  The same product as a dot_general over the original dims, but XLA's CPU backend lowers a dot_general whose
  contracted dims include the batch and length ([B, L, D] inputs) by first writing the input transposed, for
  each weight gradient (BERT-base's train step: 318 transposing copies, 150 with 2-D operands). With 2-D operands
  the weight gradient is a matmul with a transposed operand, which XLA runs as it is: that train step went from
  4.84 to 4.25 s on a 2-core Xeon (benchmarks/README.md). The reshapes are free (row-major); each merges a
  sharded dim with unsharded ones after it (the batch with the length, the heads with the head size), so the
  sharding carries over. preferred_element_type: the product's dtype, as for jnp.matmul.
  """
  lead, features = x.shape[:x.ndim - in_axes], kernel.shape[in_axes:]
  fan_in = math.prod(kernel.shape[:in_axes])
  y = jnp.matmul(x.reshape(math.prod(lead), fan_in), kernel.reshape(fan_in, math.prod(features)),
                 preferred_element_type=preferred_element_type)
  return y.reshape(lead + features)


def lookup(table: nn.Embed, ids_BL: jax.Array) -> jax.Array:
  """table(ids_BL), [B, L, D], placed as ('lookup_batch', 'length', 'embed'): rows over the batch axes that the
  table's `embed` split leaves free (configs/common.RULES: the data axis), the width as the table's.

  The rows of a table split along `embed` (over fsdp) come out split along D. Left to itself, XLA looked them
  up for the whole batch on every data-axis replica, and for the gradient, which arrives split over the whole
  batch, it gathered the full [B, L, D] array onto every device ("Involuntary full rematerialization" on
  data x fsdp meshes). Placed so, each device looks up its own rows and both directions are one all-to-all
  over fsdp. A broadcast row of ids ([1, L]: fixed positions) splits nothing and is left unplaced."""
  x_BLD = table(ids_BL)
  if ids_BL.shape[0] == 1:
    return x_BLD
  return nn.with_logical_constraint(x_BLD, ('lookup_batch', 'length', 'embed'))


def embed_logits(embed: nn.Embed, x: jax.Array) -> jax.Array:
  """Logits of x [..., D] against the table of `embed` [V, D] (a tied LM head), as nn.Embed.attend computes them
  (both in embed.dtype) but through dense_dot: the table's gradient then reads the [tokens, V] logits' gradient
  as it is instead of copying it transposed (200 MB per step for a 49,152-token vocabulary at 8 x 128)."""
  x, table = embed.promote_dtype(x, embed.embedding, dtype=embed.dtype)
  return dense_dot(x, table.T, 1)


@struct.dataclass
class HeadInputs:
  """An LM head not yet applied: the hidden states [B, L, D] it reads and its weight, the token embeddings [V, D]
  of a tied head (logits x . weight^T) or a kernel [D, V]. A causal LM returns this instead of its [B, L, V]
  logits when its config sets `lm_head_chunks` > 1, and the loss (tasks.common.chunked_cross_entropy_sum) applies
  the head to `chunks` slices of the positions in turn, so that no [B, L, V] array (nor its gradient) is ever
  whole in memory: 2 GiB of float32 for 8 rows of 1,024 tokens on SmolLM2's 49,152-token vocabulary."""
  x_BLD: jax.Array
  weight: jax.Array  # in the model's compute dtype
  tied: bool = struct.field(pytree_node=False)
  chunks: int = struct.field(pytree_node=False)

  def kernel(self) -> jax.Array:
    """The weight as a [D, V] kernel (the tied table transposed: XLA folds it into the products)."""
    return self.weight.T if self.tied else self.weight

  def logits(self, x_BCD: jax.Array) -> jax.Array:
    """float32 logits of some of the positions, as the model computes them when it applies its head itself."""
    return dense_dot(x_BCD, self.kernel(), 1).astype(jnp.float32)


class Dense(nn.Module):
  """y = x . kernel + bias, contracting the last `in_axes` dims of x; kernel axes named `names`.

  Not nn.DenseGeneral: its init makes a flat 2-D kernel and reshapes it, and Flax re-runs that init as a
  shape check on every apply, which under a mesh and logical rules puts the 3-D names on the 2-D value.
  """
  cfg: Any  # any model config with dtype, param_dtype, initializer_range and the lora_* fields
  features: tuple[int, ...]
  names: tuple[str | None, ...]
  in_axes: int = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg = self.cfg
    in_shape = x.shape[x.ndim - self.in_axes:]
    kernel = self.param('kernel', normal_init(cfg, self.names), in_shape + self.features, cfg.param_dtype)
    x_in = x
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=cfg.dtype)
    y = dense_dot(x, kernel, self.in_axes)
    if self.use_bias:
      bias = self.param('bias', zeros_init(self.names[self.in_axes:]), self.features, cfg.param_dtype)
      y += jnp.asarray(bias, cfg.dtype)
    if cfg.lora_rank and (any(re.search(t, '/'.join(self.scope.path)) for t in cfg.lora_targets)
                          if self.is_initializing() else self.has_variable('params', 'lora_a')):
      y += self._lora(x_in, in_shape, deterministic)
    return y

  def _lora(self, x, in_shape, deterministic: bool) -> jax.Array:
    """(alpha / r) * dropout(x) . A . B, with B zero at init so training starts from the base model."""
    cfg, rank = self.cfg, self.cfg.lora_rank
    fan_in = math.prod(in_shape)
    a_init = nn.initializers.uniform(2.0 / math.sqrt(fan_in))  # U[0, 2/sqrt(fan_in)), shifted below
    lora_a = self.param('lora_a', nn.with_logical_partitioning(
        lambda key, shape, dtype: a_init(key, shape, dtype) - 1.0 / math.sqrt(fan_in),
        self.names[:self.in_axes] + (None,)), in_shape + (rank,), cfg.param_dtype)
    lora_b = self.param('lora_b', zeros_init((None,) + self.names[self.in_axes:]), (rank,) + self.features,
                        cfg.param_dtype)
    x = Dropout(cfg.lora_dropout)(x, deterministic=deterministic)
    x, lora_a, lora_b = nn.dtypes.promote_dtype(x, lora_a, lora_b, dtype=cfg.dtype)
    return (cfg.lora_alpha / rank) * dense_dot(dense_dot(x, lora_a, self.in_axes), lora_b, 1)


class Dropout(nn.Module):
  """nn.Dropout with the mask drawn 8 bits at a time: each 32-bit random word decides four elements.

  JAX's default (partitionable) threefry makes one hash per element however few bits are asked for, and on a CPU it
  runs as a loop over whole arrays that XLA does not fuse with the mask's use: the BERT train step's dropout masks
  took 16% of its time there (16 x 128, attention and hidden dropout). Four elements per word cut a [16, 12, 128, 128]
  mask from 69 ms to 8 ms here (benchmarks/README.md); the words are drawn over the leading dims and a quarter of the
  last, so the mask is the same on any mesh. The kept fraction is round(256 * (1 - rate)) / 256 (0.8984 for rate 0.1)
  and kept values are scaled by its inverse, so the expected output is the input exactly, as with nn.Dropout.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    keep = round(256 * (1.0 - self.rate))
    if deterministic or keep == 256:
      return x
    if keep == 0:
      return jnp.zeros_like(x)
    n = x.shape[-1]
    words = jax.random.bits(self.make_rng('dropout'), x.shape[:-1] + (-(-n // 4),), jnp.uint32)
    draws = (words[..., None] >> jnp.array([0, 8, 16, 24], jnp.uint32)) & 0xFF  # 4 draws in [0, 256) per word
    draws = draws.reshape(x.shape[:-1] + (-1,))[..., :n]
    return jnp.where(draws < keep, x * jnp.asarray(256 / keep, x.dtype), jnp.zeros((), x.dtype))


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x), written with erf as transformers computes it (`hidden_act='gelu'`).

  jax.nn.gelu(approximate=False) writes Phi with erfc, which XLA's CPU backend evaluates with range selects and an
  exponential: 4-12.6 ms against 1.5 ms for erf on a [2048, 3072] f32 array on a 2-core Xeon, and BERT-base's train
  step went from 5.70 to 5.25 s (benchmarks/README.md). The two agree to 1e-6.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


LORA_PARAMS = ('lora_a', 'lora_b')


def apply_layers(module: nn.Module, layer: nn.Module, names: list[str], x: jax.Array, *args: Any,
                 deterministic: bool, remat: str = 'none', scan: bool = False, first_output: bool = False,
                 start: int = 0) -> jax.Array:
  """x through the module's layers `names` (its 'layer_i' children, applied as `layer`), traced once, not per layer.

  Each layer runs as `layer.apply({'params': its parameters}, x, *args, deterministic)`, which returns x, or
  (x, ...) with first_output; `layer` is an unbound module (parent=None) like those children. scan=False: a Python
  loop over one shared `jax.jit` of that call, so JAX traces the layer once and reuses it for every layer whose
  parameters have the same shapes, and XLA inlines the calls: the program the unrolled layers make, at a fraction
  of the tracing (the BERT-base train step's trace 1.35 -> 1.05 s, benchmarks/README.md). scan=True: one lax.scan
  over the parameters stacked inside the step (a copy of the weights), so XLA also compiles one layer; every layer
  must then have the same parameters. Either way the parameters stay one subtree per layer (checkpoints, the
  Hugging Face conversion, LoRA and learning-rate patterns see no difference), layer i's dropout key is the
  module's 'dropout' key folded with start + i, and both give the same result. Not during init, which must create
  the layers' parameters one by one.
  """
  params = module.variables['params']
  trees = [params[name] for name in names]
  key = None if deterministic else module.make_rng('dropout')

  def body(layer_params, x, args, key, index):
    rngs = {} if deterministic else {'dropout': jax.random.fold_in(key, index)}
    out = layer.apply({'params': layer_params}, x, *args, deterministic, rngs=rngs)
    return out[0] if first_output else out

  if not scan:
    body = jax.jit(body)
  if remat != 'none':
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
  if not scan:
    for index, tree in enumerate(trees, start):
      x = body(tree, x, args, key, index)
    return x
  structure = jax.tree_util.tree_structure(trees[0])
  for name, tree in zip(names[1:], trees[1:]):
    if jax.tree_util.tree_structure(tree) != structure:
      raise ValueError(f'model.scan_layers=True: {name} has other parameters than {names[0]} (LoRA targets that '
                       'name some layers only?); expected every layer alike, or model.scan_layers=False')
  stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)
  x, _ = jax.lax.scan(lambda x, inputs: (body(inputs[0], x, args, key, inputs[1]), None), x,
                      (stacked, jnp.arange(start, start + len(names))))
  return x


REMATS = ('none', 'full', 'dots')
# nn.remat policy per model.remat: 'full' recomputes everything, 'dots' keeps the matmul outputs.
REMAT_POLICIES = {'full': None, 'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class RMSNorm(nn.Module):
  """x / rms(x) * scale, no mean and no bias, normalised in float32 and cast back before the scale: transformers'
  LlamaRMSNorm and T5LayerNorm. `cfg` gives norm_eps, dtype and param_dtype."""
  cfg: Any

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    cfg = self.cfg
    scale_D = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',)),
                         (x_BLD.shape[-1],), cfg.param_dtype)
    x32_BLD = x_BLD.astype(jnp.float32)
    x32_BLD *= jax.lax.rsqrt(jnp.mean(jnp.square(x32_BLD), axis=-1, keepdims=True) + cfg.norm_eps)
    return x32_BLD.astype(cfg.dtype) * scale_D.astype(cfg.dtype)


def merge_lora(params: Any, cfg: Any) -> Any:
  """Folds every LoRA pair into its kernel (kernel + alpha / r * A . B) and drops the adapters: the plain model."""
  def merge(tree):
    if not isinstance(tree, dict):
      return tree
    out = {k: merge(v) for k, v in tree.items() if k not in LORA_PARAMS}
    if 'lora_a' in tree:
      delta = jnp.tensordot(tree['lora_a'], tree['lora_b'], axes=1) * (cfg.lora_alpha / cfg.lora_rank)
      out['kernel'] = tree['kernel'] + delta.astype(tree['kernel'].dtype)
    return out
  return merge(params)
