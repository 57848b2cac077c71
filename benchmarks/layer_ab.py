"""Two implementations of one part of the train and eval steps, alternated: dropout masks, the GELU, XLA:CPU's
scheduler, the classifier's last layer at every position or at the first only, the attention's layout, or the
causal-LM loss.

  python -m benchmarks.layer_ab --swap=dropout --model=minilm --batch=16 --seq=128 --rounds=6
  python -m benchmarks.layer_ab --swap=gelu --model=bert-base --rounds=4
  python -m benchmarks.layer_ab --swap=scheduler --model=bert-base --rounds=8
  python -m benchmarks.layer_ab --swap=scheduler --model=llama-135m --batch=8 --seq=256 --remat=full --rounds=4
  python -m benchmarks.layer_ab --swap=first_only --model=minilm --rounds=10
  python -m benchmarks.layer_ab --swap=attention --model=bert-base --rounds=6
  python -m benchmarks.layer_ab --swap=cross_entropy --model=gpt2 --batch=8 --rounds=5

`--swap=dropout`: flax's nn.Dropout against jtune's 8-bit layers.Dropout; `--swap=gelu`: jax.nn.gelu's exact form
(erfc) against jtune's layers.gelu (erf); `--swap=scheduler`: XLA:CPU's default scheduler against its
memory-optimised one (`xla_cpu_scheduler_type`, the compiler option that step.compile_steps gives the steps'
jax.jit on CPUs with model.remat='full' and unrolled layers; here in place of step.compiler_options, with or
without `--remat`), with each step's temporary memory; `--swap=first_only` (encoders): the sequence classifier's
last layer at every position, as Hugging Face computes it, against the first position only (bert.BertModel's
first_only), the same logits;
`--swap=attention`: the attention's two products on the [batch, length, heads, kv] layout, as jtune had them until
2026-12-05, against bert.attend's and decoder.attend_grouped's heads-first copies; `--swap=cross_entropy`
(decoders): optax's next-token cross-entropy against tasks.common.cross_entropy. The train and eval steps are
built twice in one process, the part swapped in one of them, then the two take turns, `--rounds` steps of each, so
the machine's drift falls on both alike. Prints the median train and eval step of each, and the time of the layer
alone on one activation ([batch, heads, seq, seq] attention probabilities for dropout, [batch * seq, intermediate]
for the GELU): forward, and forward with backward.
"""

from __future__ import annotations

import functools
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from benchmarks import workloads
from jtune import host_memory
from jtune import step as step_lib
from jtune.models import bert, decoder, layers
from jtune.tasks import common

_SWAP = flags.DEFINE_enum('swap', 'dropout',
                          ['dropout', 'gelu', 'scheduler', 'first_only', 'attention', 'cross_entropy'],
                          'What to swap.')
_MODEL = flags.DEFINE_enum('model', 'minilm', list(workloads.SHAPES), 'Model shape.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch size.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Sequence length.')
_ROUNDS = flags.DEFINE_integer('rounds', 6, 'Timed steps of each variant.')
_REMAT = flags.DEFINE_enum('remat', 'none', ['none', 'full', 'dots'], 'model.remat of both variants.')


def _optax_cross_entropy(logits, targets, label_smoothing=0.0):
  """optax's integer-label cross-entropy, as causal_lm.loss_sums computed it until 2026-12-05 (no smoothing)."""
  assert not label_smoothing, 'the benchmark steps train without label smoothing'
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def _attend_lengths_first(q_BQHK, k_BLHK, v_BLHK, bias_B11L, dropout):
  """bert.attend as it was before 2026-12-05: the products on the [batch, length, heads, kv] layout."""
  scores_BHQL = jnp.einsum('bqhk,bshk->bhqs', q_BQHK, k_BLHK, preferred_element_type=jnp.float32)
  probs_BHQL = jax.nn.softmax(scores_BHQL + bias_B11L, axis=-1).astype(q_BQHK.dtype)
  return jnp.einsum('bhqs,bshk->bqhk', dropout(probs_BHQL), v_BLHK)


