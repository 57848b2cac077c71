"""jtune.prng's rbg_xor_fold: a fold_in that XLA folds to a constant (no RngBitGenerator of its own, unlike
unsafe_rbg's), the same key traced or constant, distinct keys for distinct data, and streams that share no words."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtune import prng

FMIX = '2246822507'  # 0x85EBCA6B, a multiplier of the fold's hash, as it appears in HLO text


def _bits_of_fold(impl, data_is_traced):
  """Lowered and compiled text of: the bits of a key folded with 7 (a constant, or a traced argument)."""
  key = jax.random.key(0, impl=prng.impl(impl))
  if data_is_traced:
    fn, args = (lambda k, d: jax.random.bits(jax.random.fold_in(k, d), (4, 8), jnp.uint32)), (key, jnp.uint32(7))
  else:
    fn, args = (lambda k: jax.random.bits(jax.random.fold_in(k, 7), (4, 8), jnp.uint32)), (key,)
  lowered = jax.jit(fn).lower(*args)
  return lowered.as_text(), lowered.compile().as_text()


@pytest.mark.parametrize('impl, generators', [('rbg_xor_fold', 1), ('unsafe_rbg', 2)])
def test_fold_in_draws_no_random_bits_of_its_own(impl, generators):
  """unsafe_rbg hashes the folded data with an RngBitGenerator call (Philox, which XLA:CPU cannot constant-fold);
  rbg_xor_fold with integer arithmetic, which XLA folds away when the data is a constant."""
  lowered, compiled = _bits_of_fold(impl, data_is_traced=False)
  assert lowered.count('stablehlo.rng_bit_generator') == generators
  if impl == 'rbg_xor_fold':
    assert FMIX in lowered and FMIX not in compiled  # the hash ran at compile time
    assert FMIX in _bits_of_fold(impl, data_is_traced=True)[1]  # and runs in the program when it must


def test_traced_and_constant_data_give_the_same_key():
  key = jax.random.key(3, impl=prng.RBG_XOR_FOLD)
  for data in (0, 1, 11, 2**31 + 5):
    constant = jax.random.key_data(jax.random.fold_in(key, data))
    traced = jax.jit(lambda k, d: jax.random.key_data(jax.random.fold_in(k, d)))(key, jnp.uint32(data))
    np.testing.assert_array_equal(constant, traced)


def test_distinct_data_give_distinct_key_words():
  """The fold's hash is a bijection of uint32 per word: 10,000 folds of one key differ in every word."""
  key = jax.random.key(0, impl=prng.RBG_XOR_FOLD)
  words = np.asarray(jax.vmap(lambda d: jax.random.key_data(jax.random.fold_in(key, d)))(jnp.arange(10_000)))
  assert words.shape == (10_000, 4)
  for column in range(4):
    assert len(np.unique(words[:, column])) == 10_000
  assert not (words == np.asarray(jax.random.key_data(key))).any()


def test_folded_streams_share_no_words_and_look_uniform():
  """Keys that differed in the counter half of the state alone would draw shifted copies of one stream; no 64-bit
  pair of words drawn under 64 consecutive folds (and the key itself) appears twice."""
  key = jax.random.key(0, impl=prng.RBG_XOR_FOLD)
  keys = [key] + [jax.random.fold_in(key, i) for i in range(64)]
  bits = np.stack([np.asarray(jax.random.bits(k, (2048, 2), jnp.uint32)) for k in keys]).astype(np.uint64)
  pairs = (bits[..., 0] << np.uint64(32)) | bits[..., 1]
  assert len(np.unique(pairs)) == pairs.size
  ones = np.unpackbits(bits.astype(np.uint32).view(np.uint8)).mean()
  assert abs(ones - 0.5) < 0.005  # 8.5M bits: std 0.00017
