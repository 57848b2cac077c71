"""jtune's Dropout (8 random bits per element): identity when deterministic, the documented keep rate and scale,
independent draws within each random word, and the same mask on one device as on a sharded mesh, with any PRNG
jtune draws masks with (config.train.dropout_rng: threefry2x32, unsafe_rbg or rbg_xor_fold). jtune's exact
GELU (erf) against jax's (erfc) and the exact formula in float64. dense_dot, the Dense layers' product, against
dot_general, and its weight gradient free of transposed copies of the input on XLA:CPU; embed_logits (tied LM heads)
against nn.Embed.attend, its table's gradient free of them too."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jtune import prng
from jtune.models import layers


IMPLS = ['threefry2x32', 'unsafe_rbg', 'rbg_xor_fold']


def _drop(rate, x, seed=0, deterministic=False, impl='threefry2x32'):
  return layers.Dropout(rate).apply({}, x, deterministic=deterministic,
                                    rngs={'dropout': jax.random.key(seed, impl=prng.impl(impl))})


def test_identity_when_deterministic_or_rate_zero():
  x = jnp.arange(24.0).reshape(2, 3, 4)
  np.testing.assert_array_equal(_drop(0.5, x, deterministic=True), x)
  np.testing.assert_array_equal(_drop(0.0, x), x)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('rate', [0.1, 0.5])
def test_keep_rate_scale_and_mean(rate, impl):
  x = jnp.ones((64, 1003), jnp.float32)  # last dim not a multiple of 4: the last word is partly used
  y = np.asarray(_drop(rate, x, impl=impl))
  keep = round(256 * (1 - rate))
  kept = y != 0
  np.testing.assert_allclose(y[kept], 256 / keep, rtol=1e-6)
  assert abs(kept.mean() - keep / 256) < 0.006  # 64k Bernoulli draws: std ~0.0012
  assert abs(y.mean() - 1.0) < 0.01  # unbiased: E[y] = x
  for lane in range(4):  # the four draws of each 32-bit word are each Bernoulli(keep / 256) ...
    assert abs(kept[:, lane::4].mean() - keep / 256) < 0.012
  lanes = kept[:, :1000].reshape(64, 250, 4)  # ... and not copies of one another
  assert (lanes[..., 0] != lanes[..., 1]).mean() > 0.5 * 2 * rate * (1 - rate)


@pytest.mark.parametrize('impl', IMPLS)
def test_seeds_differ_and_dtype_kept(impl):
  x = jnp.ones((8, 16), jnp.bfloat16)
  a, b = _drop(0.1, x, 0, impl=impl), _drop(0.1, x, 1, impl=impl)
  assert a.dtype == jnp.bfloat16 and a.shape == x.shape
  assert not np.array_equal(np.asarray(a), np.asarray(b))


class _TwoSites(nn.Module):
  @nn.compact
  def __call__(self, x):
    return layers.Dropout(0.5)(x, deterministic=False), layers.Dropout(0.5)(x, deterministic=False)


@pytest.mark.parametrize('impl', IMPLS)
def test_each_site_draws_its_own_mask(impl):
  """Flax folds each module's path into the key (make_rng): two dropouts of one step share no mask."""
  a, b = _TwoSites().apply({}, jnp.ones((64, 256)), rngs={'dropout': jax.random.key(0, impl=prng.impl(impl))})
  agree = (np.asarray(a) != 0) == (np.asarray(b) != 0)
  assert 0.45 < agree.mean() < 0.55  # independent Bernoulli(1/2) masks agree half the time


def test_rate_near_one_drops_everything():
  np.testing.assert_array_equal(_drop(0.999, jnp.ones((4, 4))), 0.0)


@pytest.mark.parametrize('impl', IMPLS)
def test_same_mask_on_a_sharded_mesh(impl):
  x = jax.random.normal(jax.random.key(1), (8, 4, 32, 32))
  want = _drop(0.1, x, seed=3, impl=impl)
  mesh = jax.make_mesh((4, 2), ('data', 'model'))
  sharding = NamedSharding(mesh, P('data', 'model'))
  got = jax.jit(lambda v: _drop(0.1, v, seed=3, impl=impl), in_shardings=sharding, out_shardings=sharding)(
      jax.device_put(x, sharding))
  assert got.sharding == sharding
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_gelu_is_exact_gelu(dtype):
  x = jnp.linspace(-12.0, 12.0, 4001, dtype=jnp.float32).astype(dtype)
  reference = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2.0)) for v in np.asarray(x, np.float64)])
  y = layers.gelu(x)
  assert y.dtype == dtype
  tolerance = 2e-6 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(y, np.float64), reference, atol=tolerance, rtol=tolerance)
  if dtype == jnp.float32:  # and its gradient, Phi(x) + x phi(x), is jax.nn.gelu's
    grad = jax.vmap(jax.grad(layers.gelu))(x)
    expected = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(grad, expected, atol=2e-6)


@pytest.mark.parametrize('in_axes', [1, 2])
def test_dense_dot_is_dot_general(in_axes):
  x = jax.random.normal(jax.random.key(0), (3, 5, 4, 6))
  kernel = jax.random.normal(jax.random.key(1), (4, 6, 7) if in_axes == 2 else (6, 2, 7))
  contract = (tuple(range(4 - in_axes, 4)), tuple(range(in_axes)))
  want = jax.lax.dot_general(x, kernel, (contract, ((), ())), precision='highest')
  got = jax.jit(layers.dense_dot, static_argnums=2)(x, kernel, in_axes)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dense_weight_gradient_reads_its_input_as_it_is():
  """A dot_general over [B, L, in] makes XLA:CPU copy the input transposed for the kernel's gradient (a [96, 4, 32]
  transpose here); dense_dot's 2-D matmul leaves the program without any transpose or copy."""
  def loss(kernel, x):
    return jnp.sum(jnp.tanh(layers.dense_dot(x, kernel, 1)))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  hlo = grad.lower(jnp.ones((64, 96)), jnp.ones((4, 32, 64))).compile().as_text()
  assert not [line for line in hlo.splitlines() if ' transpose(' in line or ' copy(' in line], hlo


def test_embed_logits_is_attend_and_its_table_gradient_reads_the_logits_as_they_are():
  embed = nn.Embed(96, 64)
  x = jax.random.normal(jax.random.key(0), (4, 32, 64))
  variables = embed.init(jax.random.key(1), jnp.zeros((1,), jnp.int32))
  want = embed.apply(variables, x, method=nn.Embed.attend)
  got = embed.apply(variables, x, method=lambda module, v: layers.embed_logits(module, v))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def loss(table, v):
    return jnp.sum(jnp.tanh(embed.apply({'params': {'embedding': table}}, v,
                                        method=lambda module, u: layers.embed_logits(module, u))))
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables['params']['embedding'], x).compile().as_text()
  assert not [line for line in hlo.splitlines() if ' transpose(' in line or ' copy(' in line], hlo
