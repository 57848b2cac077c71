"""Optax optimizer and learning-rate schedule from the config: optimizers, schedules, parameter groups.

Parameters are addressed by their path, 'bert/layer_3/attention/query/kernel', matched with `re.search`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtune import config as config_lib

# Parameter names that never get weight decay: biases (any name with 'bias' in it, as Hugging Face's Trainer
# decides: T5's relative_attention_bias too) and norm scales.
NO_DECAY_NAMES = ('bias', 'scale')


def path_names(path) -> list[str]:
  """The dict keys of a pytree path (Flax's metadata boxes and optax's wrappers skipped)."""
  return [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]


def path_str(path) -> str:
  return '/'.join(path_names(path))


def warmup_steps(cfg: config_lib.OptimConfig, total_steps: int) -> int:
  if cfg.warmup_steps >= 0:
    return cfg.warmup_steps
  return int(round(cfg.warmup_ratio * total_steps))


def schedule(cfg: config_lib.OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then constant, linear or cosine decay to 0 at `total_steps`, or
  inverse square root decay (peak * sqrt(warmup / step))."""
  warmup, peak = warmup_steps(cfg, total_steps), cfg.learning_rate
  ramp = optax.linear_schedule(0.0, peak, warmup)
  rest = max(total_steps - warmup, 1)
  after = {
      'constant': lambda: optax.constant_schedule(peak),
      'linear': lambda: optax.linear_schedule(peak, 0.0, rest),
      'cosine': lambda: optax.cosine_decay_schedule(peak, rest),
      'inverse_sqrt': lambda: (lambda step: peak * jnp.sqrt(max(warmup, 1) / (step + max(warmup, 1)))),
  }[cfg.schedule]()

  joined = optax.join_schedules([ramp, after], [warmup])

  def rate(step):
    # On a CPU, a lax.cond instead of optax.join_schedules' select: XLA fuses a select's cheap scalar arithmetic
    # into every kernel that reads the rate (~25 instructions in each parameter's update: 5,000 in BERT-base's
    # train step), where a conditional's result is computed once (benchmarks/README.md). Accelerators keep the
    # select: XLA:GPU may wait on the host for a conditional's branch. So do arrays of steps (a plot's).
    if jax.default_backend() != 'cpu' or jnp.ndim(step):
      return joined(step)
    step = jnp.asarray(step)
    return jax.lax.cond(step < warmup, ramp, lambda s: after(s - warmup), step)
  return rate


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: every parameter but biases, norm scales and LayerNorm parameters."""
  def keep(path, _):
    names = path_names(path)
    in_layer_norm = any('layernorm' in n.lower() for n in names)
    return not any(n in names[-1] for n in NO_DECAY_NAMES) and not in_layer_norm
  return jax.tree_util.tree_map_with_path(keep, params)


def trainable_mask(patterns: tuple[str, ...]) -> Callable[[Any], Any]:
  """Label 'train' for parameters whose path matches a pattern, 'frozen' for the rest."""
  def labels(params):
    out = jax.tree_util.tree_map_with_path(
        lambda path, _: 'train' if any(re.search(p, path_str(path)) for p in patterns) else 'frozen', params)
    if 'train' not in jax.tree_util.tree_leaves(out):
      some = ', '.join(path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)[-3:])
      lora = any('lora' in p for p in patterns)  # LoRA's own parameters: its targets may match no layer
      raise config_lib.ConfigError(
          f'config.optim.trainable={patterns}: matches no parameter of this model, so nothing would train; '
          f'expected patterns of its parameter paths (e.g. {some})'
          + ('; with LoRA, check that config.model.lora.targets match some layer' if lora else ''))
    return out
  return labels


# Paths of the input embeddings (depth 0 of the layer-wise decay): BERT's family, the decoders' and T5's.
EMBEDDINGS = r'(?:^|/)(?:embeddings|embed_tokens|position_embeddings|shared)/'


def lr_multipliers(cfg: config_lib.OptimConfig, params: Any) -> Any:
  """Per-parameter factors on the learning rate: the first matching `lr_multipliers` pattern, times the
  layer-wise decay `layer_decay ** (L + 1 - depth)` (embeddings depth 0, layer_i depth i + 1, the rest L + 1)."""
  # Under multi_transform the tree holds a MaskedNode where a parameter is frozen: its layer still counts.
  paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))]
  depths = [int(m.group(1)) + 1 for p in paths if (m := re.search(r'(?:^|/)layer_(\d+)/', p))]
  top = max(depths, default=0) + 1

  def factor(path, _):
    name = path_str(path)
    f = next((m for pattern, m in cfg.lr_multipliers if re.search(pattern, name)), 1.0)
    layer = re.search(r'(?:^|/)layer_(\d+)/', name)
    depth = int(layer.group(1)) + 1 if layer else (0 if re.search(EMBEDDINGS, name) else top)
    return f * cfg.layer_decay ** (top - depth)
  return jax.tree_util.tree_map_with_path(factor, params)


def _scale_by_tree(factors_fn: Callable[[Any], Any]) -> optax.GradientTransformation:
  """Multiplies each update by its parameter's factor (the factors are fixed numbers, not state)."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, f: u * f, updates, factors_fn(updates)), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _matrix_shape(x: Any) -> tuple[int, ...]:
  """Parameter `x` (a Flax logical box or an array) as PyTorch holds it: a kernel as [fan-in, fan-out] (an
  attention output's [H, K, D] has a 2-dim fan-in, named ('heads', 'kv')), a [H, K] attention bias as one vector."""
  shape, names = np.shape(nn.unbox(x)), tuple(getattr(x, 'names', ()))
  if names == ('heads', 'kv'):
    return (math.prod(shape),)
  if len(shape) < 2:
    return shape
  split = 2 if names[:2] == ('heads', 'kv') else 1
  return (math.prod(shape[:split]), math.prod(shape[split:]))


