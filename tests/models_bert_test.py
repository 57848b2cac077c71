"""The Flax BERT: logical axis names on every parameter, golden partition specs, dropout, padding."""

import dataclasses
import re

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


def _family(family: str, head: str = 'sequence', **overrides) -> bert.BertConfig:
  extra = {'roberta': {'pad_token_id': 1, 'type_vocab_size': 1}, 'distilbert': {'type_vocab_size': 0}}
  return bert.BertConfig(**{**CFG.__dict__, 'family': family, 'head': head, **extra.get(family, {}), **overrides})


def _family_init(cfg):
  return bert.build(cfg).init(jax.random.PRNGKey(0), IDS, MASK, TYPES, deterministic=True)['params']


HEAD_SPECS = {  # (family, head) -> {head parameter path: (shape, logical spec)}; no pooler outside BERT's 'sequence'
    ('bert', 'token'): {('classifier', 'kernel'): ((32, 3), P('embed', 'classes'))},
    ('bert', 'qa'): {('qa_outputs', 'kernel'): ((32, 2), P('embed', 'classes'))},
    ('roberta', 'sequence'): {('classifier', 'dense', 'kernel'): ((32, 32), P('embed', 'act_embed')),
                              ('classifier', 'out_proj', 'kernel'): ((32, 3), P('embed', 'classes')),
                              ('classifier', 'out_proj', 'bias'): ((3,), P('classes'))},
    ('roberta', 'qa'): {('qa_outputs', 'bias'): ((2,), P('classes'))},
    ('distilbert', 'sequence'): {('pre_classifier', 'kernel'): ((32, 32), P('embed', 'act_embed')),
                                 ('classifier', 'kernel'): ((32, 3), P('embed', 'classes'))},
    ('distilbert', 'token'): {('classifier', 'bias'): ((3,), P('classes'))},
}


@pytest.mark.parametrize('family,head', list(HEAD_SPECS))
def test_family_heads_name_their_axes_like_hugging_face(family, head):
  cfg = _family(family, head)
  boxed = jax.eval_shape(lambda: _family_init(cfg))
  specs, shapes = nn.get_partition_spec(boxed), nn.unbox(boxed)
  for path, (shape, spec) in HEAD_SPECS[family, head].items():
    assert (_at(shapes, path).shape, _at(specs, path)) == (shape, spec), path
  assert sorted(boxed) == sorted({family} | {path[0] for path in HEAD_SPECS[family, head]})
  want = ['embeddings', 'layer_0', 'layer_1']
  assert sorted(boxed[family]) == want  # the same sub-names for every family; no pooler
  embeddings = sorted(boxed[family]['embeddings'])
  assert ('token_type_embeddings' in embeddings) == (family != 'distilbert')
  assert _at(specs, (family, 'layer_1', 'attention', 'query', 'kernel')) == P('embed', 'heads', 'kv')
  allowed = {'vocab', 'embed', 'heads', 'kv', 'mlp', 'classes', 'act_embed', None}
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) and set(x.names) <= allowed for x in leaves)


@pytest.mark.parametrize('family', ['bert', 'roberta', 'distilbert'])
@pytest.mark.parametrize('head', ['sequence', 'token', 'qa'])
def test_head_outputs_and_dropout(family, head):
  cfg = _family(family, head)
  model = bert.build(cfg)
  params = nn.unbox(_family_init(cfg))
  run = lambda det, seed: model.apply({'params': params}, IDS, MASK, TYPES, deterministic=det,  # noqa: E731
                                      rngs={'dropout': jax.random.PRNGKey(seed)})
  out = run(True, 0)
  assert out.shape == {'sequence': (2, 3), 'token': (2, 8, 3), 'qa': (2, 8, 2)}[head]
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, run(True, 1))
  assert not np.allclose(run(False, 0), run(False, 1))


def test_distilbert_ignores_token_types_and_roberta_counts_positions_from_pad():
  cfg = _family('distilbert')
  params = nn.unbox(_family_init(cfg))
  two = bert.build(cfg).apply({'params': params}, IDS, MASK, deterministic=True)
  three = bert.build(cfg).apply({'params': params}, IDS, MASK, np.ones_like(TYPES), deterministic=True)
  np.testing.assert_array_equal(two, three)
  roberta = _family('roberta')
  ids = np.where(MASK > 0, IDS, 1)
  np.testing.assert_array_equal(bert.position_ids(ids, roberta)[1], [2, 3, 4, 5, 1, 1, 1, 1])
  np.testing.assert_array_equal(bert.position_ids(ids, CFG)[0], np.arange(8))
  assert roberta.max_length == CFG.max_position_embeddings - 2 and CFG.max_length == CFG.max_position_embeddings


def test_padding_does_not_change_real_positions_in_roberta():
  cfg = _family('roberta')
  ids = np.where(MASK > 0, IDS, 1)
  params = nn.unbox(_family_init(cfg))
  run = lambda x: bert.build(cfg).apply({'params': params}, x, MASK, TYPES, deterministic=True)  # noqa: E731
  np.testing.assert_allclose(run(ids), run(np.where(MASK > 0, IDS, 17)), atol=1e-6)


