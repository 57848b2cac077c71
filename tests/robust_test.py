"""Robustness options: FGM and PGD perturbations, R-Drop, class weights and oversampling, each by what it changes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bert_cls
from jtune import config as config_lib
from jtune import optim, prng, robust
from jtune import sharding
from jtune import state as state_lib
from jtune import step as step_lib
from jtune.data.features import Features, ragged
from jtune.models import bert
from jtune.tasks import classification
from tests.step_test import OPTIM, RULES, TINY, _batches

NO_DROPOUT = bert.BertConfig(**{**TINY.__dict__, 'hidden_dropout': 0.0, 'attention_dropout': 0.0,
                                'classifier_dropout': 0.0})
TRAIN = config_lib.from_config_dict(bert_cls.get_config('tiny')).train


def _setup(model_cfg=TINY, seed=0):
  """(apply, loss, params, zeros, batch) wired as the train step wires them."""
  model = bert.BertForSequenceClassification(model_cfg)
  batch = {k: jnp.asarray(v) for k, v in _batches(1, batch=8, seed=seed)[0].items()}
  params = model.init(jax.random.PRNGKey(1), batch['input_ids'], batch['attention_mask'],
                      deterministic=True)['params']
  params = jax.tree_util.tree_map(lambda x: getattr(x, 'value', x), params,
                                  is_leaf=lambda x: hasattr(x, 'value'))

  def apply(p, delta, rng):
    return step_lib._outputs(model, p, batch, step_lib.ENCODER_INPUTS, delta, deterministic=False,
                             rngs={'dropout': rng})
  loss = lambda outputs: classification.loss_sums(outputs, batch)  # noqa: E731
  zeros = step_lib._perturbation_zeros(model, batch, step_lib.ENCODER_INPUTS)
  return apply, loss, params, zeros, batch


def _leaf(tree):
  (leaf,) = jax.tree_util.tree_leaves(tree)
  return np.asarray(leaf)


def test_fgm_moves_each_example_by_epsilon_along_the_embedding_gradient():
  apply, loss, params, zeros, batch = _setup()
  rng = jax.random.PRNGKey(0)
  cfg = dataclasses.replace(TRAIN, adversarial='fgm', adversarial_epsilon=0.5)
  delta_tree = robust.adversarial_delta(apply, loss, params, zeros, rng, cfg)
  delta = _leaf(delta_tree)
  assert delta.shape == (8, 16, TINY.hidden_size)  # the word embeddings of this batch
  np.testing.assert_allclose(np.linalg.norm(delta.reshape(8, -1), axis=1), 0.5, rtol=1e-5)
  grad = _leaf(jax.grad(lambda d: loss(apply(params, d, rng))[0])(zeros)).reshape(8, -1)
  cosine = np.sum(delta.reshape(8, -1) * grad, axis=1) / np.linalg.norm(grad, axis=1) / 0.5
  np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)
  clean, _ = loss(apply(params, zeros, rng))
  attacked, _ = loss(apply(params, delta_tree, rng))
  assert float(attacked) > float(clean)  # the perturbation raises the loss


def test_pgd_stays_inside_the_ball_and_one_full_step_is_fgm():
  apply, loss, params, zeros, _ = _setup()
  rng = jax.random.PRNGKey(0)
  fgm = robust.adversarial_delta(apply, loss, params, zeros, rng,
                                 dataclasses.replace(TRAIN, adversarial='fgm', adversarial_epsilon=0.5))
  one = robust.adversarial_delta(apply, loss, params, zeros, rng, dataclasses.replace(
      TRAIN, adversarial='pgd', adversarial_epsilon=0.5, adversarial_steps=1, adversarial_step_size=0.5))
  np.testing.assert_allclose(_leaf(one), _leaf(fgm), atol=1e-6)
  pgd = robust.adversarial_delta(apply, loss, params, zeros, rng, dataclasses.replace(
      TRAIN, adversarial='pgd', adversarial_epsilon=0.5, adversarial_steps=4, adversarial_step_size=0.3))
  norms = np.linalg.norm(_leaf(pgd).reshape(8, -1), axis=1)
  assert np.all(norms <= 0.5 * (1 + 1e-5)) and np.all(norms > 0.5 * 0.99)  # 4 x 0.3 > 0.5: projected back
  assert float(loss(apply(params, pgd, rng))[0]) > float(loss(apply(params, zeros, rng))[0])


def test_symmetric_kl():
  same = robust.symmetric_kl_sums(jnp.array([[1.0, 2.0]]), jnp.array([[1.0, 2.0]]), jnp.ones(1))
  assert float(same[0]) == pytest.approx(0.0, abs=1e-7)
  p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
  expected = 0.5 * (np.sum(p * np.log(p / q)) + np.sum(q * np.log(q / p)))
  total, weight = robust.symmetric_kl_sums(jnp.log(jnp.array([p, q])), jnp.log(jnp.array([q, q])),
                                           jnp.array([2.0, 1.0]))
  assert float(total) == pytest.approx(2.0 * expected, rel=1e-5) and float(weight) == 3.0


def test_rdrop_adds_the_kl_of_two_dropout_passes():
  cfg = dataclasses.replace(TRAIN, rdrop_alpha=2.0)
  rng = jax.random.PRNGKey(3)
  apply, loss, params, _, batch = _setup(NO_DROPOUT)
  total, weight = robust.loss_sums(apply, loss, params, None, rng, cfg, batch['weights'])
  plain, _ = loss(apply(params, None, rng))
  assert float(total) == pytest.approx(float(plain), rel=1e-6)  # no dropout: both passes agree, KL 0
  apply, loss, params, _, batch = _setup(TINY)
  total, weight = robust.loss_sums(apply, loss, params, None, rng, cfg, batch['weights'])
  rng_a, rng_b = jax.random.split(rng)
  out_a, out_b = apply(params, None, rng_a), apply(params, None, rng_b)
  mean = 0.5 * (float(loss(out_a)[0]) + float(loss(out_b)[0]))
  kl = float(robust.symmetric_kl_sums(out_a, out_b, batch['weights'])[0])
  assert kl > 0 and float(total) == pytest.approx(mean + 2.0 * kl, rel=1e-5) and float(weight) == 8


@pytest.mark.parametrize('impl', ['threefry2x32', 'unsafe_rbg', 'rbg_xor_fold'])
def test_rdrop_passes_share_no_layer_key(impl):
  """The two passes' keys, each folded with a layer index as apply_layers does, never meet (unsafe_rbg's fold_in
  is an XOR: a second pass keyed fold_in(rng, 1) would give its layer 1 the first pass's unfolded key)."""
  keys = []

  def apply(params, delta, rng):
    keys.append(rng)
    return jnp.zeros((2, 3))
  cfg = dataclasses.replace(TRAIN, rdrop_alpha=1.0)
  robust.loss_sums(apply, lambda out: (jnp.sum(out), 2.0), None, None, jax.random.key(0, impl=prng.impl(impl)), cfg,
                   jnp.ones(2))
  assert len(keys) == 2
  layer_keys = [jax.random.key_data(k) for k in keys]
  layer_keys += [jax.random.key_data(jax.random.fold_in(k, i)) for k in keys for i in range(4)]
  assert len({np.asarray(k).tobytes() for k in layer_keys}) == len(layer_keys)


