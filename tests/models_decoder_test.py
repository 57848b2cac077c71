"""The Flax decoder: logical axis names on every parameter, golden partition specs, sharded forward, remat,
dropout, LoRA, the KV cache against the full forward, and config errors."""

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from configs import common
from jtune.models import decoder, layers

LLAMA = decoder.DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                              intermediate_size=64, max_position_embeddings=32, initializer_range=0.2)
GPT2 = dataclasses.replace(LLAMA, num_kv_heads=4, norm='layer', norm_eps=1e-5, positions='learned', mlp='gelu_new',
                           attention_bias=True, output_bias=True, tie_embeddings=True, embedding_dropout=0.1,
                           attention_dropout=0.1, hidden_dropout=0.1)
IDS = np.array([[2, 5, 9, 11, 3, 7, 0, 0], [2, 7, 8, 3, 4, 6, 9, 1]], np.int32)
SEGMENTS = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 2, 2, 2, 2, 2]], np.int32)
POSITIONS = np.array([[0, 1, 2, 3, 4, 5, 0, 0], [0, 1, 2, 0, 1, 2, 3, 4]], np.int32)


def _init(cfg):
  return decoder.build(cfg).init(jax.random.PRNGKey(0), IDS, POSITIONS, SEGMENTS, deterministic=True)['params']


def _apply(cfg, params, **kwargs):
  kwargs = {'deterministic': True, **kwargs}
  return decoder.build(cfg).apply({'params': params}, IDS, POSITIONS, SEGMENTS, **kwargs)


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


ALLOWED = {'vocab', 'embed', 'heads', 'kv_heads', 'kv', 'mlp', None}


@pytest.mark.parametrize('cfg', [LLAMA, GPT2], ids=['llama', 'gpt2'])
def test_every_parameter_names_its_axes(cfg):
  boxed = jax.eval_shape(lambda: _init(cfg))
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= ALLOWED
    named = [n for n in leaf.names if n is not None]
    assert len(named) == len(set(named))


GOLDEN_LLAMA = {  # parameter path -> (shape, logical spec, mesh spec on (data=2, fsdp=2, tensor=2))
    ('decoder', 'embed_tokens', 'embedding'): ((64, 32), P('vocab', 'embed'), P(None, 'fsdp')),
    ('decoder', 'layer_0', 'attention_norm', 'scale'): ((32,), P('embed'), P('fsdp')),
    ('decoder', 'layer_0', 'attention', 'query', 'kernel'): ((32, 4, 8), P('embed', 'heads', 'kv'),
                                                             P('fsdp', 'tensor', None)),
    ('decoder', 'layer_0', 'attention', 'key', 'kernel'): ((32, 2, 8), P('embed', 'kv_heads', 'kv'),
                                                           P('fsdp', 'tensor', None)),
    ('decoder', 'layer_1', 'attention', 'value', 'kernel'): ((32, 2, 8), P('embed', 'kv_heads', 'kv'),
                                                             P('fsdp', 'tensor', None)),
    ('decoder', 'layer_1', 'attention', 'output', 'kernel'): ((4, 8, 32), P('heads', 'kv', 'embed'),
                                                              P('tensor', None, 'fsdp')),
    ('decoder', 'layer_1', 'mlp_norm', 'scale'): ((32,), P('embed'), P('fsdp')),
    ('decoder', 'layer_1', 'mlp', 'gate', 'kernel'): ((32, 64), P('embed', 'mlp'), P('fsdp', 'tensor')),
    ('decoder', 'layer_1', 'mlp', 'up', 'kernel'): ((32, 64), P('embed', 'mlp'), P('fsdp', 'tensor')),
    ('decoder', 'layer_1', 'mlp', 'down', 'kernel'): ((64, 32), P('mlp', 'embed'), P('tensor', 'fsdp')),
    ('decoder', 'final_norm', 'scale'): ((32,), P('embed'), P('fsdp')),
    ('lm_head', 'kernel'): ((32, 64), P('embed', 'vocab'), P('fsdp', None)),
}
GOLDEN_GPT2 = {
    ('decoder', 'position_embeddings', 'embedding'): ((32, 32), P(None, 'embed'), P(None, 'fsdp')),
    ('decoder', 'layer_0', 'attention_norm', 'bias'): ((32,), P('embed'), P('fsdp')),
    ('decoder', 'layer_0', 'attention', 'key', 'kernel'): ((32, 4, 8), P('embed', 'kv_heads', 'kv'),
                                                           P('fsdp', 'tensor', None)),
    ('decoder', 'layer_0', 'attention', 'query', 'bias'): ((4, 8), P('heads', 'kv'), P('tensor', None)),
    ('decoder', 'layer_0', 'attention', 'key', 'bias'): ((4, 8), P('kv_heads', 'kv'), P('tensor', None)),
    ('decoder', 'layer_0', 'attention', 'output', 'bias'): ((32,), P('embed'), P('fsdp')),
    ('decoder', 'layer_1', 'mlp', 'up', 'bias'): ((64,), P('mlp'), P('tensor')),
    ('decoder', 'layer_1', 'mlp', 'down', 'bias'): ((32,), P('embed'), P('fsdp')),
}


