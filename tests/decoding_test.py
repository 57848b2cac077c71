"""KV-cache generation: greedy equals re-running the whole model and transformers' generate; batches of
different prompt lengths equal one prompt at a time; sampling is reproducible and stays in the top-k set."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import common
from jtune import decoding
from jtune.hf import gpt2 as hf_gpt2
from jtune.hf import llama as hf_llama
from jtune.models import decoder

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

PROMPTS = [[5, 17, 33, 8, 9, 61, 4], [7, 3, 45], [6, 29, 14, 80, 11]]
NEW = 8
EOS, PAD = 2, 0


def _configs():
  return {
      'llama': (transformers.LlamaConfig(
          vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD),
          hf_llama),
      'gpt2': (transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                       bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD), hf_gpt2),
  }


@pytest.fixture(scope='module', params=['llama', 'gpt2'])
def lm(request):
  """(torch model, jtune module, params) with the same random weights."""
  config, hf_module = _configs()[request.param]
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation='eager').eval()
  with torch.no_grad():  # spread the logits: greedy choices are then clear-cut
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  cfg = hf_module.model_config_from_hf(config, head='causal_lm', num_labels=0, hidden_dropout=0.0,
                                       attention_dropout=0.0, classifier_dropout=0.0, dtype=jnp.float32,
                                       param_dtype=jnp.float32)
  params = hf_module.hf_to_params({k: v.numpy() for k, v in model.state_dict().items()}, cfg)
  return model, decoder.build(cfg), jax.tree_util.tree_map(jnp.asarray, params)


@functools.partial(jax.jit, static_argnames='module')
def _forward(params, ids_BL, segments_BL, *, module):
  positions_BL = jnp.broadcast_to(jnp.arange(ids_BL.shape[1]), ids_BL.shape)
  return module.apply({'params': params}, ids_BL, positions_BL, segments_BL, deterministic=True)


def _logits(module, params, tokens):
  """Logits [len(tokens), V] of one sequence, right-padded to 32 (segment 0) so that it compiles once."""
  ids = np.full((1, 32), PAD, np.int32)
  ids[0, :len(tokens)] = tokens
  segments = (np.arange(32) < len(tokens)).astype(np.int32)[None]
  return np.asarray(_forward(params, ids, segments, module=module))[0, :len(tokens)]


def _greedy_without_cache(module, params, prompt, n, eos=None):
  """Runs the whole model on the whole sequence for every new token."""
  tokens = list(prompt)
  for _ in range(n):
    token = int(np.argmax(_logits(module, params, tokens)[-1]))
    if token == eos:
      break
    tokens.append(token)
  return tokens[len(prompt):]


def _generate(module, params, prompts, **kwargs):
  return decoding.generate(module, params, prompts, **{'max_new_tokens': NEW, 'eos_token_id': None,
                                                       'pad_token_id': PAD, **kwargs})


def test_greedy_with_cache_equals_rerunning_the_model_and_transformers(lm):
  model, module, params = lm
  batched = _generate(module, params, PROMPTS)
  assert [len(x) for x in batched] == [NEW] * 3
  for prompt, got in zip(PROMPTS, batched):
    assert got == _greedy_without_cache(module, params, prompt, NEW)
    assert _generate(module, params, [prompt]) == [got]  # alone: no padding at all
    with torch.no_grad():
      want = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    assert got == want[0, len(prompt):].tolist()
  assert len({tuple(x) for x in batched}) == 3


def test_generation_stops_at_eos_and_leaves_it_out(lm):
  model, module, params = lm
  free = _generate(module, params, PROMPTS)
  # the 4th token of the first answer becomes EOS (one that does not occur before it)
  step = next(i for i in range(3, NEW) if free[0][i] not in free[0][:i])
  eos = free[0][step]
  stopped = _generate(module, params, PROMPTS, eos_token_id=eos)
  assert stopped[0] == free[0][:step]
  for prompt, got, whole in zip(PROMPTS, stopped, free):
    assert got == (whole[:whole.index(eos)] if eos in whole else whole)
    assert got == _greedy_without_cache(module, params, prompt, NEW, eos)
  with torch.no_grad():
    want = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                          pad_token_id=PAD)
  assert want[0, len(PROMPTS[0]):].tolist() == free[0][:step] + [eos]  # transformers keeps the EOS


def test_sampling_is_reproducible_and_stays_in_the_top_k(lm):
  _, module, params = lm
  runs = {seed: _generate(module, params, PROMPTS, temperature=5.0, top_k=3, seed=seed) for seed in range(4)}
  assert _generate(module, params, PROMPTS, temperature=5.0, top_k=3, seed=2) == runs[2]
  assert len({str(r) for r in runs.values()}) > 1
  off_argmax = 0
  for out in runs.values():
    for prompt, new in zip(PROMPTS, out):
      logits = _logits(module, params, prompt + new)
      for i, token in enumerate(new):
        top3 = np.argsort(logits[len(prompt) + i - 1])[-3:]
        assert token in top3
        off_argmax += token != top3[-1]
  assert off_argmax > 0  # it did sample


def test_sampling_limits_that_leave_one_token_are_greedy(lm):
  _, module, params = lm
  greedy = _generate(module, params, PROMPTS)
  assert _generate(module, params, PROMPTS, temperature=3.0, top_k=1, seed=5) == greedy
  assert _generate(module, params, PROMPTS, temperature=3.0, top_p=1e-6, seed=5) == greedy


def test_compiled_once_per_batch_bucket_and_length(lm):
  _, module, params = lm
  _generate(module, params, PROMPTS, temperature=1.0, seed=0)
  size = decoding._generate._cache_size()
  _generate(module, params, [[9] * 12, [4, 5], [60]], temperature=0.7, top_k=5, top_p=0.9, seed=3)
  assert decoding._generate._cache_size() == size  # same batch, bucket (16) and length: no new compile
  _generate(module, params, [[9] * 17, [4, 5], [60]], temperature=0.7, max_new_tokens=4)
  assert decoding._generate._cache_size() == size + 1  # bucket 32


def test_generation_under_a_mesh_and_rules(lm):
  _, module, params = lm
  want = _generate(module, params, PROMPTS)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ('data', 'fsdp', 'tensor'))
  with jax.set_mesh(mesh), nn.logical_axis_rules(common.RULES):
    assert _generate(module, params, PROMPTS) == want


def test_bad_arguments_are_rejected(lm):
  _, module, params = lm
  for kwargs, message in [({'top_p': 0.0}, r'^top_p=0.0: expected in \(0, 1\]$'),
                          ({'temperature': -1.0}, r'^temperature=-1.0: expected >= 0'),
                          ({'top_k': -2}, r'^top_k=-2: expected >= 0'),
                          ({'max_new_tokens': -1}, r'^max_new_tokens=-1: expected a count >= 0$')]:
    with pytest.raises(ValueError, match=message):
      _generate(module, params, PROMPTS, **kwargs)
  with pytest.raises(ValueError, match=r'^prompt 1 has no tokens: expected at least one$'):
    _generate(module, params, [[3], []])
  with pytest.raises(ValueError, match=r'^prompts=\[\]: expected at least one prompt$'):
    _generate(module, params, [])
  assert _generate(module, params, np.asarray(PROMPTS[0])[None], max_new_tokens=0) == [[]]
  if module.cfg.positions == 'learned':
    with pytest.raises(ValueError, match=r'^a 30-token prompt and max_new_tokens=8: expected at most 32 tokens'):
      _generate(module, params, [[3] * 30])
