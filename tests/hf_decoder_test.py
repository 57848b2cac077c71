"""Decoder LMs against transformers PyTorch: logits and hidden states on a padded batch, packing, export round
trip through AutoModelForCausalLM, PEFT adapters, and the loading and config errors."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jtune import modeling
from jtune.hf import gpt2 as hf_gpt2
from jtune.hf import io as hf_io
from jtune.hf import llama as hf_llama
from jtune.models import decoder, layers

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {  # name -> (transformers config, jtune.hf module)
    'gpt2': (lambda: transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                             bos_token_id=1, eos_token_id=2), hf_gpt2),
    'gpt2_untied_gelu': (lambda: transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=48, activation_function='gelu',
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2), hf_gpt2),
    'llama_tied': (lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=True), hf_llama),
    'llama_untied_llama3_rope': (lambda: transformers.LlamaConfig(
        **{**SMALL, 'num_key_value_heads': 1}, head_dim=16, tie_word_embeddings=False, rope_parameters={
            'rope_type': 'llama3', 'rope_theta': 10000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
            'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}), hf_llama),
    'llama_all_biases': (lambda: transformers.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True), hf_llama),
    'qwen2': (lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=False), hf_llama),
    'mistral_window': (lambda: transformers.MistralConfig(**SMALL, sliding_window=3), hf_llama),
}
IDS = np.array([[5, 17, 33, 8, 9, 61, 4, 12],
                [7, 3, 45, 90, 11, 0, 0, 0],
                [6, 29, 14, 0, 0, 0, 0, 0]], np.int32)
MASK = (IDS > 0).astype(np.int32)
POSITIONS = np.broadcast_to(np.arange(IDS.shape[1]), IDS.shape)


def _kwargs(head='causal_lm'):
  return dict(head=head, num_labels=0, hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0,
              dtype=jnp.float32, param_dtype=jnp.float32)


@pytest.fixture(scope='module', params=list(CONFIGS))
def family(request, tmp_path_factory):
  """(name, folder, torch model, hf module, DecoderConfig, params): a random model saved by transformers."""
  make_config, hf_module = CONFIGS[request.param]
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(make_config(), attn_implementation='eager').eval()
  with torch.no_grad():  # biases and norms start at 0 and 1: make every tensor count
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(folder)
  cfg = hf_module.model_config_from_hf(hf_io.load_config(folder, {}), **_kwargs())
  params = hf_module.hf_to_params(hf_io.read_safetensors(folder), cfg)
  return request.param, folder, model, hf_module, cfg, params


def _torch_logits(model, ids=IDS, mask=MASK):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                output_hidden_states=True)
  return out.logits.numpy(), out.hidden_states[-1].numpy()


def _ours(cfg, params, ids=IDS, positions=POSITIONS, segments=MASK):
  return np.asarray(decoder.build(cfg).apply({'params': params}, ids, positions, segments, deterministic=True))


def test_logits_and_hidden_states_match_transformers(family):
  name, _, model, _, cfg, params = family
  want_logits, want_hidden = _torch_logits(model)
  real = MASK > 0
  hidden, _ = decoder.Decoder(cfg).apply({'params': params['decoder']}, IDS, POSITIONS, MASK, True)
  assert np.max(np.abs(np.asarray(hidden) - want_hidden)[real]) <= 1e-4, name
  logits = _ours(cfg, params)
  assert logits.dtype == np.float32 and logits.shape == (3, 8, 96)
  assert np.max(np.abs(logits - want_logits)[real]) <= 1e-4, name
  assert np.std(want_logits[real]) > 0.1  # not a degenerate comparison
  assert ('lm_head' in params) == (not cfg.tie_embeddings)


def test_packed_examples_do_not_see_each_other(family):
  _, _, _, _, cfg, params = family
  a, b = IDS[0, :5], IDS[1, :5]
  packed = _ours(cfg, params, np.concatenate([a, b])[None], np.concatenate([np.arange(5), np.arange(5)])[None],
                 np.array([[1] * 5 + [2] * 5]))
  alone_a = _ours(cfg, params, a[None], np.arange(5)[None], np.ones((1, 5), np.int32))
  alone_b = _ours(cfg, params, b[None], np.arange(5)[None], np.ones((1, 5), np.int32))
  np.testing.assert_allclose(packed[0, :5], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(packed[0, 5:], alone_b[0], atol=1e-5)
  crossed = _ours(cfg, params, np.concatenate([a, b])[None], np.arange(10)[None], np.ones((1, 10), np.int32))
  assert np.max(np.abs(crossed[0, 5:] - alone_b[0])) > 1e-3  # one segment would mix them


def test_export_loads_in_transformers_without_missing_keys(family, tmp_path):
  name, folder, model, hf_module, cfg, params = family
  state = hf_module.params_to_hf(params, cfg)
  config = hf_module.hf_config_for_export(hf_io.load_config(folder, {}), cfg, {}, None)
  safetensors.numpy.save_file(state, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
  config.save_pretrained(tmp_path)
  loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, output_loading_info=True, attn_implementation='eager')
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
  assert type(loaded) is type(model), name
  assert json.loads((tmp_path / 'config.json').read_text())['architectures'] == [type(model).__name__]
  real = MASK > 0
  np.testing.assert_allclose(_torch_logits(loaded.eval())[0][real], _torch_logits(model)[0][real], atol=1e-5)
  back = hf_module.hf_to_params(state, cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  assert set(state) == set(model.state_dict()) - ({'lm_head.weight'} if cfg.tie_embeddings else set())


def _with_lora(cfg, params, targets, seed=1):
  """Params with rank-4 adapters on `targets`, lora_b random (the model differs from the base)."""
  lora = decoder.DecoderConfig(**{**cfg.__dict__, 'lora_rank': 4, 'lora_alpha': 8.0, 'lora_targets': targets})
  fresh = decoder.build(lora).init(jax.random.PRNGKey(seed), IDS, POSITIONS, MASK, deterministic=True)['params']
  fresh = jax.tree_util.tree_map(np.asarray, nn.unbox(fresh))
  rng = np.random.default_rng(seed)

  def merge(base, new):
    if not isinstance(new, dict):
      return base
    out = {k: merge(base[k], v) if k in base else v for k, v in new.items()}
    if 'lora_b' in out:
      out['lora_b'] = rng.normal(0, 0.3, out['lora_b'].shape).astype(np.float32)
    return out
  return lora, merge(params, fresh)


PEFT_CASES = {'llama_tied': ('attention/query$', 'attention/value$', 'mlp/down$'),
              'qwen2': ('attention/key$', 'lm_head$'),
              'gpt2': ('attention/query$', 'attention/value$', 'mlp/up$')}  # two parts of the fused c_attn


def test_peft_adapter_reproduces_the_lora_model(family, tmp_path):
  name, folder, model, hf_module, cfg, params = family
  if name not in PEFT_CASES:
    pytest.skip('PEFT is checked on one config per kind of layout')
  peft = pytest.importorskip('peft')
  lora, lora_params = _with_lora(cfg, params, PEFT_CASES[name])
  state, modules, to_save = hf_module.peft_adapter(lora_params, lora)
  assert to_save == [] and len(modules) == len(state) // 2 >= 2
  config = modeling.peft_config(lora, state, modules, to_save, str(folder))
  if name == 'gpt2':  # c_attn: query and value, one adapter of rank 8
    assert config['rank_pattern'] == {r'transformer\.h\.0\.attn\.c_attn': 8, r'transformer\.h\.1\.attn\.c_attn': 8}
  (tmp_path / 'adapter_config.json').write_text(json.dumps(config))
  safetensors.numpy.save_file(state, str(tmp_path / 'adapter_model.safetensors'))
  base = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation='eager')
  adapted = peft.PeftModel.from_pretrained(base, tmp_path).eval()
  real = MASK > 0
  ours = _ours(lora, lora_params)
  assert np.max(np.abs(ours - _torch_logits(model)[0])[real]) > 1e-2  # the adapters matter
  np.testing.assert_allclose(ours[real], _torch_logits(adapted)[0][real], atol=1e-4)
  merged = jax.tree_util.tree_map(np.asarray, layers.merge_lora(lora_params, lora))
  np.testing.assert_allclose(_ours(cfg, merged)[real], ours[real], atol=1e-4)


def test_missing_unexpected_and_misshapen_keys_are_listed(family):
  name, folder, _, hf_module, cfg, _ = family
  tensors = hf_io.read_safetensors(folder)
  key = next(k for k in tensors if '1.' in k and k.endswith('weight') and 'norm' not in k and 'ln_' not in k)
  with pytest.raises(ValueError, match=rf'missing 1 .*keys: {key.split(".", 1)[1]}$'):
    hf_module.hf_to_params({k: v for k, v in tensors.items() if k != key}, cfg)
  with pytest.raises(ValueError, match=r'1 unexpected keys for this 2-layer .*: extra.weight$'):
    hf_module.hf_to_params({**tensors, 'extra.weight': np.zeros(3)}, cfg)
  with pytest.raises(ValueError, match=rf'{key.split(".", 1)[1]} has shape \(3,\) in the checkpoint: expected'):
    hf_module.hf_to_params({**tensors, key: np.zeros(3, np.float32)}, cfg)
  # Buffers of older checkpoints and a base-model checkpoint (no prefix) load.
  prefix = hf_module.PREFIX
  bare = {k.removeprefix(prefix): v for k, v in tensors.items()}
  bare.update({'h.0.attn.bias': np.zeros(3)} if name.startswith('gpt2') else
              {'layers.0.self_attn.rotary_emb.inv_freq': np.zeros(3)})
  if cfg.tie_embeddings:
    bare['lm_head.weight'] = np.zeros(3)  # a tied checkpoint may carry the head; it is the embedding
  assert hf_module.hf_to_params(bare, cfg).keys() == family[-1].keys()


BAD_CONFIGS = [
    (lambda: transformers.LlamaConfig(**SMALL, hidden_act='gelu'), "hidden_act='gelu' in config.json: expected silu"),
    (lambda: transformers.LlamaConfig(**SMALL, rope_parameters={'rope_type': 'yarn', 'rope_theta': 1e4,
                                                                 'factor': 2.0}),
     "rope_scaling type 'yarn' in config.json: expected default, linear, llama3"),
    (lambda: transformers.LlamaConfig(**SMALL, attention_bias=True),
     'mlp_bias=False in config.json with attention_bias=True: expected both'),
    (lambda: transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4),
     'use_sliding_window=True in config.json: expected false'),
    (lambda: transformers.GPT2Config(n_embd=32, n_head=4, activation_function='relu'),
     "activation_function='relu' in config.json: expected one of gelu_new"),
    (lambda: transformers.GPT2Config(n_embd=32, n_head=4, scale_attn_by_inverse_layer_idx=True),
     'scale_attn_by_inverse_layer_idx=True in config.json: expected False'),
    (lambda: transformers.BertConfig(), "model_type='bert' in config.json: expected a"),
]


@pytest.mark.parametrize('make,message', BAD_CONFIGS)
def test_unsupported_configs_are_rejected(make, message):
  config = make()
  hf_module = hf_gpt2 if config.model_type == 'gpt2' else hf_llama
  with pytest.raises(ValueError, match='^' + message.replace('(', r'\(').replace(')', r'\)')):
    hf_module.model_config_from_hf(config, **_kwargs())


def test_only_the_causal_lm_head_is_offered():
  for hf_module, config in ((hf_llama, transformers.LlamaConfig(**SMALL)),
                            (hf_gpt2, transformers.GPT2Config(n_embd=32, n_head=4))):
    with pytest.raises(ValueError, match=r"^head='sequence': expected 'causal_lm' for a .* decoder$"):
      hf_module.model_config_from_hf(config, **_kwargs('sequence'))
  cfg = hf_llama.model_config_from_hf(transformers.LlamaConfig(**SMALL), **_kwargs())
  with pytest.raises(ValueError, match=r"^problem_type='regression': expected None for a causal LM$"):
    hf_llama.hf_config_for_export(transformers.LlamaConfig(**SMALL), cfg, {}, 'regression')
