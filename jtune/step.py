"""The pure train and eval steps, and where they are jitted with explicit shardings."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
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


def train_step(state: TrainState, batch: Batch, *, model: nn.Module, tx: optax.GradientTransformation,
               lr: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on one global batch."""
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits_BC = _logits(model, params, batch, deterministic=False, rngs={'dropout': dropout_rng})
    return classification.loss(logits_BC, batch)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
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
                  mesh: Mesh, state_shardings: TrainState) -> tuple[Callable, Callable]:
  """jit(train_step) and jit(eval_step) with explicit shardings; the state's buffers are donated."""
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  train = jax.jit(
      functools.partial(train_step, model=model, tx=tx, lr=lr),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,))
  evaluate = jax.jit(
      functools.partial(eval_step, model=model),
      in_shardings=(state_shardings.params, batch_sharding),
      out_shardings=replicated)
  return train, evaluate
