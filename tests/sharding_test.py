"""Mesh construction from the config, batch-size checks, and where the models' arrays land on a mesh."""

import collections
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from configs import common
from jtune import config as config_lib
from jtune import optim, sharding
from jtune import state as state_lib
from jtune.models import bert, decoder, t5


def _mesh_cfg(data=-1, fsdp=1, tensor=1):
  return config_lib.MeshConfig(data=data, fsdp=fsdp, tensor=tensor, rules=())


@pytest.mark.parametrize('sizes,expected', [
    ((-1, 1, 1), (8, 1, 1)), ((1, -1, 1), (1, 8, 1)), ((2, 2, -1), (2, 2, 2)), ((1, 2, 4), (1, 2, 4))])
def test_minus_one_fills_the_devices(sizes, expected):
  assert sharding.mesh_shape(_mesh_cfg(*sizes), 8) == expected


@pytest.mark.parametrize('sizes,needle', [
    ((-1, -1, 1), 'at most one axis'), ((3, -1, 1), 'must divide'), ((2, 2, 1), 'multiply to the 8')])
def test_bad_mesh_is_a_config_error(sizes, needle):
  with pytest.raises(config_lib.ConfigError, match=needle):
    sharding.mesh_shape(_mesh_cfg(*sizes), 8)


def test_make_mesh_uses_all_devices():
  mesh = sharding.make_mesh(_mesh_cfg(2, -1, 2))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert sharding.data_parallel_size(mesh) == 4
  assert mesh.devices.size == jax.device_count() == 8


def test_batch_size_must_divide_the_data_parallel_size():
  mesh = sharding.make_mesh(_mesh_cfg(-1, 1, 1))
  sharding.check_batch_size(16, mesh, 'train.batch_size')
  with pytest.raises(config_lib.ConfigError,
                     match=r'config.train.batch_size=12: expected a multiple of the data-parallel size 8'):
    sharding.check_batch_size(12, mesh, 'train.batch_size')


def test_global_batch_is_split_over_the_data_axes():
  mesh = sharding.make_mesh(_mesh_cfg(2, 4, 1))
  batch = sharding.global_batch({'x': np.arange(16 * 3).reshape(16, 3)}, mesh)
  assert batch['x'].shape == (16, 3)
  assert {s.data.shape for s in batch['x'].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(batch['x']), np.arange(48).reshape(16, 3))


def _bert_shapes(mesh_sizes, optimizer='adamw', rules=common.RULES, **overrides):
  cfg = bert.BertConfig(**{
      'vocab_size': 128, 'hidden_size': 48, 'num_layers': 1, 'num_heads': 12, 'intermediate_size': 96,
      'max_position_embeddings': 32, 'type_vocab_size': 2, 'layer_norm_eps': 1e-12,
      'initializer_range': 0.02, 'hidden_dropout': 0.0, 'attention_dropout': 0.0,
      'classifier_dropout': 0.0, 'num_labels': 2, **overrides})
  rules = config_lib.parse_rules(rules)
  optim_cfg = config_lib.OptimConfig(name=optimizer, learning_rate=1e-3, schedule='linear', warmup_ratio=0.0,
                                     weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0.0)
  tx = optim.optimizer(optim_cfg, optim.schedule(optim_cfg, 10))
  mesh = sharding.make_mesh(config_lib.MeshConfig(*mesh_sizes, rules=rules))
  return state_lib.shapes(bert.BertForSequenceClassification(cfg), tx, mesh, rules, seq_len=16)


def test_heads_that_do_not_divide_are_a_config_error_before_compiling():
  with pytest.raises(config_lib.ConfigError,
                     match=r"^config.mesh.tensor=8: params/bert/layer_0/attention/\w+/\w+ has 12 entries on "
                           r"its 'heads' axis, which do not split evenly over mesh axis tensor of size 8"):
    _bert_shapes((1, 1, 8))
  with pytest.raises(config_lib.ConfigError, match=r"config.mesh.fsdp=8: .* has 44 entries on its 'embed'"):
    _bert_shapes((1, 8, 1), hidden_size=44, num_heads=4)
  abstract, shardings = _bert_shapes((1, 2, 4))  # 12 heads over 4, 48 wide over 2: fine
  query = abstract.params['bert']['layer_0']['attention']['query']['kernel']
  assert query.shape == (48, 12, 4) and query.sharding.spec == PartitionSpec('fsdp', 'tensor', None)
  assert optax.tree.get(shardings.opt_state, 'mu')['bert']['layer_0']['attention']['query']['kernel'] == query.sharding


