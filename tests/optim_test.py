"""Schedules, the weight-decay mask and clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtune import config as config_lib
from jtune import optim


def _cfg(**kw):
  base = dict(name='adamw', learning_rate=1e-3, schedule='linear', warmup_ratio=0.1, weight_decay=0.01,
              b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0)
  base.update(kw)
  return config_lib.OptimConfig(**base)


def test_linear_warmup_then_linear_decay():
  lr = optim.schedule(_cfg(), total_steps=100)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10, 55, 100)],
                             [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)


def test_the_schedule_takes_an_array_of_steps():
  lr = optim.schedule(_cfg(), total_steps=100)
  np.testing.assert_allclose(lr(jnp.array([0, 5, 10, 55, 100])), [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)


def test_cosine_decay():
  lr = optim.schedule(_cfg(schedule='cosine'), total_steps=100)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 10, 55, 100)], [0.0, 1e-3, 5e-4, 0.0],
                             atol=1e-9)


@pytest.mark.parametrize('schedule', ['linear', 'cosine', 'inverse_sqrt'])
def test_the_rate_is_computed_once_per_step_not_per_parameter(schedule):
  """XLA's optimised program computes the schedule once, whatever the number of parameters reading it (a select's
  scalar arithmetic would be copied into every parameter's update kernel)."""
  lr = optim.schedule(_cfg(schedule=schedule), total_steps=100)

  def ops(n):
    shapes = [(i + 2, 3) for i in range(n)]  # distinct shapes: one kernel per parameter
    fn = jax.jit(lambda step, xs: [x - lr(step) * x * x for x in xs])
    text = fn.lower(7, [jnp.ones(s) for s in shapes]).compile().as_text()
    return sum(text.count(f' {op}(') for op in ('clamp', 'minimum', 'maximum', 'select', 'cosine', 'sqrt', 'rsqrt'))
  assert ops(2) == ops(8) > 0


def test_no_weight_decay_on_biases_and_layer_norm():
  params = {'dense': {'kernel': 1.0, 'bias': 1.0}, 'LayerNorm': {'scale': 1.0, 'bias': 1.0},
            'embeddings': {'embedding': 1.0}, 'attention': {'relative_attention_bias': 1.0}}
  assert optim.decay_mask(params) == {  # T5's relative position bias too, as Hugging Face's Trainer
      'dense': {'kernel': True, 'bias': False}, 'LayerNorm': {'scale': False, 'bias': False},
      'embeddings': {'embedding': True}, 'attention': {'relative_attention_bias': False}}


def test_decay_applies_only_where_masked():
  # With zero gradients the only change is the decoupled weight decay.
  params = {'dense': {'kernel': jnp.ones(3), 'bias': jnp.ones(3)}}
  tx = optim.optimizer(_cfg(weight_decay=0.5, warmup_ratio=0.0), lambda _: 0.1)
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['dense']['kernel'], -0.05 * np.ones(3), rtol=1e-6)
  np.testing.assert_allclose(updates['dense']['bias'], np.zeros(3))


@pytest.mark.parametrize('scale', [0.01, 1.0, 100.0])
def test_clipping_matches_optax(scale):
  """jtune's clip (one multiply, fused by XLA) gives optax.clip_by_global_norm's result below, at and above."""
  grads = {'a': jnp.arange(6.0).reshape(2, 3) * scale, 'b': {'c': -jnp.ones(4) * scale}}
  ours, _ = optim.clip_by_global_norm(2.0).update(grads, optax.EmptyState())
  theirs, _ = optax.clip_by_global_norm(2.0).update(grads, optax.EmptyState())
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), ours, theirs)
  assert float(optax.tree.norm(ours)) <= 2.0 * (1 + 1e-6)


