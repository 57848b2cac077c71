"""Text generation with a decoder LM's KV cache: greedy, or sampled with temperature, top-k and top-p.

Prompts are left-padded to a bucket (a power of two, at least 16) so that every row's last prompt token sits in
the same cache slot; padding carries segment id 0 and is never attended to, and each row's positions count from
its own first token. One jitted function prefills the cache and runs the decode steps in a `lax.while_loop`
(stopping early once every row has produced EOS), so the host waits once per call, not once per token. It is
compiled once per (batch size, prompt bucket, max_new_tokens, greedy or sampled); temperature, top_k, top_p,
the seed and the token ids are traced values.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtune.models import decoder

MIN_BUCKET = 16


def bucket(length: int) -> int:
  """The padded width of `length` tokens: a power of two, at least MIN_BUCKET."""
  return max(MIN_BUCKET, 1 << (length - 1).bit_length())


def _left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, ...]:
  """(ids, positions, segment ids) [B, P], left-padded to the bucket, and the prompt lengths [B]."""
  lengths = np.array([len(r) for r in rows], np.int32)
  width = bucket(int(lengths.max()))
  ids = np.full((len(rows), width), pad_token_id, np.int32)
  segments = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    ids[i, width - len(row):] = row
    segments[i, width - len(row):] = 1
  positions = np.maximum(np.arange(width)[None, :] - (width - lengths)[:, None], 0).astype(np.int32)
  return ids, positions, segments, lengths


def _choose(logits_BV: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
            greedy: bool) -> jax.Array:
  """The next token [B]: argmax, or a sample from softmax(logits / temperature) restricted to the top_k most
  likely tokens (0: all) and then to the smallest set of them holding top_p of the probability."""
  if greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)
  kth_B1 = jnp.take(sorted_BV, jnp.clip(top_k, 1, logits_BV.shape[-1]) - 1, axis=-1)[:, None]
  kth_B1 = jnp.where(top_k > 0, kth_B1, -jnp.inf)
  sorted_BV = jnp.where(sorted_BV < kth_B1, -jnp.inf, sorted_BV)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  keep_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p  # the first token is always kept
  threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  threshold_B1 = jnp.where(top_p >= 1.0, kth_B1, jnp.maximum(threshold_B1, kth_B1))
  logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('module', 'max_new_tokens', 'greedy'))
def _generate(params: Any, ids_BP: jax.Array, positions_BP: jax.Array, segments_BP: jax.Array,
              lengths_B: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
              eos: jax.Array, pad: jax.Array, *, module: nn.Module, max_new_tokens: int, greedy: bool
              ) -> jax.Array:
  """New tokens [B, max_new_tokens]; after a row's EOS (eos < 0: none) come pad tokens."""
  B, P = ids_BP.shape
  apply = functools.partial(module.apply, {'params': params}, method='decode')
  choose = functools.partial(_choose, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
  cache = decoder.init_cache(module.cfg, B, P + max_new_tokens)
  logits_B1V, cache = apply(ids_BP, positions_BP, segments_BP, cache, 0, last_only=True)  # prompts end in column P
  first_B = choose(logits_B1V[:, 0], jax.random.fold_in(rng, 0))
  tokens_BN = jnp.full((B, max_new_tokens), pad, jnp.int32).at[:, 0].set(first_B)

  def cond(state):
    step, _, _, done_B, _ = state
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def body(state):
    step, token_B, tokens_BN, done_B, cache = state
    # token `step - 1` goes into slot P + step - 1, at position length + step - 1
    logits_B1V, cache = apply(token_B[:, None], (lengths_B + step - 1)[:, None], jnp.ones((B, 1), jnp.int32),
                              cache, P + step - 1)
    next_B = jnp.where(done_B, pad, choose(logits_B1V[:, 0], jax.random.fold_in(rng, step)))
    tokens_BN = jax.lax.dynamic_update_slice(tokens_BN, next_B[:, None], (0, step))
    return step + 1, next_B, tokens_BN, done_B | (next_B == eos), cache

  state = (jnp.int32(1), first_B, tokens_BN, first_B == eos, cache)
  tokens_BN = jax.lax.while_loop(cond, body, state)[2]
  return nn.with_logical_constraint(tokens_BN, (None, None))  # replicated: every process can read it


def check_rows(prompts: Sequence[Sequence[int]] | np.ndarray, name: str = 'prompts') -> list[list[int]]:
  """The token ids as lists; an empty batch or row is a ValueError."""
  rows = [[int(t) for t in p] for p in prompts]
  if not rows:
    raise ValueError(f'{name}=[]: expected at least one {name[:-1]}')
  empty = [i for i, r in enumerate(rows) if not r]
  if empty:
    raise ValueError(f'{name[:-1]} {empty[0]} has no tokens: expected at least one')
  return rows


def _check(module: nn.Module, longest: int, max_new_tokens: int, temperature: float, top_k: int,
           top_p: float) -> None:
  for field, value, ok, want in (
      ('max_new_tokens', max_new_tokens, max_new_tokens >= 0, 'a count >= 0'),
      ('temperature', temperature, temperature >= 0, '>= 0 (0: greedy)'),
      ('top_k', top_k, top_k >= 0, '>= 0 (0: all tokens)'),
      ('top_p', top_p, 0 < top_p <= 1, 'in (0, 1]')):
    if not ok:
      raise ValueError(f'{field}={value}: expected {want}')
  cfg = module.cfg
  if cfg.positions == 'learned' and longest + max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(f'a {longest}-token prompt and max_new_tokens={max_new_tokens}: expected at most '
                     f'{cfg.max_position_embeddings} tokens (the model\'s position table)')


def generate(module: nn.Module, params: Any, prompts: Sequence[Sequence[int]] | np.ndarray, *,
             max_new_tokens: int, eos_token_id: int | None, pad_token_id: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
  """The new tokens of every prompt: at most max_new_tokens, ending before the first EOS (EOS is not included).

  Args:
    module: a jtune.models.decoder.DecoderForCausalLM.
    params: its parameters (LoRA adapters included, if its config has them); sharded or not.
    prompts: token ids per prompt, of any lengths (a 2-D array: one prompt per row, all of it).
    eos_token_id: generation of a row stops at this token; None: never.
    pad_token_id: fills the left padding (never attended to).
    temperature: 0 for greedy decoding; otherwise sampling at this temperature, with top_k and top_p.
    seed: the sampling seed; the same seed gives the same tokens.
  """
  rows = check_rows(prompts)
  longest = max(len(r) for r in rows)
  _check(module, longest, max_new_tokens, temperature, top_k, top_p)
  if max_new_tokens == 0:
    return [[] for _ in rows]
  ids, positions, segments, lengths = _left_pad(rows, pad_token_id)
  eos = -1 if eos_token_id is None else int(eos_token_id)
  tokens = _generate(params, ids, positions, segments, lengths, jax.random.PRNGKey(seed),
                     np.float32(temperature or 1.0), np.int32(top_k), np.float32(top_p), np.int32(eos),
                     np.int32(pad_token_id), module=module, max_new_tokens=max_new_tokens,
                     greedy=temperature == 0)
  out = []
  for row in np.asarray(jax.device_get(tokens)).tolist():
    out.append(row[:row.index(eos)] if eos in row else row)
  return out
