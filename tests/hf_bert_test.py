"""Parity with Hugging Face PyTorch on the packaged MiniLM weights, export round trip, loading errors."""

import functools
import os
import shutil
import signal
import subprocess
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jax.sharding import Mesh

from configs import common
from jtune.hf import bert as hf_bert
from jtune.hf import io as hf_io
from jtune.models import bert

SENTENCES = [
    'the rock is destined to be the 21st century\'s new conan and that he\'s going to make a splash .',
    'a dull , lifeless film .',
    'it is a gorgeously elaborate continuation of the lord of the rings trilogy .',
    'fine .',
]


@pytest.fixture(scope='module')
def loaded(minilm_dir):
  hf_config = hf_io.load_config(minilm_dir, {})
  cfg = hf_bert.model_config_from_hf(hf_config, head='sequence', num_labels=3, hidden_dropout=0.1,
                                     attention_dropout=0.1, classifier_dropout=0.1, dtype=jnp.float32,
                                     param_dtype=jnp.float32)
  tensors = hf_io.read_safetensors(minilm_dir)
  params = hf_bert.hf_to_params(tensors, cfg)
  head = bert.BertForSequenceClassification(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32),
      jnp.zeros((1, 8), jnp.int32), deterministic=True)['params']['classifier']
  params['classifier'] = jax.tree_util.tree_map(np.asarray, nn.unbox(head))
  tokenizer = hf_io.load_tokenizer(minilm_dir)
  enc = tokenizer(SENTENCES, padding=True, return_tensors='np')
  batch = {k: enc[k].astype(np.int32) for k in ('input_ids', 'attention_mask', 'token_type_ids')}
  return hf_config, cfg, tensors, params, tokenizer, batch


def _torch(batch):
  return {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}


def test_last_hidden_state_matches_transformers(minilm_dir, loaded):
  _, cfg, _, params, _, batch = loaded
  hidden, pooled = bert.BertModel(cfg).apply({'params': params['bert']}, batch['input_ids'],
                                             batch['attention_mask'], batch['token_type_ids'],
                                             deterministic=True)
  ref = transformers.BertModel.from_pretrained(minilm_dir).eval()
  with torch.no_grad():
    out = ref(**_torch(batch))
  assert batch['attention_mask'].min() == 0  # the batch is padded
  real = batch['attention_mask'][..., None] > 0
  assert np.max(np.abs(np.asarray(hidden) - out.last_hidden_state.numpy()) * real) <= 1e-4
  assert np.max(np.abs(np.asarray(pooled) - out.pooler_output.numpy())) <= 1e-4


def test_export_loads_in_transformers_and_predicts_the_same(tmp_path, loaded):
  hf_config, cfg, _, params, tokenizer, batch = loaded
  labels = {0: 'bad', 1: 'good', 2: 'meh'}
  hf_io.export(tmp_path / 'out', hf_bert.params_to_hf(params, cfg),
               hf_bert.hf_config_for_export(hf_config, cfg, labels, None), tokenizer)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / 'out').eval()
  assert isinstance(model, transformers.BertForSequenceClassification)
  assert model.config.id2label == labels and model.config.label2id['meh'] == 2
  assert model.config.num_labels == 3 and model.config.problem_type == 'single_label_classification'
  ours = bert.BertForSequenceClassification(cfg).apply({'params': params}, batch['input_ids'],
                                                       batch['attention_mask'], batch['token_type_ids'],
                                                       deterministic=True)
  with torch.no_grad():
    theirs = model(**_torch(batch)).logits.numpy()
  assert np.max(np.abs(np.asarray(ours) - theirs)) <= 1e-4
  back = hf_bert.hf_to_params(hf_io.read_safetensors(tmp_path / 'out'), cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back['bert'], params['bert'])


def test_missing_and_unexpected_keys_are_listed(loaded):
  _, cfg, tensors, _, _, _ = loaded
  missing = dict(tensors)
  del missing['encoder.layer.3.attention.self.key.bias']
  with pytest.raises(ValueError, match=r'missing 1 BERT keys: encoder.layer.3.attention.self.key.bias$'):
    hf_bert.hf_to_params(missing, cfg)
  extra = dict(tensors, **{'encoder.layer.6.output.dense.weight': np.zeros(3)})
  with pytest.raises(ValueError, match=r'1 unexpected keys for a 6-layer BERT: encoder.layer.6.output'):
    hf_bert.hf_to_params(extra, cfg)
  # A checkpoint saved from BertForPreTraining: 'bert.' prefix, legacy names, MLM heads ignored.
  legacy = {'bert.' + k.replace('LayerNorm.weight', 'LayerNorm.gamma'): v for k, v in tensors.items()}
  legacy['cls.predictions.bias'] = np.zeros(3)
  np.testing.assert_array_equal(
      hf_bert.hf_to_params(legacy, cfg)['bert']['embeddings']['LayerNorm']['scale'],
      tensors['embeddings.LayerNorm.weight'])