def factored_rms_of_matrices() -> optax.GradientTransformation:
  """optax.scale_by_factored_rms on each parameter as PyTorch holds it (`_matrix_shape`), which is how Hugging
  Face's Adafactor factors it: a matrix gets row and column statistics, a vector a full second moment.

  Plain optax factors an array's two largest dims, and only where both have 128 entries or more: jtune's
  attention kernels ([D, H, K] and [H, K, D]) kept a full second moment (BERT-base's Adafactor state: 109 MiB
  instead of about 1) and their updates differed from Hugging Face's by most of their size. The views are
  reshapes; `init` reads them from the parameters' logical axis names, `update` from the statistics' sizes.
  """
  inner = optax.scale_by_factored_rms(min_dim_size_to_factor=1)

  def init(params):  # a parameter already in its PyTorch shape keeps its box: its moments are sharded from it
    return inner.init(jax.tree_util.tree_map(
        lambda x: x if _matrix_shape(x) == np.shape(nn.unbox(x)) else jnp.reshape(nn.unbox(x), _matrix_shape(x)),
        params, is_leaf=lambda x: isinstance(x, nn.Partitioned)))

  def views(tree, state):
    def one(x, rows, cols, v):
      if v.size > 1 or x.size == 1:  # not factored: v has the view's shape
        return x.reshape(v.shape)
      sizes = sorted((rows.size, cols.size))
      split = next(k for k in range(1, x.ndim)
                   if sorted((math.prod(x.shape[:k]), math.prod(x.shape[k:]))) == sizes)
      return x.reshape(math.prod(x.shape[:split]), math.prod(x.shape[split:]))
    return jax.tree_util.tree_map(one, tree, state.v_row, state.v_col, state.v)

  def update(updates, state, params=None):
    out, state = inner.update(views(updates, state), state, views(params, state))
    return jax.tree_util.tree_map(lambda o, u: o.reshape(u.shape), out, updates), state
  return optax.GradientTransformation(init, update)


def _base(cfg: config_lib.OptimConfig, lr: optax.Schedule) -> optax.GradientTransformation:
  wd = cfg.weight_decay
  if cfg.name == 'adamw':
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=decay_mask)
  if cfg.name == 'adafactor':  # factored second moments: optimizer state far smaller than Adam's
    # optax.adafactor's chain with the weight decay before the learning rate, as in Hugging Face's Adafactor and
    # in AdamW here (p -= lr * (u + wd * p)); optax's adds it after (p -= lr * u + wd * p: T5's convention, where
    # the default 0.01 would shrink every weight by 1% a step).
    return optax.chain(factored_rms_of_matrices(), optax.clip_by_block_rms(1.0),
                       optax.add_decayed_weights(wd, decay_mask), optax.scale_by_learning_rate(lr))
  if cfg.name == 'lion':
    return optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=decay_mask)
  return optax.chain(optax.add_decayed_weights(wd, decay_mask), optax.sgd(lr, momentum=cfg.momentum))