def test_a_nonfinite_gradient_changes_nothing_but_the_counters():
  params = {'w': jnp.ones(3)}
  tx = optim.optimizer(_cfg(warmup_ratio=0.0), lambda _: 0.1)
  state = optim.init_state(tx, params)
  for bad in (jnp.nan, jnp.inf):
    new_params, new_state = optim.apply_gradients(tx, {'w': jnp.array([1.0, bad, 1.0])}, state, params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, (new_params, new_state.inner_state),
                           (params, state.inner_state))
    assert optim.nonfinite_counts(new_state) == {'nonfinite_in_a_row': 1, 'skipped_steps': 1}
  params, state = optim.apply_gradients(tx, {'w': jnp.ones(3)}, state, params)
  assert float(params['w'][0]) < 1.0 and optim.nonfinite_counts(state) == {'nonfinite_in_a_row': 0,
                                                                            'skipped_steps': 0}
  # the caller's global norm, when it passes one, is what decides
  skipped, _ = optim.apply_gradients(tx, {'w': jnp.ones(3)}, state, params, grad_norm=jnp.array(jnp.nan))
  np.testing.assert_array_equal(skipped['w'], params['w'])
  taken, _ = optim.apply_gradients(tx, {'w': jnp.ones(3)}, state, params, grad_norm=jnp.sqrt(3.0))
  assert float(taken['w'][0]) < float(params['w'][0])


@pytest.mark.parametrize('clip', [1.0, 0.0])
def test_global_norm_clipping(clip):
  # eps=1 makes Adam's first update depend on the gradient's scale, so clipping shows in the update.
  params = {'w': jnp.zeros(2)}
  tx = optim.optimizer(_cfg(grad_clip_norm=clip, weight_decay=0.0, eps=1.0), lambda _: 1.0)
  grads = {'w': jnp.array([30.0, 40.0])}
  updates, _ = tx.update(grads, tx.init(params), params)
  g = np.array([0.6, 0.8]) if clip else np.array([30.0, 40.0])
  np.testing.assert_allclose(updates['w'], -g / (g + 1.0), rtol=1e-5)


@pytest.mark.parametrize('trainable', [('.*',), ('^w$',)])
def test_apply_gradients_clips_by_the_norm_of_what_is_trained(trainable):
  """The norm the step passes is the clip's (no second pass over the gradient), except with frozen parameters,
  whose gradients are no part of the norm clipped: their run clips by the trainable gradients' own norm."""
  params = {'w': jnp.zeros(2), 'frozen': jnp.zeros(1)}
  tx = optim.optimizer(_cfg(weight_decay=0.0, eps=1.0, trainable=trainable), lambda _: 1.0)
  grads = {'w': jnp.array([30.0, 40.0]), 'frozen': jnp.array([120.0])}
  state = optim.init_state(tx, params)
  step = lambda grads: optim.apply_gradients(tx, grads, state, params, grad_norm=jnp.array(130.0))  # noqa: E731
  g = np.array([3.0, 4.0]) / 13.0 if trainable == ('.*',) else np.array([0.6, 0.8])
  np.testing.assert_allclose(step(grads)[0]['w'], -g / (g + 1.0), rtol=1e-5)
  assert ('reduce_sum' in str(jax.make_jaxpr(step)(grads))) == (trainable != ('.*',))  # a norm of its own


def test_constant_and_inverse_sqrt_with_warmup_in_steps():
  lr = optim.schedule(_cfg(schedule='constant', warmup_steps=4), total_steps=100)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 2, 4, 50, 100)], [0, 5e-4, 1e-3, 1e-3, 1e-3], atol=1e-9)
  lr = optim.schedule(_cfg(schedule='inverse_sqrt', warmup_steps=4), total_steps=100)
  # peak * sqrt(warmup / (warmup + steps since warmup)): 1e-3 at the peak, half at 4 * 4 = 16 steps in.
  np.testing.assert_allclose([float(lr(s)) for s in (2, 4, 16, 4 + 12)], [5e-4, 1e-3, 5e-4, 5e-4], atol=1e-9)


PARAMS = {
    'bert': {'embeddings': {'word_embeddings': {'embedding': jnp.ones(2)}},
             'layer_0': {'attention': {'query': {'kernel': jnp.ones(2)}}},
             'layer_1': {'attention': {'query': {'kernel': jnp.ones(2)}}},
             'pooler': {'kernel': jnp.ones(2)}},
    'classifier': {'kernel': jnp.ones(2), 'bias': jnp.ones(2)},
}


