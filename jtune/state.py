"""TrainState and its sharded initialisation: parameters are born sharded, never whole on one device."""

from __future__ import annotations

import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from jtune import optim
from jtune import sharding as sharding_lib

_LOG = logging.getLogger(__name__)


class TrainState(struct.PyTreeNode):
  """Everything a step changes. Model and optimizer enter the step through functools.partial."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


# The batch columns an encoder takes, in argument order; decoders take their family's (jtune.hf.*.INPUTS).
ENCODER_INPUTS = ('input_ids', 'attention_mask', 'token_type_ids')
# Batch columns a head adds to its family's inputs (jtune.modeling.Model.inputs).
HEAD_INPUTS = {'mlm': ('mlm_positions',), 'causal_lm': ('target_positions',)}


def _boxed_init(model: nn.Module, tx: optax.GradientTransformation, sample: list[jax.Array],
                rng: jax.Array) -> TrainState:
  """Initial state whose parameters and optimizer moments still carry logical-axis metadata."""
  params_rng, dropout_rng = jax.random.split(rng)
  params = model.init({'params': params_rng}, *sample, deterministic=True)['params']
  opt_state = sharding_lib.unbox_misfits(optim.init_state(tx, params))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=dropout_rng)


def _boxed_init_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int,
                   inputs: tuple[str, ...]) -> Callable[[jax.Array], TrainState]:
  sample = [jnp.zeros((1, seq_len), jnp.int32) for _ in inputs]
  return lambda rng: _boxed_init(model, tx, sample, rng)


def shapes(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules,
           seq_len: int, inputs: tuple[str, ...] = ENCODER_INPUTS) -> tuple[TrainState, TrainState]:
  """Returns (abstract state carrying its shardings, the shardings); allocates nothing.

  Raises ConfigError when a parameter axis does not divide over the mesh axes the rules give it.
  """
  boxed = jax.eval_shape(_boxed_init_fn(model, tx, seq_len, inputs), jax.random.PRNGKey(0))
  sharding_lib.check_divisible(boxed, mesh, rules)
  unruled = sharding_lib.unruled_axes(boxed, rules)
  if unruled:
    _LOG.warning('config.mesh.rules has no rule for the logical axes %s: they are replicated on every device '
                 '(a rule (axis, None) says so and silences this)', ', '.join(unruled))
  shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)
  return abstract, shardings


def init(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules, seed: int,
         seq_len: int, inputs: tuple[str, ...] = ENCODER_INPUTS) -> tuple[TrainState, TrainState]:
  """Returns (state born sharded, its shardings): eval_shape, then jit with out_shardings."""
  _, shardings = shapes(model, tx, mesh, rules, seq_len, inputs)
  boxed_init = _boxed_init_fn(model, tx, seq_len, inputs)
  with sharding_lib.activate(mesh, rules):
    state = jax.jit(lambda rng: nn.unbox(boxed_init(rng)), out_shardings=shardings)(
        jax.random.PRNGKey(seed))
  return state, shardings


def abstract_like(state: TrainState) -> TrainState:
  """ShapeDtypeStructs with the shardings of `state`: the restore target for checkpoints."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def num_params(params: Any) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))