def _step_metrics(class_weights=None, robust_cfg=None, model_cfg=NO_DROPOUT):
  mesh = sharding.make_mesh(config_lib.MeshConfig(1, 1, 1, rules=RULES), devices=jax.devices()[:1])
  lr = optim.schedule(OPTIM, 10)
  tx = optim.optimizer(OPTIM, lr)
  model = bert.BertForSequenceClassification(model_cfg)
  state, shardings = state_lib.init(model, tx, mesh, RULES, seed=0, seq_len=16)
  train_fn, _ = step_lib.compile_steps(model, tx, lr, mesh, shardings, class_weights=class_weights,
                                       robust_cfg=robust_cfg)
  batch = _batches(1)[0]
  with sharding.activate(mesh, RULES):
    logits = model.apply({'params': state.params}, batch['input_ids'], batch['attention_mask'],
                         deterministic=True)
    _, metrics = train_fn(state, sharding.global_batch(batch, mesh))
  return metrics, np.asarray(logits), batch


@pytest.mark.parametrize('weights', [(1.0, 0.0, 3.0), (0.01, 0.0, 0.03)])  # the second: a batch's weights sum < 1
def test_class_weights_weigh_each_example_by_its_class(weights):
  metrics, logits, batch = _step_metrics(class_weights=weights)
  labels = batch['labels']
  ce = -jax.nn.log_softmax(logits)[np.arange(len(labels)), labels]
  w = np.array(weights)[labels]
  # PyTorch's CrossEntropyLoss(weight=w): sum of w * ce over the sum of w; class 1 counts for nothing
  assert float(metrics['loss']) == pytest.approx(float(np.sum(w * ce) / np.sum(w)), rel=1e-5)