def _factors(tree):
  return {optim.path_str(p): float(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_head_multiplier_and_layer_wise_decay():
  factors = _factors(optim.lr_multipliers(_cfg(lr_multipliers=(('^classifier/', 10.0),), layer_decay=0.5),
                                          PARAMS))
  assert factors == {'bert/embeddings/word_embeddings/embedding': 0.125, 'bert/layer_0/attention/query/kernel': 0.25,
                     'bert/layer_1/attention/query/kernel': 0.5, 'bert/pooler/kernel': 1.0,
                     'classifier/kernel': 10.0, 'classifier/bias': 10.0}


def test_parameter_groups_get_their_rates():
  """SGD without momentum: the update is -lr * factor * gradient, so the factors show directly."""
  cfg = _cfg(name='sgd', momentum=0.0, weight_decay=0.0, grad_clip_norm=0.0, layer_decay=0.5,
             lr_multipliers=(('^classifier/', 10.0),))
  tx = optim.optimizer(cfg, lambda _: 0.1)
  grads = jax.tree_util.tree_map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  got = {k: v / -0.1 for k, v in _factors(jax.tree_util.tree_map(lambda u: u[0], updates)).items()}
  assert got == pytest.approx(_factors(optim.lr_multipliers(cfg, PARAMS)))


def test_frozen_parameters_get_no_update_and_no_optimizer_state():
  cfg = _cfg(trainable=('^classifier/',), warmup_ratio=0.0)
  tx = optim.optimizer(cfg, lambda _: 0.1)
  state = tx.init(PARAMS)
  sizes = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim)
  assert sizes == 2 * 4  # Adam's two moments for classifier kernel and bias (2 values each), nothing else
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, PARAMS), state, PARAMS)
  frozen = {k: v for k, v in _factors(jax.tree_util.tree_map(lambda u: jnp.abs(u).sum(), updates)).items()}
  assert {k for k, v in frozen.items() if v > 0} == {'classifier/kernel', 'classifier/bias'}


@pytest.mark.parametrize('name', ['adamw', 'adafactor', 'sgd', 'lion'])
def test_each_optimizer_descends(name):
  """A few steps on a quadratic: every optimizer lowers the loss."""
  params = {'w': jnp.full((4, 4), 2.0), 'bias': jnp.ones(4)}
  tx = optim.optimizer(_cfg(name=name, warmup_ratio=0.0, weight_decay=0.0), lambda _: 0.05)
  loss = lambda p: sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(p))  # noqa: E731
  state, start = tx.init(params), loss(params)
  for _ in range(5):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert loss(params) < start


@pytest.mark.parametrize('name', ['adamw', 'adafactor', 'sgd', 'lion'])
def test_weight_decay_is_scaled_by_the_learning_rate(name):
  """With a zero gradient only the decay moves a weight: p -> p * (1 - lr * wd), biases untouched (optax's own
  adafactor adds the decay after the rate: p -> p * (1 - wd))."""
  params = {'w': jnp.full((4, 4), 2.0), 'bias': jnp.ones(4)}
  tx = optim.optimizer(_cfg(name=name, warmup_ratio=0.0, weight_decay=0.1), lambda _: 0.01)
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
  after = optax.apply_updates(params, updates)
  np.testing.assert_allclose(after['w'], 2.0 * (1 - 0.01 * 0.1), rtol=1e-6)
  np.testing.assert_array_equal(after['bias'], 1.0)


def _nest(flat):
  out = {}
  for path, value in flat.items():
    *parents, leaf = path.split('/')
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


@pytest.mark.parametrize('embeddings', ['decoder/embed_tokens/embedding', 'decoder/position_embeddings/embedding',
                                        'shared/embedding'])
def test_layer_wise_decay_puts_every_family_s_embeddings_at_depth_0(embeddings):
  params = {embeddings: jnp.ones(2), 'decoder/layer_0/mlp/kernel': jnp.ones(2),
            'decoder/layer_1/mlp/kernel': jnp.ones(2), 'lm_head/kernel': jnp.ones(2)}
  params = _nest(params)
  factors = _factors(optim.lr_multipliers(_cfg(layer_decay=0.5), params))
  assert factors == {embeddings: 0.125, 'decoder/layer_0/mlp/kernel': 0.25, 'decoder/layer_1/mlp/kernel': 0.5,
                     'lm_head/kernel': 1.0}


def test_layer_wise_decay_counts_frozen_layers():
  """Layer 0 of 2 and the classifier train, layer 1 is frozen: layer 0's factor is still decay ** (top - depth)
  of the whole model (0.25), not that of a model whose top layer is layer 0 (0.5)."""
  cfg = _cfg(name='sgd', momentum=0.0, weight_decay=0.0, grad_clip_norm=0.0, layer_decay=0.5,
             trainable=('layer_0/', '^classifier/'))
  tx = optim.optimizer(cfg, lambda _: 0.1)
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, PARAMS), tx.init(PARAMS), PARAMS)
  got = {k: v / -0.1 for k, v in _factors(jax.tree_util.tree_map(lambda u: u[0], updates)).items()}
  assert got['bert/layer_0/attention/query/kernel'] == pytest.approx(0.25)
  assert got['classifier/kernel'] == pytest.approx(1.0)
  assert got['bert/layer_1/attention/query/kernel'] == 0.0