def _mesh_2x2x2() -> Mesh:
  return Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ('data', 'fsdp', 'tensor'))


@pytest.mark.parametrize('cfg,golden', [(LLAMA, GOLDEN_LLAMA), (GPT2, GOLDEN_GPT2)], ids=['llama', 'gpt2'])
def test_golden_logical_and_mesh_specs(cfg, golden):
  boxed = jax.eval_shape(lambda: _init(cfg))
  specs, shapes = nn.get_partition_spec(boxed), nn.unbox(boxed)
  shardings = nn.logical_to_mesh_sharding(specs, _mesh_2x2x2(), common.RULES)
  for path, (shape, logical, mesh_spec) in golden.items():
    assert (_at(shapes, path).shape, _at(specs, path), _at(shardings, path).spec) == (shape, logical, mesh_spec), path


def test_parameter_trees():
  llama, gpt2 = jax.eval_shape(lambda: _init(LLAMA)), jax.eval_shape(lambda: _init(GPT2))
  assert sorted(llama) == ['decoder', 'lm_head'] and sorted(gpt2) == ['decoder']  # GPT-2's head is tied
  assert sorted(llama['decoder']) == ['embed_tokens', 'final_norm', 'layer_0', 'layer_1']
  assert sorted(gpt2['decoder']) == ['embed_tokens', 'final_norm', 'layer_0', 'layer_1', 'position_embeddings']
  assert sorted(llama['decoder']['layer_0']) == ['attention', 'attention_norm', 'mlp', 'mlp_norm']
  assert sorted(llama['decoder']['layer_0']['mlp']) == ['down', 'gate', 'up']
  assert sorted(gpt2['decoder']['layer_0']['mlp']) == ['down', 'up']
  assert sorted(llama['decoder']['layer_0']['attention']['query']) == ['kernel']  # no biases in Llama
  assert len(jax.tree_util.tree_leaves(nn.unbox(llama))) == 1 + 2 * 9 + 1 + 1
  assert len(jax.tree_util.tree_leaves(nn.unbox(gpt2))) == 2 + 2 * 16 + 2


@pytest.mark.parametrize('cfg', [LLAMA, GPT2], ids=['llama', 'gpt2'])
def test_sharded_forward_matches_unsharded(cfg):
  params = nn.unbox(_init(cfg))
  want = _apply(cfg, params)
  boxed = jax.eval_shape(lambda: _init(cfg))
  mesh = _mesh_2x2x2()
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, common.RULES)
  run = jax.jit(lambda p: _apply(cfg, p))
  with jax.set_mesh(mesh), nn.logical_axis_rules(common.RULES):
    placed = jax.device_put(params, shardings)
    hlo = run.lower(placed).as_text()
    got = run(placed)
  assert 'sharding' in hlo
  query = placed['decoder']['layer_0']['attention']['query']['kernel']
  assert {s.data.shape for s in query.addressable_shards} == {(16, 2, 8)}  # embed / fsdp, heads / tensor
  assert got.shape == (2, 8, 64) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_tied_head_uses_the_embeddings():
  params = nn.unbox(_init(GPT2))
  hidden, _ = decoder.Decoder(GPT2).apply({'params': params['decoder']}, IDS, POSITIONS, SEGMENTS, True)
  want = np.einsum('bld,vd->blv', hidden, params['decoder']['embed_tokens']['embedding'])
  np.testing.assert_allclose(_apply(GPT2, params), want, atol=1e-5)