def _attend_grouped_lengths_first(q_BLHK, k_BSGK, v_BSGK, mask_B11LS, dropout):
  """decoder.attend_grouped as it was before 2026-12-05: the products on the [batch, length, heads, kv] layout."""
  (B, L, H, K), G = q_BLHK.shape, k_BSGK.shape[2]
  q_BLGRK = q_BLHK.reshape(B, L, G, H // G, K)
  scores_BGRLS = jnp.einsum('blgrk,bsgk->bgrls', q_BLGRK, k_BSGK, preferred_element_type=jnp.float32)
  scores_BGRLS = jnp.where(mask_B11LS, scores_BGRLS / K ** 0.5, jnp.finfo(jnp.float32).min)
  probs_BGRLS = jax.nn.softmax(scores_BGRLS, axis=-1).astype(v_BSGK.dtype)
  return jnp.einsum('bgrls,bsgk->blgrk', dropout(probs_BGRLS), v_BSGK).reshape(B, L, H, K)


# swap -> {variant: (attribute of jtune.models.bert and .decoder, or of jtune.step for `scheduler`, its value)}
VARIANTS = {
    'dropout': {'flax nn.Dropout': ('Dropout', nn.Dropout), 'jtune layers.Dropout': ('Dropout', layers.Dropout)},
    'gelu': {'jax.nn.gelu (erfc)': ('gelu', functools.partial(nn.gelu, approximate=False)),
             'jtune layers.gelu (erf)': ('gelu', layers.gelu)},
    'first_only': {'every position in the last layer': ('HEAD_MODULES', {
                       **bert.HEAD_MODULES, 'sequence': functools.partial(bert.BertForSequenceClassification,
                                                                          first_only=False)}),
                   'the first position only': ('HEAD_MODULES', bert.HEAD_MODULES)},
    'attention': {'[B, L, H, K] products': (('attend', 'attend_grouped'),
                                            (_attend_lengths_first, _attend_grouped_lengths_first)),
                  'heads first (jtune)': (('attend', 'attend_grouped'), (bert.attend, decoder.attend_grouped))},
    'cross_entropy': {'optax': ('cross_entropy', _optax_cross_entropy),
                      'jtune common.cross_entropy': ('cross_entropy', common.cross_entropy)},
    'scheduler': {'XLA default scheduler': ('compiler_options', lambda *_: None),
                  'memory-optimised scheduler': ('compiler_options', lambda *_: dict(step_lib.REMAT_CPU_OPTIONS))},
}


def layer_fn(swap: str, impl):
  """The layer alone as a function of one activation (dropout at rate 0.1 with a fixed key)."""
  if swap == 'gelu':
    return impl
  return lambda v: impl(0.1).apply({}, v, deterministic=False, rngs={'dropout': jax.random.key(0)})


def layer_ms(fn, shape: tuple[int, ...], repeats: int = 7) -> tuple[float, float]:
  """Median milliseconds of `fn` on an f32 array of `shape`: forward, and forward + backward."""
  x = jax.random.normal(jax.random.key(1), shape)
  forward = jax.jit(fn)
  backward = jax.jit(lambda v: jax.grad(lambda u: jnp.sum(fn(u)))(v))
  out = []
  for run in (forward, backward):
    once = functools.partial(lambda r: jax.block_until_ready(r(x)), run)
    once()
    out.append(1e3 * statistics.median(workloads.step_times(once, repeats)))
  return out[0], out[1]


def main(argv):
  del argv
  shape, swap = workloads.SHAPES[_MODEL.value], _SWAP.value
  host_memory.keep_freed_memory()  # as jtune.train does, before the first jax call starts the backend
  activation = ((_BATCH.value, shape.heads, _SEQ.value, _SEQ.value) if swap == 'dropout'
                else (_BATCH.value * _SEQ.value, shape.mlp))
  steps = {}
  modules = {'scheduler': (step_lib,), 'first_only': (bert,), 'cross_entropy': (common,)}.get(swap, (bert, decoder))
  for name, (attribute, impl) in VARIANTS[swap].items():
    if swap in ('dropout', 'gelu'):
      fwd, bwd = layer_ms(layer_fn(swap, impl), activation)
      print(f'{name}: one {list(activation)} activation {fwd:.1f} ms forward, {bwd:.1f} ms with backward',
            flush=True)
    swaps = (list(zip(modules, attribute, impl)) if swap == 'attention'  # the encoders' and the decoders' own
             else [(module, attribute, impl) for module in modules])
    originals = [(module, attr, getattr(module, attr)) for module, attr, _ in swaps]
    for module, attr, value in swaps:
      setattr(module, attr, value)
    built = workloads.jtune_steps(shape, _BATCH.value, _SEQ.value, remat=_REMAT.value)
    for module, attr, value in originals:
      setattr(module, attr, value)
    print(f'{name}: compile {built.compile_s:.1f} s, temporaries {built.memory["temp_bytes"] / 2**20:.0f} MiB',
          flush=True)
    train, evaluate = workloads.jtune_timers(built)
    train()
    evaluate()
    steps[name] = (train, evaluate)
  workloads.alternate(steps, _ROUNDS.value)


if __name__ == '__main__':
  app.run(main)