def test_folder_errors(tmp_path, minilm_dir):
  with pytest.raises(FileNotFoundError, match="model folder '/no/such/model' does not exist"):
    hf_io.resolve('/no/such/model', str(tmp_path))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='has no config.json'):
    hf_io.resolve(str(tmp_path / 'empty'), str(tmp_path))
  run = tmp_path / 'run'  # a jtune workdir given where an export is expected
  (run / 'checkpoints').mkdir(parents=True)
  for name in ('config.json', 'labels.json'):
    (run / name).write_text('{}')
  with pytest.raises(FileNotFoundError, match=rf"^model folder '{run}' is a jtune run folder \(a workdir\): "
                                              rf"expected a folder with config.json, .*, such as the run's export "
                                              rf'\({run}/export\)$'):
    hf_io.resolve(str(run), str(tmp_path))
  broken = tmp_path / 'broken'
  shutil.copytree(minilm_dir, broken, ignore=shutil.ignore_patterns('model.safetensors'))
  with pytest.raises(FileNotFoundError, match='model.safetensors does not exist'):
    hf_io.read_safetensors(broken)
  (broken / 'model.safetensors').write_bytes((minilm_dir / 'model.safetensors').read_bytes()[:1000])
  with pytest.raises(ValueError, match='is not a readable safetensors file'):
    hf_io.read_safetensors(broken)
  with pytest.raises(ValueError, match="config_overrides.num_layerz: 'num_layerz' is not a field"):
    hf_io.load_config(minilm_dir, {'num_layerz': 2})


def test_config_errors(loaded):
  hf_config = loaded[0]
  kwargs = dict(head='sequence', num_labels=2, hidden_dropout=0.1, attention_dropout=0.1, classifier_dropout=0.1,
                dtype=jnp.float32, param_dtype=jnp.float32)
  for field, value, message in [('hidden_act', 'relu', "hidden_act='relu' in config.json: expected gelu"),
                                ('position_embedding_type', 'relative_key', 'expected absolute')]:
    bad = transformers.BertConfig.from_dict({**hf_config.to_dict(), field: value})
    with pytest.raises(ValueError, match=message):
      hf_bert.model_config_from_hf(bad, **kwargs)


def test_tokenizer_and_file_errors(tmp_path, minilm_dir):
  (tmp_path / 'config.json').write_text((minilm_dir / 'config.json').read_text())
  with pytest.raises(FileNotFoundError, match='has no tokenizer files'):
    hf_io.load_tokenizer(tmp_path)
  with pytest.raises(NotADirectoryError, match='config.json.* is a file'):
    hf_io.resolve(str(tmp_path / 'config.json'), str(tmp_path))


def test_a_sharded_checkpoint_reads_as_the_single_file(tmp_path, minilm_dir, loaded):
  """transformers' save_pretrained with max_shard_size: model-0000i-of-0000n.safetensors and the index."""
  tensors = loaded[2]
  transformers.AutoModel.from_pretrained(minilm_dir).save_pretrained(tmp_path, max_shard_size='30MB')
  assert not (tmp_path / hf_io.WEIGHTS).exists() and len(list(tmp_path.glob('model-*.safetensors'))) >= 2
  sharded = hf_io.read_safetensors(tmp_path)
  assert sharded.keys() == tensors.keys() - {'embeddings.position_ids'}  # a buffer transformers 5 does not save
  for key, value in sharded.items():
    np.testing.assert_array_equal(value, tensors[key], err_msg=key)
  (tmp_path / hf_io.INDEX).write_text('[]')
  with pytest.raises(ValueError, match=r'model.safetensors.index.json is not a safetensors index .*weight_map'):
    hf_io.read_safetensors(tmp_path)
  (tmp_path / hf_io.INDEX).write_text('{"weight_map": {"w": "../elsewhere.safetensors"}}')
  with pytest.raises(ValueError, match=r"names shard '../elsewhere.safetensors': expected file names in its"):
    hf_io.read_safetensors(tmp_path)


def test_a_bucket_export_cut_short_never_mixes_two_exports(tmp_path, monkeypatch):
  """A bucket folder (here a local folder taken for one) is written file by file: the old one goes first, the
  config files last, so a copy cut short leaves no config.json and nothing of the export before."""
  bucket = str(tmp_path / 'bucket')
  monkeypatch.setattr(hf_io.fs, 'is_local', lambda p: not str(p).startswith(bucket))
  out = tmp_path / 'bucket' / 'export'

  def export(version, names):
    return lambda folder: [(folder / name).write_text(version) for name in names]
  hf_io.write_folder(out, export('one', ['config.json', 'model.safetensors', 'old_only.txt']), None, 'export')
  path_cls = type(hf_io.fs.epath.Path(tmp_path))  # epath's concrete local class
  real_copy, copied = path_cls.copy, []

  def copy_then_die(self, dst, overwrite=False):
    if copied:
      raise OSError('killed')
    copied.append(dst.name)
    return real_copy(self, dst, overwrite=overwrite)
  monkeypatch.setattr(path_cls, 'copy', copy_then_die)
  with pytest.raises(OSError, match='killed'):
    hf_io.write_folder(out, export('two', ['config.json', 'model.safetensors', 'tokenizer_config.json']), None,
                       'export')
  assert sorted(p.name for p in out.iterdir()) == ['model.safetensors'] and copied == ['model.safetensors']
  monkeypatch.setattr(path_cls, 'copy', real_copy)
  hf_io.write_folder(out, export('two', ['config.json', 'model.safetensors']), None, 'export')
  assert {p.name: p.read_text() for p in out.iterdir()} == {'config.json': 'two', 'model.safetensors': 'two'}


