"""The Flax T5: logical axis names and golden partition specs, the cache against teacher forcing (and reordered
like beam search), encoder padding, dropout, LoRA, remat, a sharded forward and config errors."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from configs import common
from jtune.models import layers, t5

RELU = t5.T5Config(vocab_size=64, hidden_size=32, num_layers=1, num_decoder_layers=2, num_heads=4, head_dim=6,
                   intermediate_size=48, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   initializer_range=0.2)
GATED = dataclasses.replace(RELU, feed_forward='gated-gelu', tie_embeddings=False)
IDS = np.array([[5, 17, 33, 8, 9, 61, 4, 12, 7, 3, 45, 1],
                [7, 3, 45, 60, 11, 1, 0, 0, 0, 0, 0, 0],
                [6, 29, 14, 1, 0, 0, 0, 0, 0, 0, 0, 0]], np.int32)
MASK = (IDS > 0).astype(np.int32)
DECODER_IDS = np.array([[0, 4, 8, 15, 16, 23, 42, 2, 9, 1],
                        [0, 9, 9, 1, 0, 0, 0, 0, 0, 0],
                        [0, 50, 3, 33, 2, 7, 1, 0, 0, 0]], np.int32)


def _init(cfg):
  return t5.build(cfg).init(jax.random.PRNGKey(0), IDS, MASK, DECODER_IDS, deterministic=True)['params']


def _params(cfg, seed=0):
  """Random numpy parameters in the model's tree (norm scales near 1, LoRA's B zero), without running its init."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'lora_b':
      return np.zeros(leaf.shape, np.float32)
    return (float(name == 'scale') + rng.normal(0, 0.2, leaf.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, nn.unbox(jax.eval_shape(lambda: _init(cfg))))


@functools.partial(jax.jit, static_argnums=0, static_argnames='deterministic')
def _apply(cfg, params, ids=IDS, mask=MASK, decoder_ids=DECODER_IDS, deterministic=True, rngs=None):
  return t5.build(cfg).apply({'params': params}, ids, mask, decoder_ids, deterministic=deterministic, rngs=rngs)


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


@pytest.mark.parametrize('cfg', [RELU, GATED], ids=['relu', 'gated'])
def test_every_parameter_names_its_axes(cfg):
  boxed = jax.eval_shape(lambda: _init(cfg))
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape)
    assert set(leaf.names) <= {'vocab', 'embed', 'heads', 'kv', 'mlp', None}


GOLDEN = {  # parameter path -> (shape, logical spec, mesh spec on (data=2, fsdp=2, tensor=2))
    ('shared', 'embedding'): ((64, 32), P('vocab', 'embed'), P(None, 'fsdp')),
    ('encoder', 'layer_0', 'attention', 'relative_attention_bias'): ((8, 4), P(None, 'heads'), P(None, 'tensor')),
    ('encoder', 'layer_0', 'attention', 'query', 'kernel'): ((32, 4, 6), P('embed', 'heads', 'kv'),
                                                             P('fsdp', 'tensor', None)),
    ('encoder', 'layer_0', 'attention', 'output', 'kernel'): ((4, 6, 32), P('heads', 'kv', 'embed'),
                                                              P('tensor', None, 'fsdp')),
    ('encoder', 'layer_0', 'mlp_norm', 'scale'): ((32,), P('embed'), P('fsdp')),
    ('encoder', 'final_norm', 'scale'): ((32,), P('embed'), P('fsdp')),
    ('decoder', 'layer_0', 'attention', 'relative_attention_bias'): ((8, 4), P(None, 'heads'), P(None, 'tensor')),
    ('decoder', 'layer_1', 'cross_attention', 'value', 'kernel'): ((32, 4, 6), P('embed', 'heads', 'kv'),
                                                                   P('fsdp', 'tensor', None)),
    ('decoder', 'layer_1', 'cross_attention_norm', 'scale'): ((32,), P('embed'), P('fsdp')),
    ('decoder', 'layer_1', 'mlp', 'wi_0', 'kernel'): ((32, 48), P('embed', 'mlp'), P('fsdp', 'tensor')),
    ('decoder', 'layer_1', 'mlp', 'wi_1', 'kernel'): ((32, 48), P('embed', 'mlp'), P('fsdp', 'tensor')),
    ('decoder', 'layer_1', 'mlp', 'wo', 'kernel'): ((48, 32), P('mlp', 'embed'), P('tensor', 'fsdp')),
    ('lm_head', 'kernel'): ((32, 64), P('embed', 'vocab'), P('fsdp', None)),
}


def _mesh_2x2x2() -> Mesh:
  return Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ('data', 'fsdp', 'tensor'))


