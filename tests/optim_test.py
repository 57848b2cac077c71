"""Schedules, the weight-decay mask and clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtune import config as config_lib
from jtune import optim


def _cfg(**kw):
  base = dict(name='adamw', learning_rate=1e-3, schedule='linear', warmup_ratio=0.1, weight_decay=0.01,
              b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0)
  base.update(kw)
  return config_lib.OptimConfig(**base)


def test_linear_warmup_then_linear_decay():
  lr = optim.schedule(_cfg(), total_steps=100)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10, 55, 100)],
                             [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)


def test_cosine_decay():
  lr = optim.schedule(_cfg(schedule='cosine'), total_steps=100)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 10, 55, 100)], [0.0, 1e-3, 5e-4, 0.0],
                             atol=1e-9)


def test_no_weight_decay_on_biases_and_layer_norm():
  params = {'dense': {'kernel': 1.0, 'bias': 1.0}, 'LayerNorm': {'scale': 1.0, 'bias': 1.0},
            'embeddings': {'embedding': 1.0}}
  assert optim.decay_mask(params) == {
      'dense': {'kernel': True, 'bias': False}, 'LayerNorm': {'scale': False, 'bias': False},
      'embeddings': {'embedding': True}}


def test_decay_applies_only_where_masked():
  # With zero gradients the only change is the decoupled weight decay.
  params = {'dense': {'kernel': jnp.ones(3), 'bias': jnp.ones(3)}}
  tx = optim.optimizer(_cfg(weight_decay=0.5, warmup_ratio=0.0), lambda _: 0.1)
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['dense']['kernel'], -0.05 * np.ones(3), rtol=1e-6)
  np.testing.assert_allclose(updates['dense']['bias'], np.zeros(3))


@pytest.mark.parametrize('clip', [1.0, 0.0])
def test_global_norm_clipping(clip):
  # eps=1 makes Adam's first update depend on the gradient's scale, so clipping shows in the update.
  params = {'w': jnp.zeros(2)}
  tx = optim.optimizer(_cfg(grad_clip_norm=clip, weight_decay=0.0, eps=1.0), lambda _: 1.0)
  grads = {'w': jnp.array([30.0, 40.0])}
  updates, _ = tx.update(grads, tx.init(params), params)
  g = np.array([0.6, 0.8]) if clip else np.array([30.0, 40.0])
  np.testing.assert_allclose(updates['w'], -g / (g + 1.0), rtol=1e-5)