def test_adafactor_factored_moments_are_replicated_and_the_rest_sharded():
  """Adafactor's moments inherit their parameter's axis names: the row and column moments of a matrix (lower
  rank; every kernel, the 3-D attention ones included) and the [1] placeholders of a vector are replicated
  (small); the full moment of a vector is sharded like it."""
  abstract, _ = _bert_shapes((1, 2, 4), optimizer='adafactor', hidden_size=128, num_heads=4,
                             intermediate_size=256)
  get = lambda tree, *keys: functools.reduce(lambda t, k: t[k], keys, tree)  # noqa: E731
  embedding = ('bert', 'embeddings', 'word_embeddings', 'embedding')  # [128, 128]
  query = ('bert', 'layer_0', 'attention', 'query', 'kernel')  # [128, 4, 32]: a [128, 128] matrix
  bias = ('bert', 'layer_0', 'intermediate', 'bias')  # [256]
  v_row, v_col, v = (optax.tree.get(abstract.opt_state, name) for name in ('v_row', 'v_col', 'v'))
  for matrix in (embedding, query):
    for moment in (v_row, v_col):
      assert get(moment, *matrix).shape == (128,) and get(moment, *matrix).sharding.spec == PartitionSpec()
    assert get(v, *matrix).shape == (1,)
  assert get(v_row, *bias).shape == (1,) and get(v_row, *bias).sharding.spec == PartitionSpec()
  assert get(v, *bias).sharding.spec == get(abstract.params, *bias).sharding.spec == PartitionSpec('tensor')


@pytest.mark.parametrize('mesh_sizes,collectives', [
    ((2, 1, 4), {'all-reduce': 2}),  # Megatron: one reduction after attention, one after the MLP
    ((1, 1, 1), {})])
def test_tensor_parallel_layer_needs_one_reduction_per_block(mesh_sizes, collectives):
  rules = config_lib.parse_rules(common.RULES)
  cfg = bert.BertConfig(vocab_size=128, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128,
                        max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12,
                        initializer_range=0.02, hidden_dropout=0.1, attention_dropout=0.1,
                        classifier_dropout=0.1, num_labels=2)
  mesh = sharding.make_mesh(config_lib.MeshConfig(*mesh_sizes, rules=rules),
                            devices=jax.devices()[:int(np.prod(mesh_sizes))])
  layer = bert.Layer(cfg)
  x_BLD, bias_B11L = jnp.zeros((8, 16, 64)), jnp.zeros((8, 1, 1, 16))
  init = lambda: layer.init(jax.random.PRNGKey(0), x_BLD, bias_B11L, True)  # noqa: E731
  shardings = sharding.logical_shardings(jax.eval_shape(init), mesh, rules)
  with sharding.activate(mesh, rules):
    params = jax.jit(lambda: nn.unbox(init()), out_shardings=shardings)()
    x_BLD = jax.device_put(x_BLD, sharding.batch_sharding(mesh))
    hlo = jax.jit(lambda p, x: layer.apply(p, x, bias_B11L, True)).lower(params, x_BLD).compile().as_text()
  ops = re.findall(r'= \S+ (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)\S*\(', hlo)
  assert dict(collections.Counter(ops)) == collectives


@pytest.mark.parametrize('sizes', [(8, 1, 1), (2, 2, 2), (1, 1, 8)])
def test_one_process_feeds_every_row(sizes):
  assert sharding.process_rows(sharding.make_mesh(_mesh_cfg(*sizes)), 16) == slice(0, 16)