def clip_by_global_norm(max_norm: float, norm_given: bool = False) -> optax.GradientTransformationExtraArgs:
  """Scales the whole gradient by min(1, max_norm / global norm).

  optax.clip_by_global_norm's result, written as one multiply: its per-parameter `select` kept XLA:CPU from
  fusing the clip into the optimizer's element-wise update (BERT-base: 170 ms of a step; benchmarks/README.md).
  norm_given: the global norm is update's `grad_norm` keyword where one is passed (`apply_gradients` passes the
  one the train step has computed already, which spares a second pass over every gradient inside the optimizer's
  lax.cond); only right where the updates are the whole gradient, not a masked part of it.
  """
  def update(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    norm = grad_norm if norm_given and grad_norm is not None else optax.tree.norm(updates)
    scale = jnp.minimum(1.0, max_norm / norm)
    return jax.tree_util.tree_map(lambda u: (u * scale).astype(u.dtype), updates), state
  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def optimizer(cfg: config_lib.OptimConfig, lr: optax.Schedule) -> optax.GradientTransformation:
  """Clipping, the chosen optimizer with decoupled weight decay, per-parameter learning-rate factors; frozen
  parameters get no update and no optimizer state. Its state comes from `init_state` and a step applies it
  with `apply_gradients`, which skips steps whose gradient is not finite.
  """
  parts = []
  everything = cfg.trainable == ('.*',)
  if cfg.grad_clip_norm > 0:  # frozen parameters' gradients are no part of the norm clipped
    parts.append(clip_by_global_norm(cfg.grad_clip_norm, norm_given=everything))
  parts.append(_base(cfg, lr))
  if cfg.lr_multipliers or cfg.layer_decay != 1.0:
    parts.append(_scale_by_tree(lambda tree: lr_multipliers(cfg, tree)))
  tx = optax.chain(*parts)
  if not everything:
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, trainable_mask(cfg.trainable))
  return tx


def init_state(tx: optax.GradientTransformation, params: Any) -> optax.ApplyIfFiniteState:
  """`tx`'s state with counters of skipped steps (optax.apply_if_finite's state, so the names match)."""
  return optax.ApplyIfFiniteState(notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True),
                                  total_notfinite=jnp.zeros([], jnp.int32), inner_state=tx.init(params))


def apply_gradients(tx: optax.GradientTransformation, grads: Any, opt_state: optax.ApplyIfFiniteState,
                    params: Any, grad_norm: jax.Array | None = None) -> tuple[Any, optax.ApplyIfFiniteState]:
  """(new parameters, new state) after one update by `tx`; a step whose gradient holds a NaN or Inf (its
  global norm is not finite) changes neither the parameters nor `tx`'s state, only the skip counters. The trainer
  stops the run after `train.max_nonfinite_steps` skipped steps in a row.

  One lax.cond around the update *and* its application, so that XLA fuses the two (optax.apply_if_finite
  conditions the update alone and writes it out first: +145 ms per BERT-base step on XLA:CPU). `grad_norm`: the
  gradient's global norm where the caller has it already (tracing one costs a pass over every parameter).
  """
  grad_norm = optax.tree.norm(grads) if grad_norm is None else grad_norm
  finite = jnp.isfinite(grad_norm)

  def update(params, inner):  # the norm goes to the clip (clip_by_global_norm), which need not compute it again
    updates, inner = optax.with_extra_args_support(tx).update(grads, inner, params, grad_norm=grad_norm)
    return optax.apply_updates(params, updates), inner
  params, inner = jax.lax.cond(finite, update, lambda params, inner: (params, inner), params,
                               opt_state.inner_state)
  return params, optax.ApplyIfFiniteState(
      notfinite_count=jnp.where(finite, 0, opt_state.notfinite_count + 1), last_finite=finite,
      total_notfinite=opt_state.total_notfinite + (~finite).astype(jnp.int32), inner_state=inner)


def nonfinite_counts(opt_state: optax.ApplyIfFiniteState) -> dict[str, jax.Array]:
  """Skipped (non-finite) steps: how many in a row up to now, and how many in the whole run."""
  return {'nonfinite_in_a_row': opt_state.notfinite_count, 'skipped_steps': opt_state.total_notfinite}
