"""T5 against transformers PyTorch: logits and encoder states on a padded batch, relative position buckets, the
export round trip through AutoModelForSeq2SeqLM, PEFT adapters, and the loading and config errors."""

import dataclasses
import functools
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jtune.hf import io as hf_io
from jtune.hf import t5 as hf_t5
from jtune.models import layers, t5

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')

SMALL = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
             relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0)
CONFIGS = {'v1_0': dict(feed_forward_proj='relu', tie_word_embeddings=True),
           'v1_1': dict(feed_forward_proj='gated-gelu', tie_word_embeddings=False)}
# 20 encoder tokens and 18 decoder tokens: beyond max_distance=16, so the logarithmic buckets are used too.
IDS = np.array([[5, 17, 33, 8, 9, 61, 4, 12, 7, 3, 45, 90, 11, 6, 29, 14, 52, 77, 38, 1],
                [7, 3, 45, 90, 11, 64, 22, 8, 19, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                [6, 29, 14, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], np.int32)
MASK = (IDS > 0).astype(np.int32)
DECODER_IDS = np.array([[0, 4, 8, 15, 16, 23, 42, 2, 9, 81, 55, 3, 70, 5, 13, 27, 88, 1],
                        [0, 9, 9, 31, 40, 12, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                        [0, 50, 3, 33, 2, 7, 66, 91, 4, 18, 2, 1, 0, 0, 0, 0, 0, 0]], np.int32)
TIED_COPIES = {'encoder.embed_tokens.weight', 'decoder.embed_tokens.weight'}


def _kwargs(head='seq2seq'):
  return dict(head=head, num_labels=0, hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0,
              dtype=jnp.float32, param_dtype=jnp.float32)


_FAMILIES = {}


def _family(name, tmp_path_factory):
  """(name, folder, torch model, T5Config, params): a random model saved by transformers, made once per layout."""
  if name not in _FAMILIES:
    _FAMILIES[name] = _make_family(name, tmp_path_factory)
  return _FAMILIES[name]


@pytest.fixture(scope='module', params=list(CONFIGS))
def family(request, tmp_path_factory):
  return _family(request.param, tmp_path_factory)


@pytest.fixture(scope='module')
def v1_1(tmp_path_factory):
  """The unscaled layout with its own head (Flan-T5, T5 v1.1)."""
  return _family('v1_1', tmp_path_factory)


def _make_family(name, tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.T5Config(**SMALL, **CONFIGS[name])
  model = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation='eager').eval()
  if not config.scale_decoder_outputs:  # Flan-T5 checkpoints carry their own head; transformers 5 ties it otherwise
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
  with torch.no_grad():  # norms start at 1: make every tensor count
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp(name)
  model.save_pretrained(folder)
  cfg = hf_t5.model_config_from_hf(hf_io.load_config(folder, {}), **_kwargs())
  params = hf_t5.hf_to_params(hf_io.read_safetensors(folder), cfg)
  return name, folder, model, cfg, params


def _torch(model, ids=IDS, mask=MASK, decoder_ids=DECODER_IDS):
  """(logits, encoder output) of a transformers model."""
  as_torch = lambda x: torch.from_numpy(x.astype(np.int64))  # noqa: E731
  with torch.no_grad():
    out = model(input_ids=as_torch(ids), attention_mask=as_torch(mask), decoder_input_ids=as_torch(decoder_ids))
  return out.logits.numpy(), out.encoder_last_hidden_state.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _ours(cfg, params, ids=IDS, mask=MASK, decoder_ids=DECODER_IDS):
  return t5.build(cfg).apply({'params': params}, ids, mask, decoder_ids, deterministic=True)


def test_logits_and_encoder_states_match_transformers(family):
  name, _, model, cfg, params = family
  want_logits, want_encoded = _torch(model)
  encoded = t5.build(cfg).apply({'params': params}, IDS, MASK, method='encode')
  assert np.max(np.abs(np.asarray(encoded) - want_encoded)[MASK > 0]) <= 1e-4, name
  logits = np.asarray(_ours(cfg, params))
  assert logits.dtype == np.float32 and logits.shape == (3, 18, 100)
  assert np.max(np.abs(logits - want_logits)) <= 1e-4, name
  assert np.std(want_logits) > 0.1  # not a degenerate comparison
  v1_0 = name == 'v1_0'
  assert (cfg.tie_embeddings, 'lm_head' in params, cfg.feed_forward) == (v1_0, not v1_0, CONFIGS[name][
      'feed_forward_proj'])
  assert (cfg.num_layers, cfg.num_decoder_layers, cfg.head_dim, cfg.decoder_start_token_id) == (2, 3, 8, 0)


@pytest.mark.parametrize('num_buckets,max_distance', [(8, 16), (32, 128)])
@pytest.mark.parametrize('bidirectional', [True, False])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance, bidirectional):
  relative = np.arange(-300, 301)
  want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
      torch.from_numpy(relative), bidirectional, num_buckets, max_distance).numpy()
  got = t5.relative_position_bucket(jnp.asarray(relative), bidirectional, num_buckets, max_distance)
  np.testing.assert_array_equal(got, want)


def _tokenizer():
  vocab = {'<pad>': 0, '</s>': 1, '<unk>': 2, **{f'w{i}': i for i in range(3, 100)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='</s>', pad_token='<pad>',
                                              unk_token='<unk>')


def test_export_loads_in_transformers_without_missing_keys(family, tmp_path):
  name, folder, model, cfg, params = family
  state = hf_t5.params_to_hf(params, cfg)
  config = hf_t5.hf_config_for_export(hf_io.load_config(folder, {}), cfg, {}, None)
  out = hf_io.export(tmp_path / 'out', state, config, _tokenizer())
  loaded, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(
      out, output_loading_info=True, attn_implementation='eager')
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
  assert type(loaded) is transformers.T5ForConditionalGeneration
  written = json.loads((out / 'config.json').read_text())
  assert written['architectures'] == ['T5ForConditionalGeneration']
  assert written['tie_word_embeddings'] == cfg.tie_embeddings == loaded.config.scale_decoder_outputs
  assert (loaded.lm_head.weight is loaded.shared.weight) == cfg.tie_embeddings, name
  assert np.max(np.abs(_torch(loaded.eval())[0] - np.asarray(_ours(cfg, params)))) <= 1e-4
  back = hf_t5.hf_to_params(hf_io.read_safetensors(out), cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  assert set(state) == set(model.state_dict()) - TIED_COPIES - ({'lm_head.weight'} if cfg.tie_embeddings else set())
  assert all(v.dtype == np.float32 and v.flags['C_CONTIGUOUS'] for v in state.values())


def test_unscaled_checkpoint_without_a_head_uses_the_embedding(v1_1, tmp_path):
  """A T5 v1.1 model made by transformers 5 has no lm_head.weight: transformers ties the head, unscaled."""
  name, folder, _, cfg, _ = v1_1
  tensors = {k: v for k, v in hf_io.read_safetensors(folder).items() if k != 'lm_head.weight'}
  safetensors.numpy.save_file(tensors, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
  (tmp_path / 'config.json').write_text((folder / 'config.json').read_text())
  tied = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path, attn_implementation='eager').eval()
  assert tied.lm_head.weight is tied.shared.weight and not tied.config.scale_decoder_outputs
  params = hf_t5.hf_to_params(tensors, cfg)
  np.testing.assert_array_equal(params['lm_head']['kernel'], tensors['shared.weight'].T)
  assert np.max(np.abs(np.asarray(_ours(cfg, params)) - _torch(tied)[0])) <= 1e-4, name


def _with_lora(cfg, params, targets, seed=1):
  """Params with rank-4 adapters on `targets`, lora_a and lora_b random (the model differs from the base)."""
  lora = dataclasses.replace(cfg, lora_rank=4, lora_alpha=8.0, lora_targets=targets)
  shapes = nn.unbox(jax.eval_shape(lambda: t5.build(lora).init(jax.random.PRNGKey(0), IDS, MASK, DECODER_IDS,
                                                               deterministic=True)['params']))
  rng = np.random.default_rng(seed)

  def merge(base, new):
    if not isinstance(new, dict):
      return base
    return {k: merge(base[k], v) if k in base else rng.normal(0, 0.1, v.shape).astype(np.float32)
            for k, v in new.items()}
  return lora, merge(params, shapes)


def test_peft_adapter_reproduces_the_lora_model(v1_1, tmp_path):
  _, folder, model, cfg, params = v1_1
  peft = pytest.importorskip('peft')
  lora, lora_params = _with_lora(cfg, params, ('attention/query$', 'attention/value$', 'mlp/wo$'))
  state, modules, to_save = hf_t5.peft_adapter(lora_params, lora)
  assert to_save == [] and len(modules) == len(state) // 2 == 2 * 2 + 3 * 4 + 5
  assert 'decoder.block.2.layer.1.EncDecAttention.v' in modules
  assert 'encoder.block.1.layer.1.DenseReluDense.wo' in modules
  (tmp_path / 'adapter_config.json').write_text(json.dumps({
      'peft_type': 'LORA', 'task_type': 'SEQ_2_SEQ_LM', 'r': 4, 'lora_alpha': 8.0, 'lora_dropout': 0.0,
      'bias': 'none', 'fan_in_fan_out': False, 'inference_mode': True,
      'target_modules': '^(' + '|'.join(modules) + ')$', 'base_model_name_or_path': str(folder)}))
  safetensors.numpy.save_file(state, str(tmp_path / 'adapter_model.safetensors'))
  base = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder, attn_implementation='eager')
  adapted = peft.PeftModel.from_pretrained(base, tmp_path).eval()
  ours = np.asarray(_ours(lora, lora_params))
  assert np.max(np.abs(ours - _torch(model)[0])) > 1e-2  # the adapters matter
  assert np.max(np.abs(ours - _torch(adapted)[0])) <= 1e-4
  merged = jax.tree_util.tree_map(np.asarray, layers.merge_lora(lora_params, lora))
  assert np.max(np.abs(np.asarray(_ours(cfg, merged)) - ours)) <= 1e-4


def test_missing_unexpected_and_misshapen_keys_are_listed(family):
  _, folder, _, cfg, params = family
  tensors = hf_io.read_safetensors(folder)
  key = 'decoder.block.2.layer.1.EncDecAttention.k.weight'
  with pytest.raises(ValueError, match=rf'^checkpoint is missing 1 T5 \(2 encoder \+ 3 decoder layers\) keys: '
                                       rf'{re.escape(key)}$'):
    hf_t5.hf_to_params({k: v for k, v in tensors.items() if k != key}, cfg)
  with pytest.raises(ValueError, match=r'1 unexpected keys for this T5 .*: extra\.weight$'):
    hf_t5.hf_to_params({**tensors, 'extra.weight': np.zeros(3)}, cfg)
  with pytest.raises(ValueError, match=rf'^{re.escape(key)} has shape \(3,\) in the checkpoint: expected \(32, 32\)$'):
    hf_t5.hf_to_params({**tensors, key: np.zeros(3, np.float32)}, cfg)
  # The tied copies of shared.weight and the unused cross-attention bias of older checkpoints are skipped.
  shared = tensors['shared.weight']
  extra = {'encoder.embed_tokens.weight': shared, 'decoder.embed_tokens.weight': shared,
           'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight': np.zeros((8, 4), np.float32)}
  jax.tree_util.tree_map(np.testing.assert_array_equal, hf_t5.hf_to_params({**tensors, **extra}, cfg), params)
  if cfg.tie_embeddings:
    assert hf_t5.hf_to_params({**tensors, 'lm_head.weight': shared}, cfg).keys() == params.keys()
    with pytest.raises(ValueError, match=r'^lm_head\.weight differs from shared\.weight in a checkpoint with '
                                         r'scale_decoder_outputs=True'):
      hf_t5.hf_to_params({**tensors, 'lm_head.weight': shared + 1}, cfg)


BAD_CONFIGS = [
    (lambda: transformers.T5Config(**SMALL, feed_forward_proj='gated-tanh'),
     "feed_forward_proj='gated-tanh' in config.json: expected one of relu, gelu, gelu_new, silu, gated-relu"),
    (lambda: transformers.BertConfig(), "model_type='bert' in config.json: expected a T5 checkpoint (t5)"),
]


@pytest.mark.parametrize('make,message', BAD_CONFIGS)
def test_unsupported_configs_are_rejected(make, message):
  with pytest.raises(ValueError, match='^' + re.escape(message)):
    hf_t5.model_config_from_hf(make(), **_kwargs())


def test_only_the_seq2seq_head_is_offered():
  config = transformers.T5Config(**SMALL)
  with pytest.raises(ValueError, match=r"^head='sequence': expected 'seq2seq' for a T5 model$"):
    hf_t5.model_config_from_hf(config, **_kwargs('sequence'))
  cfg = hf_t5.model_config_from_hf(config, **_kwargs())
  with pytest.raises(ValueError, match=r"^problem_type='regression': expected None for a seq2seq model$"):
    hf_t5.hf_config_for_export(config, cfg, {}, 'regression')
