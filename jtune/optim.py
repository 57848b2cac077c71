"""Optax optimizer and learning-rate schedule from the config."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jtune import config as config_lib

# Parameter names that never get weight decay: biases and LayerNorm scales/offsets.
NO_DECAY_NAMES = ('bias', 'scale')


def warmup_steps(cfg: config_lib.OptimConfig, total_steps: int) -> int:
  return int(round(cfg.warmup_ratio * total_steps))


def schedule(cfg: config_lib.OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then linear or cosine decay to 0 at `total_steps`."""
  warmup = warmup_steps(cfg, total_steps)
  if cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(total_steps, 1))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.learning_rate, warmup),
       optax.linear_schedule(cfg.learning_rate, 0.0, max(total_steps - warmup, 1))],
      [warmup])


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: every parameter but biases and LayerNorm parameters."""
  def keep(path, _):
    names = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]  # skips metadata boxes
    in_layer_norm = any('layernorm' in n.lower() for n in names)
    return names[-1] not in NO_DECAY_NAMES and not in_layer_norm
  return jax.tree_util.tree_map_with_path(keep, params)


def optimizer(cfg: config_lib.OptimConfig, lr: optax.Schedule) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with decoupled weight decay on the masked parameters.

  Wrapped in `optax.apply_if_finite`: a step whose gradients hold a NaN or Inf changes neither the parameters nor
  the optimizer state; the trainer stops the run after `train.max_nonfinite_steps` of them in a row.
  """
  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=decay_mask))
  return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=NEVER_GIVE_UP)


# apply_if_finite applies a non-finite update after this many in a row; the trainer stops long before.
NEVER_GIVE_UP = 2**30


def nonfinite_counts(opt_state: Any) -> dict[str, jax.Array]:
  """Skipped (non-finite) steps: how many in a row up to now, and how many in the whole run."""
  return {'nonfinite_in_a_row': optax.tree.get(opt_state, 'notfinite_count'),
          'skipped_steps': optax.tree.get(opt_state, 'total_notfinite')}
