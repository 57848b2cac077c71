"""rbg_xor_fold: JAX's unsafe_rbg with a fold_in that XLA folds to a constant, for the dropout masks on CPUs.

unsafe_rbg draws with XLA's RngBitGenerator (Philox), and so does its fold_in: it hashes the folded integer by
drawing [10, 4] words from it, and XLA:CPU expands each RngBitGenerator into about 290 instructions of Philox
rounds, which it cannot constant-fold. A train step folds a constant into its key at every dropout site (Flax's
`make_rng`: a hash of the site's path) and at every layer (`layers.apply_layers`): in BERT-base's train step, 5,300
of XLA's 46,900 optimised instructions computed keys from constants (benchmarks/README.md). Here fold_in is the key
XOR an integer hash of the data (murmur3's 32-bit finalizer, a bijection, over four offsets of it): for a constant,
XLA folds it into one XOR of four words; for a traced value (the layer index under `model.scan_layers`) it is a few
dozen scalar operations. Seeds, splits and the masks' random bits are unsafe_rbg's.

unsafe_rbg's fold_in is an XOR too (with Philox's hash of the data), so the two share its one caveat: folds
commute, fold_in(fold_in(k, a), b) == fold_in(fold_in(k, b), a), which jtune's step and R-Drop already avoid
(jtune/step.py `dropout_key`, jtune/robust.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import random as jex_random

_UNSAFE_RBG = jex_random.unsafe_rbg_prng_impl
# Four odd 32-bit offsets (the golden ratio's and three of splitmix64's constants' words): one hash per key word.
_OFFSETS = (0x9E3779B9, 0x7F4A7C15, 0xBF58476D, 0x94D049BB)


def _fmix32(x: jax.Array) -> jax.Array:
  """murmur3's finalizer: a bijection of uint32 with full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _fold_in(key: jax.Array, data: Any) -> jax.Array:
  data = jnp.asarray(data).astype(jnp.uint32)
  return key ^ _fmix32(_fmix32(data + jnp.asarray(_OFFSETS, jnp.uint32)))


RBG_XOR_FOLD = jex_random.define_prng_impl(
    key_shape=_UNSAFE_RBG.key_shape, seed=_UNSAFE_RBG.seed, split=_UNSAFE_RBG.split,
    random_bits=_UNSAFE_RBG.random_bits, fold_in=_fold_in, name='rbg_xor_fold', tag='rxf')

# jtune's names for what jax.random.wrap_key_data(..., impl=) takes; JAX's own names stand for themselves.
_IMPLS = {'rbg_xor_fold': RBG_XOR_FOLD}


def impl(name: str) -> Any:
  """The `impl` argument of jax.random functions for a train.dropout_rng name ('rbg_xor_fold' or JAX's)."""
  return _IMPLS.get(name, name)