def _tiny_models():
  bert_cfg = bert.BertConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                             max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12,
                             initializer_range=0.02, hidden_dropout=0.0, attention_dropout=0.0,
                             classifier_dropout=0.0, num_labels=2)
  llama = decoder.DecoderConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                head_dim=8, intermediate_size=64, max_position_embeddings=32)
  gpt2 = decoder.DecoderConfig(**{**llama.__dict__, 'num_kv_heads': 4, 'norm': 'layer', 'positions': 'learned',
                                  'tie_embeddings': True})
  t5_cfg = t5.T5Config(vocab_size=64, hidden_size=32, num_layers=1, num_decoder_layers=1, num_heads=4, head_dim=8,
                       intermediate_size=64, relative_attention_num_buckets=8, relative_attention_max_distance=16)
  ids = np.tile(np.arange(1, 9, dtype=np.int32), (8, 1))
  ones = np.ones_like(ids)
  return {'bert': (bert.BertForSequenceClassification(bert_cfg), (ids, ones, 0 * ones)),
          'llama': (decoder.build(llama), (ids, np.tile(np.arange(8, dtype=np.int32), (8, 1)), ones)),
          'gpt2': (decoder.build(gpt2), (ids, np.tile(np.arange(8, dtype=np.int32), (8, 1)), ones)),
          't5': (t5.T5ForConditionalGeneration(t5_cfg), (ids, ones, ids))}  # the shared table, on both sides


@pytest.mark.parametrize('name', ['bert', 'llama', 'gpt2', 't5'])
def test_token_lookups_move_no_whole_batch_on_a_data_by_fsdp_mesh(name):
  """8 rows on a 2 x 4 (data x fsdp) mesh, the tables split over fsdp along their width: the gradient of the
  lookups reaches each device's rows by an all-to-all over fsdp. Unplaced, XLA gathered the whole [8, 8, 32]
  activation gradient onto every device ("Involuntary full rematerialization"): f32[8, 8, 8] on each."""
  rules = config_lib.parse_rules(common.RULES)
  model, inputs = _tiny_models()[name]
  mesh = sharding.make_mesh(config_lib.MeshConfig(2, 4, 1, rules=rules))
  init = lambda: model.init(jax.random.PRNGKey(0), *inputs, deterministic=True)['params']  # noqa: E731
  shardings = sharding.logical_shardings(jax.eval_shape(init), mesh, rules)
  loss = lambda p, *xs: model.apply({'params': p}, *xs, deterministic=True).astype(np.float32).mean()  # noqa: E731
  with sharding.activate(mesh, rules):
    params = jax.jit(lambda: nn.unbox(init()), out_shardings=nn.unbox(shardings))()
    batch = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in inputs]
    hlo = jax.jit(jax.grad(loss)).lower(params, *batch).compile().as_text()
  moved = re.findall(r'^\s*(?:ROOT )?%\S+ = (.*?) (?:all-gather|all-reduce|all-to-all|collective-permute)\S*\(', hlo,
                     re.M)
  assert moved  # the parameters' all-gathers, the gradients' reductions
  whole = [shape for shape in moved if re.search(r'f32\[8,8,\d+\]', shape)]  # all 8 rows on one device
  assert not whole, whole


@pytest.mark.parametrize('name', ['bert', 'llama', 'gpt2', 't5'])
def test_the_default_table_rules_every_logical_axis_a_model_names(name, monkeypatch):
  """A model's logical axes are its parameters' and sharding.ACTIVATION_AXES (what state.shapes warns of when a
  table leaves one out), and configs.common.RULES has a rule for each."""
  named, constrain = set(), nn.with_logical_constraint
  def recording(x, names, *args, **kwargs):
    named.update(names)
    return constrain(x, names, *args, **kwargs)
  monkeypatch.setattr(nn, 'with_logical_constraint', recording)
  model, inputs = _tiny_models()[name]
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs, deterministic=True))
  boxes = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  param_axes = {n for box in boxes if isinstance(box, nn.Partitioned) for n in box.names}
  assert set(sharding.ACTIVATION_AXES) <= named and named - {None} <= param_axes | set(sharding.ACTIVATION_AXES)
  rules = config_lib.parse_rules(common.RULES)
  assert sharding.unruled_axes(boxed, rules) == []
  assert sharding.unruled_axes(boxed, [r for r in rules if r[0] not in ('lookup_batch', 'embed')]) == [
      'embed', 'lookup_batch']


def test_a_table_that_leaves_an_axis_out_is_warned_of(caplog):
  _bert_shapes((2, 2, 2))
  assert 'has no rule' not in caplog.text
  _bert_shapes((2, 2, 2), rules=[r for r in common.RULES if r[0] not in ('lookup_batch', 'heads')])
  assert ('config.mesh.rules has no rule for the logical axes heads, lookup_batch: they are replicated on every '
          'device') in caplog.text
