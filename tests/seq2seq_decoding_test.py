"""Greedy and beam-search decoding of a T5 against transformers' `generate` on the same random weights, token for
token (with a frequent token as EOS too, so the length penalty decides), and what beam search promises on its
own (it never scores below greedy, one compile per shape)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtune import seq2seq_decoding
from jtune.hf import io as hf_io
from jtune.hf import t5 as hf_t5
from jtune.models import t5

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

SOURCES = [[5, 17, 33, 8, 9, 61, 4, 12, 1], [7, 3, 45, 50, 1], [6, 29, 1]]
EOS, PAD = 1, 0


@pytest.fixture(scope='module', params=['relu_tied', 'gated_untied'])
def pair(request, tmp_path_factory):
  """(torch model, jtune module, params) of one random T5 whose outputs vary enough for beams to differ."""
  relu = request.param == 'relu_tied'
  config = transformers.T5Config(
      vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
      relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
      feed_forward_proj='relu' if relu else 'gated-gelu', tie_word_embeddings=relu, pad_token_id=PAD,
      eos_token_id=EOS, decoder_start_token_id=PAD)
  torch.manual_seed(1)
  model = transformers.T5ForConditionalGeneration(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.3 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(folder)
  cfg = hf_t5.model_config_from_hf(config, head='seq2seq', num_labels=0, hidden_dropout=0.0, attention_dropout=0.0,
                                   classifier_dropout=0.0, dtype=jnp.float32, param_dtype=jnp.float32)
  params = jax.tree_util.tree_map(jnp.asarray, hf_t5.hf_to_params(hf_io.read_safetensors(folder), cfg))
  return model, t5.build(cfg), params


def _theirs(model, max_new_tokens, **kwargs):
  """transformers' outputs per source (unpadded: one call each), without the start token and from EOS on."""
  out = []
  for source in SOURCES:
    with torch.no_grad():
      tokens = model.generate(torch.tensor([source]), max_new_tokens=max_new_tokens, do_sample=False,
                              **kwargs)[0, 1:].tolist()
    out.append(tokens[:tokens.index(EOS)] if EOS in tokens else tokens)
  return out


def _ours(module, params, max_new_tokens, **kwargs):
  return seq2seq_decoding.generate(module, params, SOURCES, max_new_tokens=max_new_tokens, eos_token_id=EOS,
                                   pad_token_id=PAD, **kwargs)


def test_greedy_matches_transformers(pair):
  model, module, params = pair
  assert _ours(module, params, 12) == _theirs(model, 12, num_beams=1)


@pytest.mark.parametrize('num_beams,length_penalty', [(3, 1.0), (4, 0.6), (2, 2.0)])
def test_beam_search_matches_transformers(pair, num_beams, length_penalty):
  model, module, params = pair
  ours = _ours(module, params, 10, num_beams=num_beams, length_penalty=length_penalty)
  assert ours == _theirs(model, 10, num_beams=num_beams, length_penalty=length_penalty, early_stopping=False)


def _log_prob(model, source, tokens):
  """Sum of log-probabilities transformers gives `tokens` (+ EOS when it stopped before max_new_tokens)."""
  labels = torch.tensor([tokens])
  with torch.no_grad():
    logits = model(input_ids=torch.tensor([source]), labels=labels).logits[0]
  return float(torch.log_softmax(logits, -1)[torch.arange(len(tokens)), labels[0]].sum())


def test_beam_search_scores_at_least_greedy(pair):
  """With length_penalty 0 a beam search of k beams returns a hypothesis at least as likely as greedy's."""
  model, module, params = pair
  greedy = _ours(module, params, 6)
  beams = _ours(module, params, 6, num_beams=4, length_penalty=0.0)
  if module.cfg.feed_forward == 'relu':
    assert beams != greedy  # these weights make the searches differ (the gated model's agree)
  for source, g, b in zip(SOURCES, greedy, beams):
    g, b = g + ([EOS] if len(g) < 6 else []), b + ([EOS] if len(b) < 6 else [])
    assert _log_prob(model, source, b) >= _log_prob(model, source, g) - 1e-5


def test_compiled_once_per_shape(pair):
  _, module, params = pair
  seq2seq_decoding._beam_search.clear_cache()  # pylint: disable=protected-access
  for _ in range(2):
    _ours(module, params, 5, num_beams=3, length_penalty=0.7)
  _ours(module, params, 5, num_beams=3, length_penalty=1.3)  # a traced value: no new compile
  assert seq2seq_decoding._beam_search._cache_size() == 1  # pylint: disable=protected-access


def test_bad_arguments(pair):
  _, module, params = pair
  with pytest.raises(ValueError, match=r'^num_beams=0: expected 1 \(greedy\) or more beams$'):
    _ours(module, params, 5, num_beams=0)
  with pytest.raises(ValueError, match=r'^source 1 has no tokens: expected at least one$'):
    seq2seq_decoding.generate(module, params, [[3], []], max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD)
  assert seq2seq_decoding.generate(module, params, [[3, 1]], max_new_tokens=0, eos_token_id=EOS,
                                   pad_token_id=PAD) == [[]]
  assert np.all([len(o) <= 4 for o in _ours(module, params, 4, num_beams=2)])


def test_length_penalty_ranks_hypotheses_that_end_early_as_transformers_does(pair):
  """With a frequent token as EOS, hypotheses end at many lengths, so the length penalty decides the winner."""
  model, module, params = pair
  free = seq2seq_decoding.generate(module, params, SOURCES, max_new_tokens=10, eos_token_id=None, pad_token_id=PAD,
                                   num_beams=3)
  eos = int(np.bincount([t for row in free for t in row[1:]]).argmax())
  outputs = {}
  for length_penalty in (0.0, 1.0, 3.0):
    ours = seq2seq_decoding.generate(module, params, SOURCES, max_new_tokens=10, eos_token_id=eos,
                                     pad_token_id=PAD, num_beams=3, length_penalty=length_penalty)
    theirs = []
    for source in SOURCES:
      with torch.no_grad():
        tokens = model.generate(torch.tensor([source]), max_new_tokens=10, do_sample=False, num_beams=3,
                                length_penalty=length_penalty, early_stopping=False, eos_token_id=eos)[0, 1:].tolist()
      theirs.append(tokens[:tokens.index(eos)] if eos in tokens else tokens)
    assert ours == theirs, length_penalty
    outputs[length_penalty] = ours
  assert outputs[0.0] != outputs[3.0]  # the penalty changed the winners: the test can tell scorings apart