@pytest.mark.parametrize('cfg', [LLAMA, GPT2], ids=['llama', 'gpt2'])
def test_cache_prefill_and_steps_match_the_full_forward(cfg):
  params = nn.unbox(_init(cfg))
  want = np.asarray(_apply(cfg, params))
  model = decoder.build(cfg)
  cache = decoder.init_cache(cfg, 2, 10)
  got, cache = model.apply({'params': params}, IDS[:, :5], POSITIONS[:, :5], SEGMENTS[:, :5], cache, 0,
                           method='decode')
  last, last_cache = model.apply({'params': params}, IDS[:, :5], POSITIONS[:, :5], SEGMENTS[:, :5],
                                 decoder.init_cache(cfg, 2, 10), 0, last_only=True, method='decode')
  assert last.shape == (2, 1, 64)  # a prefill's head at the last prompt token only, the same cache
  np.testing.assert_allclose(last, got[:, -1:], atol=1e-6)
  jax.tree_util.tree_map(np.testing.assert_array_equal, last_cache, cache)
  pieces = [got]
  for t in range(5, 8):
    logits, cache = model.apply({'params': params}, IDS[:, t:t + 1], POSITIONS[:, t:t + 1],
                                SEGMENTS[:, t:t + 1], cache, t, method='decode')
    pieces.append(logits)
  real = SEGMENTS > 0
  np.testing.assert_allclose(np.concatenate(pieces, axis=1)[real], want[real], atol=1e-5)
  np.testing.assert_array_equal(cache['segment_ids'], np.pad(SEGMENTS, ((0, 0), (0, 2))))