def test_golden_paths_and_partition_specs():
  boxed = jax.eval_shape(lambda: _init(GATED))
  specs, shapes = nn.get_partition_spec(boxed), nn.unbox(boxed)
  shardings = nn.logical_to_mesh_sharding(specs, _mesh_2x2x2(), common.RULES)
  for path, (shape, logical, mesh_spec) in GOLDEN.items():
    assert (_at(shapes, path).shape, _at(specs, path), _at(shardings, path).spec) == (shape, logical, mesh_spec), path


def test_parameter_trees():
  relu, gated = jax.eval_shape(lambda: _init(RELU)), jax.eval_shape(lambda: _init(GATED))
  assert sorted(relu) == ['decoder', 'encoder', 'shared'] and sorted(gated) == ['decoder', 'encoder', 'lm_head',
                                                                                 'shared']
  assert sorted(relu['encoder']) == ['final_norm', 'layer_0']
  assert sorted(relu['decoder']) == ['final_norm', 'layer_0', 'layer_1']
  assert sorted(relu['encoder']['layer_0']) == ['attention', 'attention_norm', 'mlp', 'mlp_norm']
  assert sorted(relu['decoder']['layer_1']) == ['attention', 'attention_norm', 'cross_attention',
                                                'cross_attention_norm', 'mlp', 'mlp_norm']
  assert sorted(relu['decoder']['layer_0']['attention']) == ['key', 'output', 'query', 'relative_attention_bias',
                                                             'value']
  assert sorted(relu['decoder']['layer_1']['attention']) == ['key', 'output', 'query', 'value']
  assert sorted(relu['decoder']['layer_0']['cross_attention']) == ['key', 'output', 'query', 'value']
  assert sorted(relu['encoder']['layer_0']['mlp']) == ['wi', 'wo']
  assert sorted(gated['encoder']['layer_0']['mlp']) == ['wi_0', 'wi_1', 'wo']
  assert sorted(relu['encoder']['layer_0']['attention']['query']) == ['kernel']  # no biases in T5
  encoder, decoder = (2 + 4 + 2) + 1 + 1, 2 * (3 + 8 + 2) + 1 + 1  # + bias table + final norm
  assert len(jax.tree_util.tree_leaves(nn.unbox(relu))) == 1 + encoder + decoder
  assert len(jax.tree_util.tree_leaves(nn.unbox(gated))) == 1 + encoder + 1 + decoder + 2 + 1


def test_sharded_forward_matches_unsharded():
  params = _params(GATED)
  want = _apply(GATED, params)
  mesh = _mesh_2x2x2()
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(jax.eval_shape(lambda: _init(GATED))), mesh,
                                          common.RULES)
  run = jax.jit(lambda p: _apply(GATED, p))
  with jax.set_mesh(mesh), nn.logical_axis_rules(common.RULES):
    placed = jax.device_put(params, shardings)
    hlo = run.lower(placed).as_text()
    got = run(placed)
  assert 'sharding' in hlo and got.shape == (3, 10, 64) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=5e-5)


@pytest.mark.parametrize('cfg', [RELU, GATED], ids=['relu', 'gated'])
def test_cached_decoding_matches_teacher_forcing(cfg):
  """A 3-token prefill, then one token per step from a traced slot; halfway the rows are reordered as beam
  search does, and every row still continues its own sequence."""
  params = _params(cfg)
  want = np.asarray(_apply(cfg, params))
  model = t5.build(cfg)
  encoded = model.apply({'params': params}, IDS, MASK, method='encode')
  cache = model.apply({'params': params}, encoded, DECODER_IDS.shape[1] + 3, method='start_cache')
  assert set(cache) == {'layer_0', 'layer_1'}
  assert cache['layer_1']['cross_key'].shape == (3, 12, 4, 6) and cache['layer_1']['key'].shape == (3, 13, 4, 6)
  step = jax.jit(lambda ids, mask, cache, index: model.apply({'params': params}, ids, mask, cache, index,
                                                             method='decode'))
  logits, cache = step(DECODER_IDS[:, :3], MASK, cache, jnp.int32(0))
  pieces, rows = [np.asarray(logits)], np.arange(3)
  for t in range(3, DECODER_IDS.shape[1]):
    if t == 6:
      rows = np.array([2, 0, 1])
      cache = jax.tree_util.tree_map(lambda x: x[rows], cache)  # noqa: B023
    logits, cache = step(DECODER_IDS[rows, t:t + 1], MASK[rows], cache, jnp.int32(t))
    pieces.append(np.asarray(logits)[np.argsort(rows)])
  got = np.concatenate(pieces, axis=1)
  assert got.dtype == np.float32 and np.std(want) > 0.1
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_encoder_padding_does_not_change_a_row():
  params = _params(GATED)
  alone = _apply(GATED, params, IDS[2:, :4], MASK[2:, :4], DECODER_IDS[2:])
  padded = _apply(GATED, params, IDS[2:], MASK[2:], DECODER_IDS[2:])
  ids = IDS[2:].copy()
  ids[0, 4:] = 37  # other tokens at the padding
  other = _apply(GATED, params, ids, MASK[2:], DECODER_IDS[2:])
  np.testing.assert_allclose(padded, alone, atol=1e-5)
  np.testing.assert_allclose(other, alone, atol=1e-5)
  seen = _apply(GATED, params, ids, (ids > 0).astype(np.int32), DECODER_IDS[2:])
  assert np.max(np.abs(seen - alone)) > 1e-3  # unmasked, the same tokens do change the row


