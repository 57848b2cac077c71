"""Robust fine-tuning objectives around a task's loss: adversarial word embeddings (FGM, PGD) and R-Drop.

FGM (Miyato et al. 2017): the loss at the clean input plus the loss at word embeddings moved by
delta = epsilon * g / ||g||, g the gradient of the loss with respect to the embeddings, normalised per example
(every example's perturbation has L2 norm epsilon). PGD (Madry et al. 2018): `steps` ascent steps of size
`step_size` along the normalised gradient from delta = 0, each projected back into the per-example ball of
radius epsilon, then the loss there is added to the clean loss. R-Drop (Liang et al. 2021): two forward passes
with different dropout masks, their mean loss plus alpha times the symmetric KL divergence of their predicted
class distributions.

The models mark their word embeddings with Flax's `perturb` ('perturbations' collection), so the perturbation
enters through `apply`'s variables and the models stay free of training tricks. Every function returns the
(loss sum, weight sum) pair of the task losses, so micro-batches still add up.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jtune import config as config_lib

# (params, perturbations or None, dropout rng) -> the model's outputs
Apply = Callable[[Any, Any, jax.Array], jax.Array]
# outputs -> (loss sum, weight sum)
Loss = Callable[[jax.Array], tuple[jax.Array, jax.Array]]
TINY = 1e-12


def is_on(cfg: config_lib.TrainConfig) -> bool:
  return cfg.adversarial != 'none' or cfg.rdrop_alpha > 0


def _per_example_norm(delta: jax.Array) -> jax.Array:
  """L2 norm of each example's perturbation [B, ...] -> [B, 1, ...]."""
  axes = tuple(range(1, delta.ndim))
  return jnp.sqrt(jnp.sum(jnp.square(delta.astype(jnp.float32)), axis=axes, keepdims=True))


def normalized(g: Any, scale: float) -> Any:
  """scale * g / ||g|| for every example (leading axis) of every leaf; a zero gradient stays zero."""
  return jax.tree_util.tree_map(lambda x: (scale * x / jnp.maximum(_per_example_norm(x), TINY)).astype(x.dtype),
                                g)


def project(delta: Any, epsilon: float) -> Any:
  """Each example's perturbation scaled back onto the ball of radius epsilon where it lies outside."""
  return jax.tree_util.tree_map(
      lambda x: (x * jnp.minimum(1.0, epsilon / jnp.maximum(_per_example_norm(x), TINY))).astype(x.dtype), delta)


def symmetric_kl_sums(logits_a: jax.Array, logits_b: jax.Array, weights_B: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
  """(sum over examples of weight * (KL(p_a || p_b) + KL(p_b || p_a)) / 2, sum of weights), class axis last."""
  log_a = jax.nn.log_softmax(logits_a.astype(jnp.float32), axis=-1)
  log_b = jax.nn.log_softmax(logits_b.astype(jnp.float32), axis=-1)
  kl = 0.5 * jnp.sum((jnp.exp(log_a) - jnp.exp(log_b)) * (log_a - log_b), axis=-1)
  return jnp.sum(kl * weights_B), jnp.sum(weights_B)


def adversarial_delta(apply: Apply, loss: Loss, params: Any, zeros: Any, rng: jax.Array,
                      cfg: config_lib.TrainConfig) -> Any:
  """The perturbation of the word embeddings that FGM or PGD adds (no gradient flows into it)."""
  def delta_grad(delta):
    return jax.grad(lambda d: loss(apply(params, d, rng))[0])(delta)

  if cfg.adversarial == 'fgm':
    return jax.lax.stop_gradient(normalized(delta_grad(zeros), cfg.adversarial_epsilon))

  def ascend(_, delta):
    return project(jax.tree_util.tree_map(jnp.add, delta, normalized(delta_grad(delta), cfg.adversarial_step_size)),
                   cfg.adversarial_epsilon)
  return jax.lax.stop_gradient(jax.lax.fori_loop(0, cfg.adversarial_steps, ascend, zeros))


def loss_sums(apply: Apply, loss: Loss, params: Any, zeros: Any, rng: jax.Array, cfg: config_lib.TrainConfig,
              weights_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The robust objective as (loss sum, weight sum); differentiate it with respect to `params`.

  Adversarial: clean loss + loss at the perturbed embeddings (same dropout mask). R-Drop: the mean of two
  dropout passes' losses + rdrop_alpha * their symmetric KL.
  """
  if cfg.adversarial == 'fgm':  # one forward pass gives the clean loss and FGM's gradient both
    (clean_total, weight), grad = jax.value_and_grad(lambda d: loss(apply(params, d, rng)), has_aux=True)(zeros)
    delta = jax.lax.stop_gradient(normalized(grad, cfg.adversarial_epsilon))
  elif cfg.adversarial == 'pgd':
    clean_total, weight = loss(apply(params, zeros, rng))
    delta = adversarial_delta(apply, loss, params, zeros, rng, cfg)
  if cfg.adversarial != 'none':
    adv_total, _ = loss(apply(params, delta, rng))
    return clean_total + adv_total, weight
  # split, not fold_in(rng, 1): unsafe_rbg's and rbg_xor_fold's fold_in is an XOR, which apply_layers' fold of
  # layer 1 would undo
  rng_a, rng_b = jax.random.split(rng)
  out_a, out_b = apply(params, None, rng_a), apply(params, None, rng_b)
  (total_a, weight), (total_b, _) = loss(out_a), loss(out_b)
  kl_total, _ = symmetric_kl_sums(out_a, out_b, weights_B)
  return 0.5 * (total_a + total_b) + cfg.rdrop_alpha * kl_total, weight