@pytest.mark.parametrize('cfg', [LLAMA, GPT2], ids=['llama', 'gpt2'])
def test_the_head_at_the_target_positions_gives_the_full_heads_loss(cfg):
  """DecoderForCausalLM at `target_positions` (batching's compaction of the targets) against every position: the
  same logits there, the same causal-LM loss and gradient as the full [B, L, V] logits with [B, L] targets."""
  from jtune.data import features  # pylint: disable=g-import-not-at-top
  from jtune.tasks import causal_lm  # pylint: disable=g-import-not-at-top
  targets = np.full(IDS.shape, features.IGNORE, np.int32)
  targets[0, 3:6] = [4, 8, 1]  # row 0: a response of three tokens; row 1: two answers in two segments
  targets[1, [2, 6, 7]] = [9, 5, 1]
  positions, compact = features.compact(targets, 4)
  np.testing.assert_array_equal(positions, [[3, 4, 5, 0], [2, 6, 7, 0]])
  np.testing.assert_array_equal(compact, [[4, 8, 1, features.IGNORE], [9, 5, 1, features.IGNORE]])
  params = _init(cfg)
  weights = np.array([1.0, 0.5], np.float32)

  def loss(p, at_positions):
    logits = decoder.build(cfg).apply({'params': p}, IDS, POSITIONS, SEGMENTS, positions if at_positions else None,
                                      deterministic=True)
    total, count = causal_lm.loss_sums(logits, {'targets': compact if at_positions else targets, 'weights': weights})
    return total / count, logits

  (ours, logits_p), grad_p = jax.value_and_grad(loss, has_aux=True)(params, True)
  (full, logits_l), grad_l = jax.value_and_grad(loss, has_aux=True)(params, False)
  assert logits_p.shape == (2, 4, 64) and logits_l.shape == (2, 8, 64)
  np.testing.assert_allclose(logits_p, np.take_along_axis(np.asarray(logits_l), positions[:, :, None], 1), atol=1e-5)
  assert float(ours) == pytest.approx(float(full), rel=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(grad_p), jax.tree_util.tree_leaves(grad_l)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def _chunked_loss(cfg, chunks, smoothing=0.0, target_positions=None, targets=None):
  """The mean causal-LM loss of `cfg` with lm_head_chunks=`chunks`, as a function of the parameters."""
  from jtune.data import features  # pylint: disable=g-import-not-at-top
  from jtune.tasks import causal_lm  # pylint: disable=g-import-not-at-top
  if targets is None:
    targets = np.roll(IDS, -1, axis=1).astype(np.int32)
    targets[0, 5:] = features.IGNORE  # the end of an example and the padding: nothing to predict
    targets[1, 2] = features.IGNORE
  model = decoder.build(dataclasses.replace(cfg, lm_head_chunks=chunks))
  weights = np.array([1.0, 0.5], np.float32)

  def loss(params):
    out = model.apply({'params': params}, IDS, POSITIONS, SEGMENTS, target_positions, deterministic=True)
    total, count = causal_lm.loss_sums(out, {'targets': targets, 'weights': weights}, smoothing)
    return total / count
  return loss


@pytest.mark.parametrize('cfg', [LLAMA, GPT2], ids=['llama', 'gpt2'])  # the head's kernel, and tied (GPT-2)
@pytest.mark.parametrize('chunks,smoothing', [(2, 0.0), (3, 0.1), (8, 0.0)])
def test_the_head_in_slices_gives_the_whole_heads_loss_and_gradient(cfg, chunks, smoothing):
  """lm_head_chunks: the model hands the loss its head's inputs (layers.HeadInputs), the loss applies the head to
  `chunks` slices of the 8 positions (3: padded to 9); the same loss and gradient as the [B, L, V] logits."""
  params = nn.unbox(_init(cfg))
  want, want_grad = jax.value_and_grad(_chunked_loss(cfg, 1, smoothing))(params)
  loss = _chunked_loss(cfg, chunks, smoothing)
  out = decoder.build(dataclasses.replace(cfg, lm_head_chunks=chunks)).apply(
      {'params': params}, IDS, POSITIONS, SEGMENTS, deterministic=True)
  assert isinstance(out, layers.HeadInputs) and out.x_BLD.shape == (2, 8, 32) and out.tied == cfg.tie_embeddings
  np.testing.assert_allclose(out.logits(out.x_BLD), _apply(cfg, params), atol=1e-5)
  got, grad = jax.jit(jax.value_and_grad(loss))(params)
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  assert float(jax.jit(loss)(params)) == pytest.approx(float(want), rel=1e-6)  # undifferentiated (eval)
  for path, (a, b) in zip(jax.tree_util.tree_leaves_with_path(grad), zip(
      jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(want_grad))):
    np.testing.assert_allclose(a, b, atol=2e-6, err_msg=jax.tree_util.keystr(path[0]))


def test_the_head_in_slices_at_target_positions_on_a_mesh():
  """Sliced at the target positions (P = 4 of 8), sharded on a 2 x 2 x 2 mesh: the loss and gradient of the
  unsharded whole head; in bfloat16 too, within its precision."""
  from jtune.data import features  # pylint: disable=g-import-not-at-top
  targets = np.full(IDS.shape, features.IGNORE, np.int32)
  targets[0, 3:6] = [4, 8, 1]
  targets[1, [2, 6, 7]] = [9, 5, 1]
  positions, compact = features.compact(targets, 4)
  params = nn.unbox(_init(LLAMA))
  boxed = jax.eval_shape(lambda: _init(LLAMA))
  mesh = _mesh_2x2x2()
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, common.RULES)
  for cfg, atol in ((LLAMA, 2e-6), (dataclasses.replace(LLAMA, dtype=jnp.bfloat16), 3e-2)):
    want, want_grad = jax.value_and_grad(_chunked_loss(cfg, 1, targets=targets))(params)
    loss = _chunked_loss(cfg, 2, target_positions=positions, targets=compact)
    with jax.set_mesh(mesh), nn.logical_axis_rules(common.RULES):
      got, grad = jax.jit(jax.value_and_grad(loss))(jax.device_put(params, shardings))
    assert float(got) == pytest.approx(float(want), abs=atol)
    for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(want_grad)):
      np.testing.assert_allclose(a, b, atol=atol)
    assert {x.dtype for x in jax.tree_util.tree_leaves(grad)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize('cfg', [LLAMA, GPT2], ids=['llama', 'gpt2'])
@pytest.mark.parametrize('mesh_shape', [(4, 1, 1), (1, 4, 1)], ids=['data', 'fsdp'])
def test_the_sliced_heads_weight_gradient_is_reduced_over_the_batch_once(cfg, mesh_shape):
  """4 rows over 4 devices (data or fsdp): the weight gradient accumulates per device over the slices and is
  reduced once, after the loop, which holds no collective (a carry replicated over the batch axes would be
  all-reduced in every slice); the loss and gradient of the whole head, unsharded."""
  from jtune.data import features  # pylint: disable=g-import-not-at-top
  from jtune.tasks import causal_lm  # pylint: disable=g-import-not-at-top
  ids, segments, positions = (np.tile(a, (2, 1)) for a in (IDS, SEGMENTS, POSITIONS))
  targets = np.roll(ids, -1, axis=1).astype(np.int32)
  targets[[0, 2], 5:] = features.IGNORE
  batch = {'targets': targets, 'weights': np.array([1.0, 0.5, 0.25, 2.0], np.float32)}

  def loss(chunks):
    model = decoder.build(dataclasses.replace(cfg, lm_head_chunks=chunks))
    def mean(params):
      out = model.apply({'params': params}, ids, positions, segments, deterministic=True)
      total, count = causal_lm.loss_sums(out, batch)
      return total / count
    return mean

  params = nn.unbox(_init(cfg))
  want, want_grad = jax.value_and_grad(loss(1))(params)
  mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(mesh_shape), ('data', 'fsdp', 'tensor'))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(jax.eval_shape(lambda: _init(cfg))), mesh,
                                          common.RULES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(common.RULES):
    step = jax.jit(jax.value_and_grad(loss(4))).lower(jax.device_put(params, shardings)).compile()
    got, grad = step(jax.device_put(params, shardings))
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(want_grad)):
    np.testing.assert_allclose(a, b, atol=2e-6)
  bodies = re.findall(r'while\(.*?body=(%[\w.-]+)', step.as_text())
  assert bodies  # the scan over the slices
  for body in bodies:
    text = re.search(re.escape(body) + r' .*?\n}', step.as_text(), re.S).group(0)
    assert not re.search(r'all-reduce|reduce-scatter|all-gather|all-to-all|collective-permute', text), body


