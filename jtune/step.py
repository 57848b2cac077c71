"""The pure train and eval steps, and where they are jitted with explicit shardings."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jtune import optim
from jtune import sharding as sharding_lib
from jtune.state import TrainState
from jtune.tasks import classification

Batch = dict[str, jax.Array]


def _logits(model: nn.Module, params: Any, batch: Batch, **kwargs) -> jax.Array:
  return model.apply({'params': params}, batch['input_ids'], batch['attention_mask'],
                     batch['token_type_ids'], **kwargs)


def _micro_batches(batch: Batch, k: int) -> Batch:
  """[B, ...] -> [k, B/k, ...]: micro-batch m takes rows m, m + k, ..., so each keeps the batch's split over
  the data axes (every device contributes B/k/devices rows to every micro-batch)."""
  return jax.tree_util.tree_map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(state: TrainState, batch: Batch, *, model: nn.Module, tx: optax.GradientTransformation,
               lr: optax.Schedule, accumulation_steps: int = 1, label_smoothing: float = 0.0
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on one global batch, its gradient summed over `accumulation_steps` micro-batches."""
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_sums(params, micro, rng):
    logits_BC = _logits(model, params, micro, deterministic=False, rngs={'dropout': rng})
    return classification.loss_sums(logits_BC, micro, label_smoothing)  # (loss sum, weight sum)

  sums_and_grads = jax.value_and_grad(loss_sums, has_aux=True)
  if accumulation_steps == 1:
    (total, weight), grads = sums_and_grads(state.params, batch, dropout_rng)
  else:
    def accumulate(carry, xs):
      micro, index = xs
      out = sums_and_grads(state.params, micro, jax.random.fold_in(dropout_rng, index))
      return jax.tree_util.tree_map(jnp.add, carry, out), None
    zeros = ((jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
             jax.tree_util.tree_map(jnp.zeros_like, state.params))
    ((total, weight), grads), _ = jax.lax.scan(
        accumulate, zeros, (_micro_batches(batch, accumulation_steps), jnp.arange(accumulation_steps)))
  weight = jnp.maximum(weight, 1.0)
  loss, grads = total / weight, jax.tree_util.tree_map(lambda g: g / weight, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'learning_rate': lr(state.step),
             **optim.nonfinite_counts(opt_state)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, *, model: nn.Module) -> dict[str, jax.Array]:
  """Summable evaluation statistics for one global batch."""
  return classification.eval_sums(_logits(model, params, batch, deterministic=True), batch)


def predict_step(params: Any, batch: Batch, *, model: nn.Module) -> jax.Array:
  return _logits(model, params, batch, deterministic=True)


def compile_steps(model: nn.Module, tx: optax.GradientTransformation, lr: optax.Schedule,
                  mesh: Mesh, state_shardings: TrainState, accumulation_steps: int = 1,
                  label_smoothing: float = 0.0) -> tuple[Callable, Callable]:
  """jit(train_step) and jit(eval_step) with explicit shardings; the state's buffers are donated."""
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  train = jax.jit(
      functools.partial(train_step, model=model, tx=tx, lr=lr, accumulation_steps=accumulation_steps,
                        label_smoothing=label_smoothing),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,))
  evaluate = jax.jit(
      functools.partial(eval_step, model=model),
      in_shardings=(state_shardings.params, batch_sharding),
      out_shardings=replicated)
  return train, evaluate