def _write_config(text, folder):
  (folder / 'config.json').write_text(text)


def test_an_interrupted_export_keeps_the_earlier_one_and_leaves_no_staging(tmp_path, monkeypatch):
  """SIGTERM during a run's final export (preemption.sigterm_interrupts): the staging folder goes, the earlier
  export stays whole; a staging folder that a SIGKILL left (its process gone, untouched for an hour) is removed by
  the next write beside it, one of a live process is not."""
  from jtune import preemption  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'export'
  hf_io.write_folder(out, lambda f: (f / 'config.json').write_text('one'), None, 'export')

  def write_then_sigterm(folder):
    (folder / 'config.json').write_text('two')
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises here
  with pytest.raises(preemption.Interrupted), preemption.sigterm_interrupts():
    hf_io.write_folder(out, write_then_sigterm, None, 'export')
  assert [p.name for p in tmp_path.iterdir()] == ['export'] and (out / 'config.json').read_text() == 'one'
  dead = subprocess.Popen(['true'])
  dead.wait()
  abandoned, live, recent = (tmp_path / f'.export.jtune-{pid}-{name}' for pid, name in (
      (dead.pid, 'x1'), (os.getpid(), 'y2'), (dead.pid, 'z3')))
  for folder in (abandoned, live, recent):
    folder.mkdir()
    (folder / 'model.safetensors').write_text('half')
  for folder in (abandoned, live):
    os.utime(folder, (time.time() - 7200,) * 2)
  hf_io.write_folder(out, lambda f: (f / 'config.json').write_text('three'), None, 'export')
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(['export', live.name, recent.name])
  assert (out / 'config.json').read_text() == 'three'
  real_replace = os.replace
  def interrupted_after(after, calls):  # os.replace, interrupted once the `after`-th rename is done
    def replace(src, dst):
      real_replace(src, dst)
      calls.append(src)
      if len(calls) == after:
        raise preemption.Interrupted('SIGTERM')
    return replace
  for after, version, kept in ((1, 'four', 'three'), (2, 'five', 'five')):
    monkeypatch.setattr(hf_io.os, 'replace', interrupted_after(after, []))
    with pytest.raises(preemption.Interrupted):
      hf_io.write_folder(out, functools.partial(_write_config, version), None, 'export')
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(['export', live.name, recent.name]), after
    assert (out / 'config.json').read_text() == kept
  (tmp_path / 'afile').write_text('')
  with pytest.raises(OSError, match=rf'^{tmp_path}/afile/sub: cannot write the export there \({tmp_path}/afile is a '
                                    r'file\): expected a folder path'):
    hf_io.write_folder(tmp_path / 'afile' / 'sub', lambda f: None, None, 'export')


def _mesh_2x4() -> Mesh:
  """data=2 x fsdp=4 (a size-1 'tensor' axis, since DEFAULT_RULES names it)."""
  return Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4, 1), ('data', 'fsdp', 'tensor'))


def test_place_checks_shapes_and_shards(loaded):
  _, cfg, _, params, _, _ = loaded
  boxed = jax.eval_shape(lambda: bert.BertForSequenceClassification(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32),
      jnp.zeros((1, 8), jnp.int32), deterministic=True)['params'])
  specs = nn.get_partition_spec(boxed)
  shardings = nn.logical_to_mesh_sharding(specs, _mesh_2x4(), common.RULES)
  abstract = nn.unbox(boxed)
  placed = hf_io.place(params, abstract, shardings)
  jax.tree_util.tree_map(lambda x, s: assert_equal(x.sharding, s), placed, shardings)
  word = placed['bert']['embeddings']['word_embeddings']['embedding']
  assert {s.data.shape for s in word.addressable_shards} == {(30522, 96)}  # embed 384 over fsdp=4
  np.testing.assert_array_equal(np.asarray(word),
                                params['bert']['embeddings']['word_embeddings']['embedding'])
  bad = jax.tree_util.tree_map(lambda x: x, params)
  bad['bert']['pooler']['kernel'] = np.zeros((384, 10), np.float32)
  with pytest.raises(ValueError, match=r"parameter \['bert'\]\['pooler'\]\['kernel'\] has shape \(384, 10\) "
                                       r'in the checkpoint but \(384, 384\) in the model'):
    hf_io.place(bad, abstract, shardings)
  del bad['bert']['pooler']
  pooler = r"\['bert'\]\['pooler'\]"
  with pytest.raises(ValueError, match=rf'missing {pooler}\[.bias.\], {pooler}\[.kernel.\]; unexpected none'):
    hf_io.place(bad, abstract, shardings)


def assert_equal(a, b):
  assert a == b, (a, b)
