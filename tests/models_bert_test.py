"""The Flax BERT: logical axis names on every parameter, golden partition specs, dropout, padding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import bert_cls
from jtune import config as config_lib
from jtune import sharding
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


def test_every_parameter_names_its_axes():
  boxed = jax.eval_shape(_init)
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  allowed = {'vocab', 'embed', 'heads', 'kv', 'mlp', 'classes', 'act_embed', None}
  for leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape)
    assert set(leaf.names) <= allowed
    named = [n for n in leaf.names if n is not None]
    assert len(named) == len(set(named))


GOLDEN_2x2x2 = {  # parameter path -> mesh partition spec on a (data=2, fsdp=2, tensor=2) mesh
    ('bert', 'embeddings', 'word_embeddings', 'embedding'): P('tensor', 'fsdp'),
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


def test_golden_partition_specs():
  rules = config_lib.parse_rules(bert_cls.DEFAULT_RULES)
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=2, fsdp=2, tensor=2, rules=rules))
  shardings = sharding.logical_shardings(jax.eval_shape(_init), mesh, rules)
  for path, spec in GOLDEN_2x2x2.items():
    node = shardings
    for key in path:
      node = node[key]
    assert node.spec == spec, path


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