def test_the_sliced_heads_step_holds_no_whole_logits():
  """The point of lm_head_chunks: the compiled gradient of the loss has no array of B x L x V elements (the
  logits or their gradient), which the whole head's has; the vocabulary, 96, is no other dimension's size."""
  cfg = dataclasses.replace(LLAMA, vocab_size=96)
  params = nn.unbox(_init(cfg))
  whole = 2 * 8 * 96

  def arrays(chunks):  # the sizes of the float32 arrays with a vocabulary dimension, but the head's weight
    hlo = jax.jit(jax.grad(_chunked_loss(cfg, chunks))).lower(params).compile().as_text()
    return {math.prod(int(d) for d in dims.split(',')) for dims in re.findall(r'f32\[([\d,]+)\]', hlo)
            if '96' in dims.split(',') and dims.removeprefix('1,') not in ('32,96', '96,32')}
  assert whole in arrays(1)
  assert max(arrays(4)) < whole and 2 * 2 * 96 in arrays(4)  # a slice: 2 positions of both rows


def test_the_sliced_head_skips_the_gradient_of_a_frozen_head():
  """A frozen LM head (LoRA, optim.trainable without it): the rest's gradient is the whole head's, and the sliced
  loss computes no weight gradient (XLA drops the unused one): 2 B C D V flops fewer per slice of C positions than
  with the head training (XLA's cost analysis, which counts a loop's body once)."""
  cfg = dataclasses.replace(LLAMA, vocab_size=96)
  params = nn.unbox(_init(cfg))
  frozen = {'lm_head': params['lm_head']}
  rest = {'decoder': params['decoder']}

  def grads(chunks, trained):
    loss = _chunked_loss(cfg, chunks)
    if trained == 'rest':
      return jax.jit(jax.grad(lambda r, f: loss({**r, **f})))
    return jax.jit(jax.grad(lambda f, r: loss({**r, **f})))
  np.testing.assert_allclose(grads(2, 'rest')(rest, frozen)['decoder']['embed_tokens']['embedding'],
                             grads(1, 'rest')(rest, frozen)['decoder']['embed_tokens']['embedding'], atol=2e-6)
  np.testing.assert_allclose(grads(2, 'head')(frozen, rest)['lm_head']['kernel'],
                             grads(1, 'head')(frozen, rest)['lm_head']['kernel'], atol=2e-6)
  flops = lambda f: f.lower(rest, frozen).compile().cost_analysis()['flops']  # noqa: E731
  both = jax.jit(jax.grad(lambda r, f: _chunked_loss(cfg, 2)({**r, **f}), argnums=(0, 1)))
  assert flops(both) - flops(grads(2, 'rest')) >= 2 * (2 * 4 * 32 * 96)


