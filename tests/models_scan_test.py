"""layers.apply_layers: the layers as one lax.scan over their stacked weights (model.scan_layers) compute what the
unrolled layers do (outputs and gradients, every family, remat, LoRA, dropout, on a sharded mesh), the unrolled
layers are traced once, each layer draws its own dropout mask, and what cannot be scanned is named."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import common
from jtune.models import bert, decoder, layers, t5
from jtune.models.layers import Dropout

IDS = np.array([[2, 5, 9, 11, 3, 7, 0, 0], [2, 7, 8, 3, 4, 6, 9, 1]], np.int32)
MASK = (IDS > 0).astype(np.int32)
BERT = bert.BertConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
                       max_position_embeddings=32, type_vocab_size=2, layer_norm_eps=1e-12, initializer_range=0.2,
                       hidden_dropout=0.1, attention_dropout=0.1, classifier_dropout=0.1, num_labels=3)
LLAMA = decoder.DecoderConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                              intermediate_size=64, max_position_embeddings=32, initializer_range=0.2,
                              hidden_dropout=0.1)
T5 = t5.T5Config(vocab_size=64, hidden_size=32, num_layers=3, num_decoder_layers=3, num_heads=4, head_dim=6,
                 intermediate_size=48, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                 initializer_range=0.2, hidden_dropout=0.1)


def _model_and_inputs(cfg):
  """The model of `cfg` and its positional inputs for IDS."""
  if isinstance(cfg, bert.BertConfig):
    return bert.build(cfg), (IDS, MASK, None)
  if isinstance(cfg, decoder.DecoderConfig):
    return decoder.build(cfg), (IDS, np.broadcast_to(np.arange(IDS.shape[1]), IDS.shape), MASK)
  return t5.build(cfg), (IDS, MASK, IDS[:, :6])


def _call(cfg, params, deterministic=True, seed=0):
  """The model's float32 output for IDS; dropout drawn from `seed` when not deterministic."""
  model, inputs = _model_and_inputs(cfg)
  rngs = None if deterministic else {'dropout': jax.random.PRNGKey(seed)}
  return model.apply({'params': params}, *inputs, deterministic=deterministic, rngs=rngs)


def _init(cfg):
  """Parameters with every LoRA B away from zero, so the adapters count."""
  model, inputs = _model_and_inputs(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), *inputs, deterministic=True)['params'])
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.3 if path[-1].key == 'lora_b' else x, params)


def _loss_and_grad(cfg, params):
  return jax.jit(jax.value_and_grad(lambda p: jnp.mean(jnp.square(_call(cfg, p)))))(params)


CASES = {
    'bert': BERT,
    'roberta-lora-dots': dataclasses.replace(BERT, family='roberta', pad_token_id=1, type_vocab_size=1,
                                             lora_rank=2, remat='dots'),
    'llama': LLAMA,
    'llama-lora-full': dataclasses.replace(LLAMA, lora_rank=2, remat='full'),
    # a scanned layer does not know its path: its adapters are found by their parameters
    'bert-lora-layer-paths': dataclasses.replace(BERT, lora_rank=2, lora_targets=(r'layer_\d+/attention/value$',)),
    't5': T5,
}


@pytest.mark.parametrize('name', list(CASES))
def test_scan_computes_what_the_unrolled_layers_compute(name):
  cfg = CASES[name]
  scanned = dataclasses.replace(cfg, scan_layers=True)
  params = _init(cfg)
  assert jax.tree_util.tree_structure(_init(scanned)) == jax.tree_util.tree_structure(params)  # same checkpoints
  want, want_grad = _loss_and_grad(cfg, params)
  got, grad = _loss_and_grad(scanned, params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grad, want_grad)
  hlo = jax.jit(lambda p: _call(scanned, p)).lower(params).as_text()
  assert 'while' in hlo  # the scan reached XLA as one loop
  assert 'while' not in jax.jit(lambda p: _call(cfg, p)).lower(params).as_text()