def test_trainable_patterns_that_match_nothing_are_a_config_error():
  tx = optim.optimizer(_cfg(trainable=('^lm_head/',)), lambda _: 0.1)
  with pytest.raises(config_lib.ConfigError, match=r"config.optim.trainable=\('\^lm_head/',\): matches no "
                                                   r'parameter of this model.*classifier/bias'):
    tx.init(PARAMS)


@pytest.mark.parametrize('kw,path', [
    ({}, ".inner_state[1][0].mu['classifier']['kernel']"),
    ({'trainable': ('^classifier/',), 'layer_decay': 0.5},
     ".inner_state.inner_states['train'].inner_state[1][0].mu['classifier']['kernel']")])
def test_the_optimizer_state_keeps_the_paths_checkpoints_hold(kw, path):
  """Checkpoints store the optimizer state by these paths: moving them breaks resuming every run saved before."""
  state = optim.init_state(optim.optimizer(_cfg(**kw), lambda _: 0.1), PARAMS)
  assert path in [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]


def test_adafactor_factors_attention_kernels_as_hugging_face_does():
  """Adafactor (Trainer(optim='adafactor'): no relative step, no parameter scale, clip 1.0) on jtune's 3-D
  attention kernels updates them as Hugging Face's Adafactor updates the same 2-D torch weights, and keeps row
  and column statistics for them instead of a full second moment."""
  torch = pytest.importorskip('torch')
  from transformers.optimization import Adafactor  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  D, H, K = 48, 4, 8  # pylint: disable=invalid-name
  w = {'query': rng.normal(0, 0.02, (D, H * K)), 'output': rng.normal(0, 0.02, (H * K, D)),
       'bias': rng.normal(0, 0.02, (D,)), 'query_bias': rng.normal(0, 0.02, (H * K,))}  # [fan-in, fan-out]
  names = {'query': ('embed', 'heads', 'kv'), 'output': ('heads', 'kv', 'embed'), 'bias': ('embed',),
           'query_bias': ('heads', 'kv')}
  shapes = {'query': (D, H, K), 'output': (H, K, D), 'bias': (D,), 'query_bias': (H, K)}
  params = {k: jnp.asarray(v.reshape(shapes[k]), jnp.float32) for k, v in w.items()}
  tx = optim.optimizer(_cfg(name='adafactor', warmup_ratio=0.0, weight_decay=0.0, grad_clip_norm=0.0),
                       lambda _: 1e-3)
  state = nn.unbox(tx.init({k: nn.Partitioned(v, names[k]) for k, v in params.items()}))  # as jtune.state boxes
  sizes = {k: tuple(optax.tree.get(state, n)[k].size for n in ('v_row', 'v_col', 'v')) for k in params}
  assert sizes == {'query': (H * K, D, 1), 'output': (H * K, D, 1), 'bias': (1, 1, D),
                   'query_bias': (1, 1, H * K)}  # a full moment for vectors only
  torch_params = {k: torch.nn.Parameter(torch.tensor(v.T.copy(), dtype=torch.float32)) for k, v in w.items()}
  hf = Adafactor(list(torch_params.values()), lr=1e-3, scale_parameter=False, relative_step=False,
                 warmup_init=False, clip_threshold=1.0)
  for _ in range(4):
    grads = {k: rng.normal(0, 1e-3, v.shape) * rng.uniform(0.1, 3, (v.shape[0],) + (1,) * (v.ndim - 1))
             for k, v in w.items()}
    updates, state = tx.update({k: jnp.asarray(g.reshape(shapes[k]), jnp.float32) for k, g in grads.items()},
                               state, params)
    params = optax.apply_updates(params, updates)
    for k, p in torch_params.items():
      p.grad = torch.tensor(grads[k].T.copy(), dtype=torch.float32)
    hf.step()
  for k, p in torch_params.items():
    moved = np.abs(p.detach().numpy().T - w[k]).max()
    np.testing.assert_allclose(np.asarray(params[k]).reshape(w[k].shape), p.detach().numpy().T,
                               atol=1e-3 * moved, err_msg=k)