def test_the_sliced_head_refuses_a_head_with_lora_adapters():
  cfg = dataclasses.replace(LLAMA, lora_rank=2, lora_targets=('lm_head$',), lm_head_chunks=2)
  params = nn.unbox(decoder.build(cfg).init(jax.random.PRNGKey(0), IDS, POSITIONS, SEGMENTS,
                                            deterministic=True)['params'])
  with pytest.raises(ValueError, match=r"^lm_head_chunks=2 applies the LM head without its LoRA adapters: "
                                       r"expected lora_targets \('lm_head\$',\) that do not match 'lm_head'"):
    decoder.build(cfg).apply({'params': params}, IDS, POSITIONS, SEGMENTS, deterministic=True)


def test_padding_and_other_segments_do_not_change_a_segment():
  params = nn.unbox(_init(LLAMA))
  want = _apply(LLAMA, params)
  ids = IDS.copy()
  ids[0, 6:] = 33  # other tokens at the padding
  ids[1, :3] = [40, 41, 42]  # and in the first example of row 1
  got = decoder.build(LLAMA).apply({'params': params}, ids, POSITIONS, SEGMENTS, deterministic=True)
  np.testing.assert_allclose(got[0, :6], want[0, :6], atol=1e-6)
  np.testing.assert_allclose(got[1, 3:], want[1, 3:], atol=1e-6)
  assert np.max(np.abs(got[1, :3] - want[1, :3])) > 1e-3


def test_sliding_window_limits_what_a_query_sees():
  mask = np.asarray(decoder.attention_mask(jnp.arange(5), jnp.ones((1, 5), jnp.int32), jnp.ones((1, 5), jnp.int32),
                                           sliding_window=2))[0, 0, 0]
  np.testing.assert_array_equal(mask, np.tril(np.ones((5, 5), bool)) & ~np.tril(np.ones((5, 5), bool), -2))


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_changes_nothing_but_memory(remat):
  params = nn.unbox(_init(LLAMA))
  loss = lambda cfg: lambda p: jnp.mean(jnp.square(_apply(cfg, p)))  # noqa: E731
  want, want_grad = jax.jit(jax.value_and_grad(loss(LLAMA)))(params)
  got, grad = jax.jit(jax.value_and_grad(loss(dataclasses.replace(LLAMA, remat=remat))))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grad, want_grad)


def test_dropout_only_in_training():
  params = nn.unbox(_init(GPT2))
  run = lambda det, seed: _apply(GPT2, params, deterministic=det,  # noqa: E731
                                 rngs={'dropout': jax.random.PRNGKey(seed)})
  np.testing.assert_array_equal(run(True, 0), run(True, 1))
  assert not np.allclose(run(False, 0), run(False, 1))


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = dataclasses.replace(LLAMA, dtype=jnp.bfloat16)
  params = nn.unbox(_init(cfg))
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  logits = _apply(cfg, params)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, _apply(LLAMA, params), atol=0.1)


def test_lora_adapters_sit_on_the_targets_and_merge_exactly():
  cfg = dataclasses.replace(LLAMA, lora_rank=4, lora_targets=('attention/query$', 'attention/value$', 'mlp/up$'))
  params = nn.unbox(_init(cfg))
  layer = params['decoder']['layer_1']
  assert {k for k, v in layer['attention'].items() if 'lora_a' in v} == {'query', 'value'}
  assert layer['attention']['value']['lora_b'].shape == (4, 2, 8) and 'lora_a' in layer['mlp']['up']
  base = _apply(cfg, params)
  for node in (layer['attention']['query'], layer['attention']['value'], layer['mlp']['up']):
    node['lora_b'] = jax.random.normal(jax.random.PRNGKey(1), node['lora_b'].shape) * 0.5
  adapted = _apply(cfg, params)
  assert float(jnp.max(jnp.abs(adapted - base))) > 1e-2
  np.testing.assert_allclose(_apply(LLAMA, layers.merge_lora(params, cfg)), adapted, atol=1e-4)


@pytest.mark.parametrize('field,value,message', [
    ('norm', 'batch', r"^norm='batch': expected one of layer, rms for a decoder$"),
    ('head', 'sequence', r"^head='sequence': expected one of causal_lm for a decoder$"),
    ('num_kv_heads', 3, r'^num_kv_heads=3: expected a divisor of num_heads=4$'),
    ('mlp', 'relu', r"^mlp='relu': expected one of gelu_new, gelu, swiglu"),
    ('lm_head_chunks', 0, r'^lm_head_chunks=0: expected a positive number of chunks$'),
])
def test_bad_configs_are_rejected(field, value, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(LLAMA, **{field: value})
