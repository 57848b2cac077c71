"""Decoding for encoder-decoder models (T5): greedy, or beam search, with a KV cache.

The source is encoded once; the decoder's cross-attention keys and values are projected once (`start_cache`),
and each new token is one `decode` call against the self-attention cache. Both searches run inside one jitted
`lax.while_loop`, so the host waits once per call, not once per token. The function is compiled once per
(batch size, source bucket, max_new_tokens, num_beams); the token ids and the length penalty are traced values.

Beam search follows Hugging Face's `generate(num_beams=k)` step for step (its default early_stopping=False):
every step keeps the 2k best continuations of the k running beams; those ending in EOS (and, at the last step,
all of them) among the first k become finished hypotheses scored log-prob / (generated length **
length_penalty), the k best of which are kept; the k best not finished run on. A batch row stops once k
hypotheses are finished and the best running beam, scored at its current length, cannot beat the worst of them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtune import decoding

NEG = -1.0e9  # Hugging Face's "impossible" score


def _encode(apply, ids_BS, mask_BS, num_slots: int, repeat: int):
  """The encoder's output and a fresh decoder cache of `num_slots`, each source row repeated `repeat` times."""
  encoded_BSD = apply(ids_BS, mask_BS, method='encode')
  if repeat > 1:
    encoded_BSD, mask_BS = jnp.repeat(encoded_BSD, repeat, axis=0), jnp.repeat(mask_BS, repeat, axis=0)
  return mask_BS, apply(encoded_BSD, num_slots, method='start_cache')


@functools.partial(jax.jit, static_argnames=('module', 'max_new_tokens'))
def _greedy(params: Any, ids_BS: jax.Array, mask_BS: jax.Array, start: jax.Array, eos: jax.Array,
            pad: jax.Array, *, module: nn.Module, max_new_tokens: int) -> jax.Array:
  """New tokens [B, max_new_tokens]: the most likely token at every step; pad after a row's EOS."""
  apply = functools.partial(module.apply, {'params': params})
  B = ids_BS.shape[0]
  mask_BS, cache = _encode(apply, ids_BS, mask_BS, max_new_tokens, 1)

  def cond(state):
    step, _, _, done_B, _ = state
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def body(state):
    step, token_B, tokens_BN, done_B, cache = state
    logits_B1V, cache = apply(token_B[:, None], mask_BS, cache, step, method='decode')
    next_B = jnp.where(done_B, pad, jnp.argmax(logits_B1V[:, 0], axis=-1).astype(jnp.int32))
    tokens_BN = jax.lax.dynamic_update_slice(tokens_BN, next_B[:, None], (0, step))
    return step + 1, next_B, tokens_BN, done_B | (next_B == eos), cache

  tokens_BN = jnp.full((B, max_new_tokens), pad, jnp.int32)
  state = (jnp.int32(0), jnp.full((B,), start, jnp.int32), tokens_BN, jnp.zeros((B,), bool), cache)
  tokens_BN = jax.lax.while_loop(cond, body, state)[2]
  return nn.with_logical_constraint(tokens_BN, (None, None))  # replicated: every process can read it


def _gather(x_BK, index_BJ):
  """x[b, index[b, j]] for [B, K, ...] x: the rows of each batch entry's beams that `index` picks."""
  return jax.vmap(lambda x, i: x[i])(x_BK, index_BJ)