@pytest.mark.parametrize('field', ['hidden_dropout', 'attention_dropout'])
def test_dropout_only_in_training(field):
  cfg = dataclasses.replace(RELU, **{field: 0.2})
  params = _params(cfg)
  run = lambda det, seed: _apply(cfg, params, deterministic=det,  # noqa: E731
                                 rngs={'dropout': jax.random.key(seed, impl='rbg')})
  np.testing.assert_array_equal(run(True, 0), _apply(RELU, params))
  assert not np.allclose(run(False, 0), run(False, 1))


def test_lora_adapters_sit_on_the_targets_and_merge_exactly():
  cfg = dataclasses.replace(GATED, lora_rank=4)
  params = _params(cfg)
  adapted = {path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
             if path[-1].key == 'lora_a'}
  names = {'/'.join(k.key for k in path[:-1]) for path in adapted}
  want = {f'{stack}/layer_{i}/{attn}/{proj}' for stack, n in (('encoder', 1), ('decoder', 2)) for i in range(n)
          for attn in (('attention', 'cross_attention') if stack == 'decoder' else ('attention',))
          for proj in ('query', 'value')}
  assert names == want
  layer = params['decoder']['layer_1']
  assert layer['cross_attention']['value']['lora_b'].shape == (4, 4, 6)
  base = _apply(cfg, params)
  np.testing.assert_allclose(base, _apply(GATED, layers.merge_lora(params, cfg)), atol=1e-6)
  for i, node in enumerate((params['encoder']['layer_0']['attention']['query'], layer['cross_attention']['value'])):
    node['lora_b'] = jax.random.normal(jax.random.PRNGKey(i), node['lora_b'].shape) * 0.5
  lora = _apply(cfg, params)
  assert float(jnp.max(jnp.abs(lora - base))) > 1e-2
  np.testing.assert_allclose(_apply(GATED, layers.merge_lora(params, cfg)), lora, atol=1e-4)


def test_remat_changes_nothing_but_memory():
  params = _params(RELU)
  loss = lambda cfg: lambda p: jnp.mean(jnp.square(_apply(cfg, p)))  # noqa: E731
  want, want_grad = jax.jit(jax.value_and_grad(loss(RELU)))(params)
  got, grad = jax.jit(jax.value_and_grad(loss(dataclasses.replace(RELU, remat='full'))))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grad, want_grad)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = dataclasses.replace(RELU, dtype=jnp.bfloat16)
  params = _params(cfg)
  logits, want = np.asarray(_apply(cfg, params)), np.asarray(_apply(RELU, params))
  stored = jax.tree_util.tree_leaves(nn.unbox(jax.eval_shape(lambda: _init(cfg))))
  assert logits.dtype == np.float32 and {x.dtype for x in stored} == {np.dtype(np.float32)}
  assert 0 < np.linalg.norm(logits - want) < 0.05 * np.linalg.norm(want)


@pytest.mark.parametrize('field,value,message', [
    ('feed_forward', 'gated-tanh', r"^feed_forward='gated-tanh': expected one of relu, gelu, gelu_new, silu, "
                                   r'gated-relu, gated-gelu, gated-gelu_new, gated-silu for T5$'),
    ('head', 'causal_lm', r"^head='causal_lm': expected one of seq2seq for T5$"),
    ('remat', 'some', r"^remat='some': expected one of none, full, dots for T5$"),
    ('relative_attention_num_buckets', 2, r'^relative_attention_num_buckets=2: expected at least 4$'),
    ('relative_attention_max_distance', 4, r'^relative_attention_max_distance=4: expected more than '
                                           r'relative_attention_num_buckets // 2 = 4$'),
])
def test_bad_configs_are_rejected(field, value, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(RELU, **{field: value})