def test_lora_targets_match_every_family():
  cfg = _family('roberta', 'token', lora_rank=4)
  params = nn.unbox(_family_init(cfg))
  attention = params['roberta']['layer_1']['attention']
  assert {k for k, v in attention.items() if 'lora_a' in v} == {'query', 'value'}
  assert 'lora_a' not in params['classifier']


def test_bad_family_head_and_module_are_rejected():
  with pytest.raises(ValueError, match=r"^family='electra': expected one of bert, roberta, distilbert$"):
    _family('electra')
  with pytest.raises(ValueError, match=r"^head='causal_lm': expected one of sequence, token, qa"):
    _family('bert', 'causal_lm')
  with pytest.raises(ValueError, match=r"^head='token' in the model config: expected 'sequence'"):
    bert.BertForSequenceClassification(_family('bert', 'token')).init(
        jax.random.PRNGKey(0), IDS, MASK, TYPES, deterministic=True)
  assert isinstance(bert.build(_family('distilbert', 'qa')), bert.BertForQuestionAnswering)


@pytest.mark.parametrize('family', ['bert', 'roberta', 'distilbert'])
@pytest.mark.parametrize('variant', [{}, {'remat': 'dots'}, {'scan_layers': True}, {'num_layers': 1}])
def test_first_only_last_layer_gives_the_first_position_and_its_gradients(family, variant):
  cfg = dataclasses.replace(_family(family), hidden_dropout=0.0, attention_dropout=0.0, **variant)
  backbone = bert.BertModel(cfg)
  params = nn.unbox(backbone.init(jax.random.PRNGKey(0), IDS, MASK, TYPES, deterministic=True))['params']
  weights = jax.random.normal(jax.random.PRNGKey(1), (2, cfg.hidden_size))

  def first(p, first_only):
    x_BLD, _ = backbone.apply({'params': p}, IDS, MASK, TYPES, deterministic=True, first_only=first_only)
    assert x_BLD.shape[1] == (1 if first_only else IDS.shape[1])
    return x_BLD[:, 0]

  np.testing.assert_allclose(first(params, True), first(params, False), atol=1e-5)
  grads = [jax.grad(lambda p, f=f: jnp.sum(weights * first(p, f)))(params) for f in (True, False)]
  # gradients reach ~100 here: f32 rounding of a different summation order is relative to that
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *grads)
  last = f'layer_{cfg.num_layers - 1}'
  assert np.abs(grads[0][last]['attention']['query']['kernel']).max() > 0  # the first position's query trains


def test_token_types_are_looked_up_without_a_scatter_in_the_backward():
  """Token types (two rows, every token on one of them) by a one-hot product: the same values and gradient as a
  gather, and no scatter-add onto the two rows in the backward (on a GPU a scatter of B * L rows onto two
  serialises its atomic adds)."""
  types = np.array([[0, 1, 1, 0, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]], np.int32)
  gather, one_hot = (cls(2, 32, embedding_init=nn.initializers.normal(1.0)) for cls in (nn.Embed, bert.OneHotEmbed))
  variables = gather.init(jax.random.PRNGKey(1), types)
  weights = jnp.arange(2 * 8 * 32, dtype=jnp.float32).reshape(2, 8, 32)
  outs = [jax.value_and_grad(lambda v, m=m: jnp.sum(m.apply(v, types) * weights))(variables) for m in (gather, one_hot)]
  np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-6)
  np.testing.assert_allclose(outs[1][1]['params']['embedding'], outs[0][1]['params']['embedding'], rtol=1e-6)

  loss = lambda p: jnp.sum(MODEL.apply({'params': p}, IDS, MASK, types, deterministic=True) ** 2)  # noqa: E731
  hlo = jax.jit(jax.grad(loss)).lower(_init()).as_text(dialect='hlo')
  scattered = re.findall(r'= (f32\[[0-9,]+\])\S* scatter\(', hlo)
  assert sorted(scattered) == ['f32[32,32]', 'f32[64,32]'], scattered  # the position and word tables alone


def test_attend_is_softmax_attention_per_head_with_the_mask_and_the_dropped_probabilities():
  """bert.attend (products on heads-first copies) against the formula written per batch row and head in numpy:
  padded keys get no weight, and `dropout` acts on the probabilities before they weigh the values."""
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, 5, 3, 4)).astype(np.float32) for _ in range(3))
  keep = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
  bias = np.where(keep, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None, None, :]
  drop = rng.random((2, 3, 5, 5)) > 0.3
  out = bert.attend(q, k, v, bias, lambda p: jnp.where(drop, p / 0.7, 0.0))
  assert out.shape == (2, 5, 3, 4)
  for b in range(2):
    for h in range(3):
      scores = q[b, :, h] @ k[b, :, h].T + bias[b, 0]
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      assert np.all(probs[:, keep[b] == 0] == 0)
      np.testing.assert_allclose(out[b, :, h], np.where(drop[b, h], probs / 0.7, 0) @ v[b, :, h], rtol=1e-5, atol=1e-6)