@functools.partial(jax.jit, static_argnames=('module', 'max_new_tokens', 'num_beams'))
def _beam_search(params: Any, ids_BS: jax.Array, mask_BS: jax.Array, start: jax.Array, eos: jax.Array,
                 pad: jax.Array, length_penalty: jax.Array, *, module: nn.Module, max_new_tokens: int,
                 num_beams: int) -> jax.Array:
  """The best finished hypothesis [B, max_new_tokens] of a beam search of `num_beams` beams (see the module
  docstring); pad after its EOS."""
  apply = functools.partial(module.apply, {'params': params})
  B, K, N = ids_BS.shape[0], num_beams, max_new_tokens
  mask_RS, cache = _encode(apply, ids_BS, mask_BS, N, K)  # R = B * K decoder rows, beam k of row b at b * K + k
  top_K2 = jnp.arange(2 * K) < K  # only the K best continuations may finish

  def step_fn(state):
    i, last_BK, run_BKN, run_score_BK, fin_BKN, fin_score_BK, fin_done_BK, open_B1, cache, _ = state
    logits_R1V, cache = apply(last_BK.reshape(B * K, 1), mask_RS, cache, i, method='decode')
    logp_BKV = jax.nn.log_softmax(logits_R1V[:, 0].astype(jnp.float32)).reshape(B, K, -1)
    V = logp_BKV.shape[-1]
    total_BX = (logp_BKV + run_score_BK[:, :, None]).reshape(B, K * V)
    score_BJ, index_BJ = jax.lax.top_k(total_BX, 2 * K)  # J = 2K candidates
    beam_BJ, token_BJ = index_BJ // V, (index_BJ % V).astype(jnp.int32)
    cand_BJN = _gather(run_BKN, beam_BJ).at[:, :, i].set(token_BJ)
    ends_BJ = (token_BJ == eos) | (i == N - 1)
    # the K best candidates that go on
    going_BJ = score_BJ + ends_BJ * NEG
    keep_BK = jax.lax.top_k(going_BJ, K)[1]
    run_BKN, run_score_BK = _gather(cand_BJN, keep_BK), _gather(going_BJ, keep_BK)
    rows_R = (jnp.arange(B)[:, None] * K + _gather(beam_BJ, keep_BK)).reshape(-1)
    cache = jax.tree_util.tree_map(lambda x: x[rows_R], cache)
    # the K best finished hypotheses so far
    just_BJ = ends_BJ & top_K2[None]
    normed_BJ = score_BJ / (i + 1.0) ** length_penalty + (~open_B1) * NEG + (~just_BJ) * NEG
    merged_score = jnp.concatenate([fin_score_BK, normed_BJ], axis=1)
    best_BK = jax.lax.top_k(merged_score, K)[1]
    fin_BKN = _gather(jnp.concatenate([fin_BKN, cand_BJN], axis=1), best_BK)
    fin_score_BK = _gather(merged_score, best_BK)
    fin_done_BK = _gather(jnp.concatenate([fin_done_BK, just_BJ], axis=1), best_BK)
    # can a running beam still beat the worst finished one? (scored at its current length)
    best_running_B1 = run_score_BK[:, :1] / (i + 1.0) ** length_penalty
    worst_BK = jnp.where(fin_done_BK, jnp.min(fin_score_BK, axis=1, keepdims=True), NEG)
    open_B1 &= jnp.any(best_running_B1 > worst_BK, axis=1, keepdims=True)
    going = jnp.any(open_B1) & ~jnp.all(ends_BJ)
    return (i + 1, run_BKN[:, :, i], run_BKN, run_score_BK, fin_BKN, fin_score_BK, fin_done_BK, open_B1, cache,
            going)

  empty_BKN = jnp.full((B, K, N), pad, jnp.int32)
  run_score_BK = jnp.where(jnp.arange(K) == 0, 0.0, NEG)[None].repeat(B, axis=0)
  state = (jnp.int32(0), jnp.full((B, K), start, jnp.int32), empty_BKN, run_score_BK, empty_BKN,
           jnp.full((B, K), NEG), jnp.zeros((B, K), bool), jnp.ones((B, 1), bool), cache, jnp.bool_(True))
  state = jax.lax.while_loop(lambda s: (s[0] < N) & s[-1], step_fn, state)
  return nn.with_logical_constraint(state[4][:, 0], (None, None))  # replicated: every process can read it


def generate(module: nn.Module, params: Any, sources: Sequence[Sequence[int]] | np.ndarray, *,
             max_new_tokens: int, eos_token_id: int | None, pad_token_id: int, num_beams: int = 1,
             length_penalty: float = 1.0, decoder_start_token_id: int | None = None) -> list[list[int]]:
  """The output tokens for every source: at most max_new_tokens, ending before the first EOS (not included).

  Args:
    module: a jtune.models.t5.T5ForConditionalGeneration.
    params: its parameters (LoRA adapters included, if its config has them).
    sources: token ids per source (EOS included, as the task's data has it), of any lengths.
    eos_token_id: a hypothesis ends at this token; None: never.
    pad_token_id: pads the sources (masked) and the outputs.
    num_beams: 1 for greedy decoding, more for beam search.
    length_penalty: beam search scores a finished hypothesis log-prob / length ** length_penalty.
    decoder_start_token_id: the decoder's first input; default the model config's.
  """
  rows = decoding.check_rows(sources, 'sources')
  for field, value, ok, want in (('max_new_tokens', max_new_tokens, max_new_tokens >= 0, 'a count >= 0'),
                                 ('num_beams', num_beams, num_beams >= 1, '1 (greedy) or more beams'),
                                 ('length_penalty', length_penalty, length_penalty >= 0, '>= 0')):
    if not ok:
      raise ValueError(f'{field}={value}: expected {want}')
  if max_new_tokens == 0:
    return [[] for _ in rows]
  lengths = np.array([len(r) for r in rows])
  width = decoding.bucket(int(lengths.max()))
  ids = np.full((len(rows), width), pad_token_id, np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
  mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
  start = module.cfg.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
  eos = -1 if eos_token_id is None else int(eos_token_id)
  args = (params, ids, mask, np.int32(start), np.int32(eos), np.int32(pad_token_id))
  if num_beams == 1:
    tokens = _greedy(*args, module=module, max_new_tokens=max_new_tokens)
  else:
    tokens = _beam_search(*args, np.float32(length_penalty), module=module, max_new_tokens=max_new_tokens,
                          num_beams=num_beams)
  out = []
  for row in np.asarray(jax.device_get(tokens)).tolist():
    out.append(row[:row.index(eos)] if eos in row else row)
  return out