@pytest.mark.parametrize('name', ['bert', 'llama-lora-full', 't5'])
def test_scan_and_unrolled_layers_draw_the_same_dropout(name):
  """Layer i's dropout key is the same either way, so model.scan_layers does not change a training run."""
  cfg = CASES[name]
  params = _init(cfg)

  def loss_and_grad(cfg):
    loss = lambda p: jnp.mean(jnp.square(_call(cfg, p, deterministic=False, seed=3)))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(params)

  want, want_grad = loss_and_grad(cfg)
  got, grad = loss_and_grad(dataclasses.replace(cfg, scan_layers=True))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grad, want_grad)


def test_scan_under_mesh_and_rules():
  scanned = dataclasses.replace(BERT, scan_layers=True)
  params = _init(BERT)
  want = _call(BERT, params)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ('data', 'fsdp', 'tensor'))
  model, inputs = _model_and_inputs(BERT)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs, deterministic=True))['params']
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, common.RULES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(common.RULES):
    got = jax.jit(lambda p: _call(scanned, p))(jax.device_put(params, shardings))
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize('name', ['bert', 'llama', 't5'])
def test_scanned_dropout_is_drawn_from_the_rngs(name):
  scanned = dataclasses.replace(CASES[name], scan_layers=True)
  params = _init(scanned)
  run = lambda seed: np.asarray(_call(scanned, params, deterministic=False, seed=seed))  # noqa: E731
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.allclose(run(0), run(1))
  assert not np.allclose(run(0), np.asarray(_call(scanned, params)))


def test_layers_that_differ_cannot_be_scanned():
  cfg = dataclasses.replace(BERT, lora_rank=2, lora_targets=('layer_1/attention/query$',))
  params = _init(cfg)
  with pytest.raises(ValueError, match=r'scan_layers=True: layer_1 has other parameters than layer_0'):
    _call(dataclasses.replace(cfg, scan_layers=True), params)


TRACES = []  # one entry each time a _Layer is traced or run outside a jit


class _Layer(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic):
    TRACES.append(x.shape)
    return Dropout(0.5)(nn.Dense(4)(x), deterministic=deterministic)


class _Two(nn.Module):
  scan: bool = True

  @nn.compact
  def __call__(self, x, deterministic=True):
    if self.is_initializing():
      return _Layer(name='layer_1')(_Layer(name='layer_0')(x, True), True)
    return layers.apply_layers(self, _Layer(parent=None), ['layer_0', 'layer_1'], x, deterministic=deterministic,
                               scan=self.scan)


@pytest.mark.parametrize('scan', [True, False])
def test_apply_layers_applies_each_layer_its_weights_in_order_tracing_it_once(scan):
  x = jnp.arange(8.0).reshape(2, 4)
  params = _Two().init(jax.random.PRNGKey(0), x)['params']
  params = {'layer_0': params['layer_0'], 'layer_1': jax.tree_util.tree_map(lambda p: p * 2 + 1, params['layer_1'])}
  unrolled = x
  for name in ('layer_0', 'layer_1'):
    unrolled = _Layer().apply({'params': params[name]}, unrolled, True)
  TRACES.clear()
  np.testing.assert_allclose(_Two(scan).apply({'params': params}, x), unrolled, rtol=1e-6)
  assert TRACES == [(2, 4)]  # one trace for both layers


class _FirstKey(nn.Module):
  """The first 'dropout' key a top-level module draws: the one scan_layers folds each layer's position into."""
  @nn.compact
  def __call__(self):
    return self.make_rng('dropout')


@pytest.mark.parametrize('scan', [True, False])
def test_each_layer_draws_its_own_dropout_key(scan):
  x = jnp.ones((64, 4))
  params = _Two(scan).init(jax.random.PRNGKey(0), x)['params']
  rngs = {'dropout': jax.random.PRNGKey(7)}
  key = _FirstKey().apply({}, rngs=rngs)
  want = x
  for i, name in enumerate(('layer_0', 'layer_1')):
    want = _Layer().apply({'params': params[name]}, want, False, rngs={'dropout': jax.random.fold_in(key, i)})
  np.testing.assert_allclose(_Two(scan).apply({'params': params}, x, False, rngs=rngs), want, rtol=1e-6)
