"""The Flax BERT: logical axis names on every parameter, golden partition specs, dropout, padding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from configs import common
from jtune.models import bert

CFG = bert.BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      max_position_embeddings=32, type_vocab_size=2, layer_norm_eps=1e-12,
                      initializer_range=0.02, hidden_dropout=0.1, attention_dropout=0.1,
                      classifier_dropout=0.1, num_labels=3)
MODEL = bert.BertForSequenceClassification(CFG)
IDS = np.array([[2, 5, 9, 11, 3, 0, 0, 0], [2, 7, 8, 3, 0, 0, 0, 0]], np.int32)
MASK = (IDS > 0).astype(np.int32)
TYPES = np.zeros_like(IDS)


def _init():
  return MODEL.init(jax.random.PRNGKey(0), IDS, MASK, TYPES, deterministic=True)['params']


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_every_parameter_names_its_axes():
  boxed = jax.eval_shape(_init)
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  allowed = {'vocab', 'embed', 'heads', 'kv', 'mlp', 'classes', 'length', 'act_embed', None}
  for leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape)
    assert set(leaf.names) <= allowed
    named = [n for n in leaf.names if n is not None]
    assert len(named) == len(set(named))


GOLDEN_LOGICAL = {  # parameter path -> (shape, logical spec)
    ('bert', 'embeddings', 'word_embeddings', 'embedding'): ((64, 32), P('vocab', 'embed')),
    ('bert', 'embeddings', 'position_embeddings', 'embedding'): ((32, 32), P(None, 'embed')),
    ('bert', 'embeddings', 'token_type_embeddings', 'embedding'): ((2, 32), P(None, 'embed')),
    ('bert', 'embeddings', 'LayerNorm', 'scale'): ((32,), P('embed')),
    ('bert', 'layer_0', 'attention', 'query', 'kernel'): ((32, 4, 8), P('embed', 'heads', 'kv')),
    ('bert', 'layer_0', 'attention', 'value', 'bias'): ((4, 8), P('heads', 'kv')),
    ('bert', 'layer_0', 'attention', 'output', 'kernel'): ((4, 8, 32), P('heads', 'kv', 'embed')),
    ('bert', 'layer_0', 'attention', 'output', 'bias'): ((32,), P('embed')),
    ('bert', 'layer_0', 'attention_LayerNorm', 'bias'): ((32,), P('embed')),
    ('bert', 'layer_1', 'intermediate', 'kernel'): ((32, 64), P('embed', 'mlp')),
    ('bert', 'layer_1', 'intermediate', 'bias'): ((64,), P('mlp')),
    ('bert', 'layer_1', 'output', 'kernel'): ((64, 32), P('mlp', 'embed')),
    ('bert', 'layer_1', 'output_LayerNorm', 'scale'): ((32,), P('embed')),
    ('bert', 'pooler', 'kernel'): ((32, 32), P('embed', 'act_embed')),
    ('classifier', 'kernel'): ((32, 3), P('embed', 'classes')),
    ('classifier', 'bias'): ((3,), P('classes')),
}


def test_golden_logical_specs():
  boxed = jax.eval_shape(_init)
  specs = nn.get_partition_spec(boxed)
  shapes = nn.unbox(boxed)
  for path, (shape, spec) in GOLDEN_LOGICAL.items():
    assert (_at(shapes, path).shape, _at(specs, path)) == (shape, spec), path
  assert sorted(boxed['bert']) == ['embeddings', 'layer_0', 'layer_1', 'pooler']
  assert len(jax.tree_util.tree_leaves(shapes)) == 5 + 16 * 2 + 2 + 2


GOLDEN_2x2x2 = {  # parameter path -> mesh partition spec on a (data=2, fsdp=2, tensor=2) mesh
    ('bert', 'embeddings', 'word_embeddings', 'embedding'): P(None, 'fsdp'),  # vocab stays whole
    ('bert', 'embeddings', 'position_embeddings', 'embedding'): P(None, 'fsdp'),
    ('bert', 'embeddings', 'LayerNorm', 'scale'): P('fsdp'),
    ('bert', 'layer_0', 'attention', 'query', 'kernel'): P('fsdp', 'tensor', None),
    ('bert', 'layer_0', 'attention', 'query', 'bias'): P('tensor', None),
    ('bert', 'layer_0', 'attention', 'output', 'kernel'): P('tensor', None, 'fsdp'),
    ('bert', 'layer_0', 'intermediate', 'kernel'): P('fsdp', 'tensor'),
    ('bert', 'layer_0', 'intermediate', 'bias'): P('tensor'),
    ('bert', 'layer_1', 'output', 'kernel'): P('tensor', 'fsdp'),
    ('bert', 'pooler', 'kernel'): P('fsdp', None),
    ('classifier', 'kernel'): P('fsdp', None),
}


def _mesh_2x2x2() -> Mesh:
  return Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ('data', 'fsdp', 'tensor'))


def test_golden_partition_specs():
  specs = nn.get_partition_spec(jax.eval_shape(_init))
  shardings = nn.logical_to_mesh_sharding(specs, _mesh_2x2x2(), common.RULES)
  for path, spec in GOLDEN_2x2x2.items():
    assert _at(shardings, path).spec == spec, path


def test_init_like_hugging_face():
  params = nn.unbox(_init())
  word = params['bert']['embeddings']['word_embeddings']['embedding']
  assert 0.015 < float(jnp.std(word)) < 0.025
  assert 0.01 < float(jnp.std(params['classifier']['kernel'])) < 0.03
  np.testing.assert_array_equal(params['classifier']['bias'], 0)
  np.testing.assert_array_equal(params['bert']['layer_0']['attention']['query']['bias'], 0)
  np.testing.assert_array_equal(params['bert']['layer_1']['output_LayerNorm']['scale'], 1)


def test_output_shapes():
  params = nn.unbox(_init())
  hidden, pooled = bert.BertModel(CFG).apply({'params': params['bert']}, IDS, MASK, TYPES,
                                             deterministic=True)
  assert hidden.shape == (2, 8, 32) and pooled.shape == (2, 32)
  logits = MODEL.apply({'params': params}, IDS, MASK, TYPES, deterministic=True)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32


def test_activation_constraints_under_mesh_and_rules():
  params = nn.unbox(_init())
  want = MODEL.apply({'params': params}, IDS, MASK, TYPES, deterministic=True)
  run = jax.jit(lambda p: MODEL.apply({'params': p}, IDS, MASK, TYPES, deterministic=True))
  with jax.set_mesh(_mesh_2x2x2()), nn.logical_axis_rules(common.RULES):
    hlo = run.lower(params).as_text()
    got = run(params)
  assert 'sharding' in hlo  # the logical constraints became real sharding annotations
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_dropout_only_in_training():
  params = nn.unbox(_init())
  run = lambda det, seed: MODEL.apply({'params': params}, IDS, MASK, TYPES, deterministic=det,  # noqa: E731
                                      rngs={'dropout': jax.random.PRNGKey(seed)})
  np.testing.assert_array_equal(run(True, 0), run(True, 1))
  assert not np.allclose(run(False, 0), run(False, 1))
  assert run(True, 0).dtype == jnp.float32 and run(True, 0).shape == (2, 3)


def test_padding_does_not_change_real_positions():
  params = nn.unbox(_init())['bert']
  hidden, _ = bert.BertModel(CFG).apply({'params': params}, IDS, MASK, TYPES, deterministic=True)
  garbage = np.where(MASK > 0, IDS, 17)  # other tokens at padded positions
  hidden2, _ = bert.BertModel(CFG).apply({'params': params}, garbage, MASK, TYPES, deterministic=True)
  real = MASK[..., None] > 0
  np.testing.assert_allclose(np.asarray(hidden) * real, np.asarray(hidden2) * real, atol=1e-6)


@pytest.mark.parametrize('dtype', [jnp.bfloat16])
def test_compute_dtype_keeps_float32_params(dtype):
  model = bert.BertForSequenceClassification(bert.BertConfig(**{**CFG.__dict__, 'dtype': dtype}))
  params = nn.unbox(model.init(jax.random.PRNGKey(0), IDS, MASK, TYPES, deterministic=True)['params'])
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  hidden, _ = bert.BertModel(model.cfg).apply({'params': params['bert']}, IDS, MASK, TYPES,
                                              deterministic=True)
  assert hidden.dtype == dtype


LORA = bert.BertConfig(**{**CFG.__dict__, 'lora_rank': 4, 'lora_alpha': 8.0})


def test_lora_adapters_sit_only_on_the_targets_and_merge_exactly():
  model = bert.BertModel(LORA)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), IDS, MASK, TYPES, deterministic=True)['params'])
  attention = params['layer_0']['attention']
  assert {k for k, v in attention.items() if 'lora_a' in v} == {'query', 'value'}
  assert attention['query']['lora_a'].shape == (32, 4) and attention['query']['lora_b'].shape == (4, 4, 8)
  base, _ = model.apply({'params': params}, IDS, MASK, TYPES, deterministic=True)
  np.testing.assert_array_equal(attention['query']['lora_b'], 0)  # B = 0: training starts from the base model
  for name in ('query', 'value'):
    attention[name]['lora_b'] = jax.random.normal(jax.random.PRNGKey(1), (4, 4, 8)) * 0.5
  with_lora, _ = model.apply({'params': params}, IDS, MASK, TYPES, deterministic=True)
  plain = bert.BertModel(bert.BertConfig(**{**LORA.__dict__, 'lora_rank': 0}))
  merged, _ = plain.apply({'params': bert.merge_lora(params, LORA)}, IDS, MASK, TYPES, deterministic=True)
  assert float(jnp.max(jnp.abs(with_lora - base))) > 1e-2  # the adapters change the output ...
  np.testing.assert_allclose(merged, with_lora, atol=1e-5)  # ... and merging them changes nothing
  assert 'lora_a' not in bert.merge_lora(params, LORA)['layer_0']['attention']['query']