def test_the_train_step_applies_fgm_and_rdrop():
  plain, _, _ = _step_metrics()
  fgm, _, _ = _step_metrics(robust_cfg=dataclasses.replace(TRAIN, adversarial='fgm', adversarial_epsilon=1.0))
  # clean + adversarial loss: above twice the clean loss, since the perturbation raises it
  assert float(fgm['loss']) > 2 * float(plain['loss']) and np.isfinite(float(fgm['grad_norm']))
  rdrop, _, _ = _step_metrics(robust_cfg=dataclasses.replace(TRAIN, rdrop_alpha=1.0))
  assert float(rdrop['loss']) == pytest.approx(float(plain['loss']), rel=1e-5)  # no dropout: KL 0


def test_balanced_class_weights_and_bad_specs():
  labels = np.array([0, 0, 0, 1, 2, 2])
  assert classification.class_weights('balanced', labels, 3) == pytest.approx((6 / 9, 6 / 3, 6 / 6))
  assert classification.class_weights('', labels, 3) is None
  assert classification.class_weights('1, 2,0.5', labels, 3) == (1.0, 2.0, 0.5)
  for spec in ('1,2', 'a,b,c', '1,0,1'):
    with pytest.raises(config_lib.ConfigError, match=r"config.task.class_weights=.*: expected '', 'balanced' or 3"):
      classification.class_weights(spec, labels, 3)
  with pytest.raises(config_lib.ConfigError, match='class 1 has no training examples'):
    classification.class_weights('balanced', np.array([0, 2]), 3)


def test_oversampling_balances_the_classes_and_keeps_every_row():
  labels = np.array([0] * 7 + [1] * 2 + [2] * 3, np.int32)
  ids = [np.arange(i + 1, dtype=np.int32) for i in range(len(labels))]
  features = Features({'input_ids': ragged(ids)}, {'labels': labels}, np.array([len(x) for x in ids]))
  out = classification.oversample(features, seed=0)
  np.testing.assert_array_equal(np.bincount(out.labels), [7, 7, 7])
  lengths = set(out.lengths.tolist())
  assert lengths == set(features.lengths.tolist())  # every original row is there at least once
  for row in range(len(out)):  # rows stay whole: tokens, label and length together
    assert len(out.input_ids[row]) == out.lengths[row] and labels[out.lengths[row] - 1] == out.labels[row]


@pytest.mark.parametrize('override, message', [
    (('task.name', 'token_classification', 'train.rdrop_alpha', 1.0),
     "config.train.rdrop_alpha=1.0: expected its default with task.name='token_classification'"),
    (('train.adversarial', 'fgsm'), "config.train.adversarial='fgsm': expected 'none', 'fgm' or 'pgd'"),
    (('train.adversarial', 'pgd', 'train.adversarial_steps', 0), 'config.train.adversarial_steps=0'),
])
def test_config_errors(override, message):
  c = bert_cls.get_config('tiny')
  for key, value in zip(override[::2], override[1::2]):
    section, name = key.split('.')
    c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
    config_lib.from_config_dict(c)


def test_a_run_with_pgd_balanced_weights_and_oversampling(tmp_path, cache_dir):
  from tests.cli import TINY as TINY_CLI, read_jsonl, run_cli  # pylint: disable=g-import-not-at-top
  run_cli('jtune.train', *TINY_CLI, f'--workdir={tmp_path}', f'--config.cache_dir={cache_dir}',
          '--config.train.adversarial=pgd', '--config.train.adversarial_steps=2',
          '--config.task.class_weights=balanced', '--config.data.oversample=True', '--config.train.num_steps=4',
          '--config.train.log_every_steps=1', '--config.train.export=False')
  records = read_jsonl(tmp_path / 'metrics.jsonl')
  losses = [r['loss'] for r in records if 'loss' in r]
  assert len(losses) == 4 and all(np.isfinite(losses))
  assert any('eval_accuracy' in r for r in records)
