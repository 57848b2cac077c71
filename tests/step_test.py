"""The jitted train step on a mesh: same losses and parameters as on one device, traced once, and the memory
of parameters and optimizer state divided over the fsdp axis; the dropout masks' PRNG (train.dropout_rng)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from jtune import config as config_lib
from jtune import optim
from jtune import sharding
from jtune import state as state_lib
from jtune import step as step_lib
from jtune.models import bert

RULES = config_lib.parse_rules(common.RULES)
TINY = bert.BertConfig(
    vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
    max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12, initializer_range=0.02,
    hidden_dropout=0.1, attention_dropout=0.1, classifier_dropout=0.1, num_labels=3, pad_token_id=0)
OPTIM = config_lib.OptimConfig(name='adamw', learning_rate=1e-3, schedule='linear', warmup_ratio=0.0,
                               weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0)


def _batches(n=3, batch=16, length=16, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    lengths = rng.integers(4, length + 1, batch)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    out.append({
        'input_ids': (rng.integers(1, TINY.vocab_size, (batch, length)) * mask).astype(np.int32),
        'attention_mask': mask,
        'token_type_ids': np.zeros((batch, length), np.int32),
        'labels': rng.integers(0, TINY.num_labels, batch).astype(np.int32),
        'weights': np.ones(batch, np.float32)})
  return out


def _train(mesh_sizes, num_devices, dropout_rng='auto'):
  mesh = sharding.make_mesh(config_lib.MeshConfig(*mesh_sizes, rules=RULES),
                            devices=jax.devices()[:num_devices])
  lr = optim.schedule(OPTIM, 10)
  tx = optim.optimizer(OPTIM, lr)
  model = bert.BertForSequenceClassification(TINY)
  state, shardings = state_lib.init(model, tx, mesh, RULES, seed=0, seq_len=16)
  train_fn, _ = step_lib.compile_steps(model, tx, lr, mesh, shardings, dropout_rng=dropout_rng)
  losses = []
  with sharding.activate(mesh, RULES):
    for local in _batches():
      state, metrics = train_fn(state, sharding.global_batch(local, mesh))
      losses.append(float(metrics['loss']))
  return losses, jax.device_get(state.params), train_fn, state


@pytest.fixture(scope='module')
def single_device():
  return _train((1, 1, 1), 1)


@pytest.mark.parametrize('mesh_sizes', [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (2, 4, 1)])
def test_mesh_matches_one_device(single_device, mesh_sizes):
  losses_1, params_1, _, _ = single_device
  losses_8, params_8, train_fn, state = _train(mesh_sizes, 8)
  np.testing.assert_allclose(losses_8, losses_1, atol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params_8, params_1)
  assert train_fn._cache_size() == 1  # traced and compiled once for three steps
  assert int(state.step) == 3
  assert losses_1[-1] != losses_1[0]


def test_threefry_dropout_matches_across_meshes_too():
  """The mesh test above runs 'auto', which is unsafe_rbg on CPUs; threefry2x32, what accelerators run, too."""
  losses_1, params_1, _, _ = _train((1, 1, 1), 1, 'threefry2x32')
  losses_8, params_8, _, _ = _train((2, 4, 1), 8, 'threefry2x32')
  np.testing.assert_allclose(losses_8, losses_1, atol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params_8, params_1)


@pytest.mark.parametrize('name', ['auto', 'rbg_xor_fold', 'unsafe_rbg', 'threefry2x32'])
def test_dropout_rng_picks_the_masks_prng(name):
  """On these CPU devices 'auto' draws the masks with XLA's RngBitGenerator and folds keys with jtune.prng's
  integer hash (rbg_xor_fold); unsafe_rbg folds with RngBitGenerator calls too; threefry2x32 does both with JAX's
  threefry (the step's own key is threefry's either way: a few threefry calls derive it)."""
  mesh = sharding.make_mesh(config_lib.MeshConfig(1, 1, 1, rules=RULES), devices=jax.devices()[:1])
  impl = step_lib.dropout_rng_impl(name, mesh)
  assert impl == ('rbg_xor_fold' if name == 'auto' else name)
  lr = optim.schedule(OPTIM, 10)
  tx = optim.optimizer(OPTIM, lr)
  model = bert.BertForSequenceClassification(TINY)
  state, shardings = state_lib.init(model, tx, mesh, RULES, seed=0, seq_len=16)
  train_fn, _ = step_lib.compile_steps(model, tx, lr, mesh, shardings, dropout_rng=name)
  with sharding.activate(mesh, RULES):
    text = train_fn.lower(state, sharding.global_batch(_batches(1)[0], mesh)).as_text()
  generators, threefry_calls = text.count('stablehlo.rng_bit_generator'), len(re.findall(r'call @_?threefry', text))
  masks = 8  # 2 layers x 3 dropouts, the embeddings' and the classifier's: one generator each
  if impl == 'unsafe_rbg':
    assert generators > masks + 2  # and one per fold of a key: each site's, each layer's (20 in all)
  else:
    assert generators == (masks if impl == 'rbg_xor_fold' else 0)
  assert threefry_calls <= 3 if impl != 'threefry2x32' else threefry_calls >= 5


@pytest.mark.parametrize('impl', ['threefry2x32', 'unsafe_rbg', 'rbg_xor_fold'])
def test_micro_batch_and_layer_keys_are_all_distinct(impl):
  """apply_layers folds the layer index into each micro-batch's key: micro-batch m's layer i must not draw micro-batch
  i's layer m masks (unsafe_rbg's fold_in is an XOR, so the micro-batch is folded in by threefry, before it)."""
  rng, step = jax.random.PRNGKey(0), jnp.int32(3)
  keys = [jax.random.key_data(jax.random.fold_in(step_lib.dropout_key(rng, step, impl, jnp.int32(m)), i))
          for m in range(3) for i in range(3)]
  assert len({np.asarray(k).tobytes() for k in keys}) == 9
  one = jax.random.key_data(step_lib.dropout_key(rng, step, impl))
  assert not any(np.array_equal(one, jax.random.key_data(step_lib.dropout_key(rng, step, impl, jnp.int32(m))))
                 for m in range(3))


def test_params_are_born_sharded_over_fsdp():
  mesh = sharding.make_mesh(config_lib.MeshConfig(2, 4, 1, rules=RULES))
  tx = optim.optimizer(OPTIM, optim.schedule(OPTIM, 10))
  state, _ = state_lib.init(bert.BertForSequenceClassification(TINY), tx, mesh, RULES, seed=0, seq_len=16)
  kernel = state.params['bert']['embeddings']['word_embeddings']['embedding']
  assert kernel.shape == (TINY.vocab_size, TINY.hidden_size)
  assert {s.data.shape for s in kernel.addressable_shards} == {(TINY.vocab_size, TINY.hidden_size // 4)}
  mu = optax.tree.get(state.opt_state, 'mu')['bert']['embeddings']['word_embeddings']['embedding']
  assert mu.sharding == kernel.sharding


def _compiled_argument_bytes(mesh_sizes, model_cfg, batch=8, length=128):
  """Per-device argument bytes of the compiled train step, and the per-device bytes of its batch."""
  mesh = sharding.make_mesh(config_lib.MeshConfig(*mesh_sizes, rules=RULES))
  lr = optim.schedule(OPTIM, 10)
  tx = optim.optimizer(OPTIM, lr)
  model = bert.BertForSequenceClassification(model_cfg)
  abstract, shardings = state_lib.shapes(model, tx, mesh, RULES, seq_len=length)
  batch_sharding = sharding.batch_sharding(mesh)
  local = _batches(1, batch, length)[0]
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
                    for k, v in local.items()}
  train_fn, _ = step_lib.compile_steps(model, tx, lr, mesh, shardings)
  with sharding.activate(mesh, RULES):
    compiled = train_fn.lower(abstract, abstract_batch).compile()
  batch_bytes = sum(v.nbytes for v in local.values()) // sharding.data_parallel_size(mesh)
  return compiled.memory_analysis().argument_size_in_bytes, batch_bytes


def test_fsdp_divides_parameter_and_optimizer_memory():
  """Compiled, not run: a 4-layer, 256-wide BERT (about 3.5M parameters plus two Adam moments)."""
  medium = bert.BertConfig(**{**TINY.__dict__, 'hidden_size': 256, 'num_layers': 4, 'num_heads': 4,
                              'intermediate_size': 1024, 'vocab_size': 1024, 'max_position_embeddings': 128})
  replicated, batch_bytes = _compiled_argument_bytes((8, 1, 1), medium)
  fsdp, fsdp_batch_bytes = _compiled_argument_bytes((1, 8, 1), medium)
  assert batch_bytes == fsdp_batch_bytes
  state_replicated, state_fsdp = replicated - batch_bytes, fsdp - batch_bytes
  assert state_replicated > 3 * 3_000_000 * 4  # params, mu and nu in float32, whole on every device
  assert state_fsdp <= state_replicated / 8 * 1.10, (state_fsdp, state_replicated)


def _remat_temporaries(remat, batch=16, length=128):
  """Per-device temporary bytes of compile_steps' train step for a 4-layer, 128-wide BERT with model.remat =
  `remat` on 8 devices, and of the same lowering compiled with XLA's default and memory-optimised schedulers."""
  medium = bert.BertConfig(**{**TINY.__dict__, 'hidden_size': 128, 'num_layers': 4, 'intermediate_size': 512,
                              'vocab_size': 1024, 'max_position_embeddings': length, 'remat': remat})
  mesh = sharding.make_mesh(config_lib.MeshConfig(8, 1, 1, rules=RULES))
  lr = optim.schedule(OPTIM, 10)
  tx = optim.optimizer(OPTIM, lr)
  model = bert.BertForSequenceClassification(medium)
  abstract, shardings = state_lib.shapes(model, tx, mesh, RULES, seq_len=length)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
                    for k, v in _batches(1, batch, length)[0].items()}
  train_fn, _ = step_lib.compile_steps(model, tx, lr, mesh, shardings)  # the options from model.cfg.remat
  with sharding.activate(mesh, RULES):
    lowered = train_fn.lower(abstract, abstract_batch)
    return [compiled.memory_analysis().temp_size_in_bytes for compiled in (
        lowered.compile(),
        lowered.compile({'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_DEFAULT'}),
        lowered.compile({'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}))]


def test_remat_steps_compile_with_the_memory_optimised_scheduler_on_cpus():
  """Compiled, not run: with model.remat='full' (unrolled layers) the CPU train step needs less temporary memory
  than XLA's default scheduler gives the same lowering (which keeps several layers' recomputed activations live);
  without remat (and with 'dots', or scanned layers) the steps keep XLA's defaults."""
  mesh = sharding.make_mesh(config_lib.MeshConfig(8, 1, 1, rules=RULES))
  assert step_lib.compiler_options(mesh, 'none') is None and step_lib.compiler_options(mesh, 'dots') is None
  assert step_lib.compiler_options(mesh, 'full') == step_lib.REMAT_CPU_OPTIONS
  assert step_lib.compiler_options(mesh, 'full', scan_layers=True) is None  # the scan frees each layer already
  ours, default, optimised = _remat_temporaries('full')
  assert ours == optimised and ours < 0.95 * default, (ours, default)  # 18.1 against 20.0 MB
  ours, default, optimised = _remat_temporaries('none')
  assert ours == default != optimised, (ours, default, optimised)


def test_a_nonfinite_batch_skips_the_update():
  mesh = sharding.make_mesh(config_lib.MeshConfig(8, 1, 1, rules=RULES))
  lr = optim.schedule(OPTIM, 10)
  tx = optim.optimizer(OPTIM, lr)
  model = bert.BertForSequenceClassification(TINY)
  state, shardings = state_lib.init(model, tx, mesh, RULES, seed=0, seq_len=16)
  train_fn, _ = step_lib.compile_steps(model, tx, lr, mesh, shardings)
  good, bad = _batches(2)
  bad['weights'] = np.full_like(bad['weights'], np.nan)  # a NaN loss, hence NaN gradients
  with sharding.activate(mesh, RULES):
    state, metrics = train_fn(state, sharding.global_batch(good, mesh))
    before = jax.device_get((state.params, state.opt_state))
    state, metrics = train_fn(state, sharding.global_batch(bad, mesh))
    assert np.isnan(float(metrics['loss']))
    assert int(metrics['skipped_steps']) == 1 and int(metrics['nonfinite_in_a_row']) == 1
    after = jax.device_get((state.params, state.opt_state))
    jax.tree_util.tree_map(np.testing.assert_array_equal, before[0], after[0])
    jax.tree_util.tree_map(np.testing.assert_array_equal, before[1].inner_state, after[1].inner_state)
    state, metrics = train_fn(state, sharding.global_batch(good, mesh))
    assert int(metrics['nonfinite_in_a_row']) == 0 and int(metrics['skipped_steps']) == 1


NO_DROPOUT = bert.BertConfig(**{**TINY.__dict__, 'hidden_dropout': 0.0, 'attention_dropout': 0.0,
                                'classifier_dropout': 0.0})


def _steps(model_cfg, mesh_sizes=(8, 1, 1), n=2, batch=16, **step_kwargs):
  mesh = sharding.make_mesh(config_lib.MeshConfig(*mesh_sizes, rules=RULES))
  lr = optim.schedule(OPTIM, 10)
  tx = optim.optimizer(OPTIM, lr)
  model = bert.BertForSequenceClassification(model_cfg)
  state, shardings = state_lib.init(model, tx, mesh, RULES, seed=0, seq_len=16)
  train_fn, _ = step_lib.compile_steps(model, tx, lr, mesh, shardings, **step_kwargs)
  losses, grad_norms = [], []
  with sharding.activate(mesh, RULES):
    for local in _batches(n, batch=batch):
      state, metrics = train_fn(state, sharding.global_batch(local, mesh))
      losses.append(float(metrics['loss']))
      grad_norms.append(float(metrics['grad_norm']))
  return losses, grad_norms, jax.device_get(state.params)


@pytest.mark.parametrize('k', [2, 4])
def test_accumulation_matches_one_big_batch(k):
  """k micro-batches of 32/k give the update of one batch of 32 (float32, no dropout), within 1e-5."""
  want = _steps(NO_DROPOUT, batch=32)
  got = _steps(NO_DROPOUT, batch=32, accumulation_steps=k)
  np.testing.assert_allclose(got[0], want[0], atol=1e-5)  # one loss per optimizer step
  np.testing.assert_allclose(got[1], want[1], atol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got[2], want[2])


@pytest.mark.parametrize('policy', ['full', 'dots'])
def test_remat_gives_the_same_training(policy):
  want = _steps(TINY)
  got = _steps(bert.BertConfig(**{**TINY.__dict__, 'remat': policy}))
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5)  # gradient norms
  # float rounding of recomputed ops only (an element whose dropout mask differed would be off by its whole size)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got[2], want[2])


def test_bfloat16_compute_keeps_float32_parameters_softmax_and_loss():
  cfg = bert.BertConfig(**{**NO_DROPOUT.__dict__, 'dtype': jnp.bfloat16})
  model = bert.BertForSequenceClassification(cfg)
  mesh = sharding.make_mesh(config_lib.MeshConfig(8, 1, 1, rules=RULES))
  tx = optim.optimizer(OPTIM, optim.schedule(OPTIM, 10))
  state, shardings = state_lib.init(model, tx, mesh, RULES, seed=0, seq_len=16)
  assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype(jnp.float32)}
  batch = _batches(1)[0]
  jaxpr = jax.make_jaxpr(lambda s, b: step_lib.train_step(s, b, model=model, tx=tx, lr=lambda _: 1e-3))(
      state, batch)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'dot_general']
  text = str(jaxpr)
  assert 'bf16' in text  # the matmuls run in bfloat16 ...
  assert any('preferred_element_type=float32' in str(e) for e in dots) or 'f32[16,4,16,16]' in text  # scores
  assert 'reduce_max' in text and 'f32[16,3]' in text  # ... the logits and the loss are float32
  bf16 = _steps(cfg, n=3)
  f32 = _steps(NO_DROPOUT, n=3)
  np.testing.assert_allclose(bf16[0], f32[0], atol=2e-2)  # stated tolerance: bf16 tracks f32 within 0.02
  assert {x.dtype for x in jax.tree_util.tree_leaves(bf16[2])} == {np.dtype(np.float32)}


def test_label_smoothing_raises_the_loss_of_confident_predictions():
  from jtune.tasks import classification  # pylint: disable=g-import-not-at-top
  logits = jnp.array([[10.0, -10.0]])
  batch = {'labels': jnp.array([0]), 'weights': jnp.array([1.0])}
  plain, smoothed = classification.loss(logits, batch), classification.loss(logits, batch, 0.2)
  assert float(plain) < 1e-6 and float(smoothed) == pytest.approx(0.1 * 20.0, rel=1e-3)


@pytest.mark.parametrize('trainable,lora_rank', [(('^classifier/',), 0), (('/lora_[ab]$', '^classifier/'), 4)])
def test_only_the_chosen_parameters_train_and_hold_optimizer_state(trainable, lora_rank):
  cfg = bert.BertConfig(**{**TINY.__dict__, 'lora_rank': lora_rank})
  optim_cfg = config_lib.OptimConfig(**{**OPTIM.__dict__, 'trainable': trainable})
  mesh = sharding.make_mesh(config_lib.MeshConfig(8, 1, 1, rules=RULES))
  lr = optim.schedule(optim_cfg, 10)
  tx = optim.optimizer(optim_cfg, lr)
  model = bert.BertForSequenceClassification(cfg)
  state, shardings = state_lib.init(model, tx, mesh, RULES, seed=0, seq_len=16)
  before = jax.device_get(state.params)
  train_fn, _ = step_lib.compile_steps(model, tx, lr, mesh, shardings)
  with sharding.activate(mesh, RULES):
    for local in _batches(2):
      state, _ = train_fn(state, sharding.global_batch(local, mesh))
  after = jax.device_get(state.params)
  flat_before = {optim.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(before)}
  flat_after = {optim.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(after)}
  import re  # pylint: disable=g-import-not-at-top
  trained = {k for k in flat_after if any(re.search(t, k) for t in trainable)}
  assert trained and len(trained) < len(flat_after)
  for key in flat_after:
    if key in trained:
      assert not np.array_equal(flat_after[key], flat_before[key]) or 'lora_a' in key, key
    else:
      np.testing.assert_array_equal(flat_after[key], flat_before[key], err_msg=key)  # bit-identical
  trainable_size = sum(flat_after[k].size for k in trained)
  moments = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim)
  assert moments == 2 * trainable_size  # Adam's mu and nu for the trained parameters only


@pytest.mark.parametrize('trainable,lora_rank,most', [
    (('^classifier/',), 0, 0.5),  # a frozen backbone: no backward pass through it at all (0.35 here)
    (('/lora_[ab]$', '^classifier/'), 4, 0.7)])  # LoRA: no frozen weight's gradient (0.53; 0.87 with them)
def test_the_step_differentiates_only_what_trains(trainable, lora_rank, most):
  """The logged grad_norm is the trainable gradient's (the one clipped, as Hugging Face logs it), and the step
  does not compute the frozen weights' gradients: fewer FLOPs than the same model fine-tuned whole."""
  cfg = bert.BertConfig(**{**NO_DROPOUT.__dict__, 'lora_rank': lora_rank})
  model = bert.BertForSequenceClassification(cfg)
  mesh = sharding.make_mesh(config_lib.MeshConfig(8, 1, 1, rules=RULES))
  batch = _batches(1)[0]
  flops = {}
  for name, patterns in (('whole', ('.*',)), ('part', trainable)):
    optim_cfg = config_lib.OptimConfig(**{**OPTIM.__dict__, 'trainable': patterns})
    lr = optim.schedule(optim_cfg, 10)
    tx = optim.optimizer(optim_cfg, lr)
    state, shardings = state_lib.init(model, tx, mesh, RULES, seed=0, seq_len=16)
    train_fn, _ = step_lib.compile_steps(model, tx, lr, mesh, shardings, trainable=patterns)
    with sharding.activate(mesh, RULES):
      global_batch = sharding.global_batch(batch, mesh)
      flops[name] = train_fn.lower(state, global_batch).compile().cost_analysis()['flops']
      params = jax.device_get(state.params)
      _, metrics = train_fn(state, global_batch)
  from jtune.tasks import classification  # pylint: disable=g-import-not-at-top
  grads = jax.grad(lambda p: classification.loss(model.apply({'params': p}, batch['input_ids'],
      batch['attention_mask'], batch['token_type_ids'], deterministic=True), batch))(params)
  trained = [g for path, g in jax.tree_util.tree_leaves_with_path(grads)
             if any(re.search(t, optim.path_str(path)) for t in trainable)]
  assert float(metrics['grad_norm']) == pytest.approx(float(optax.tree.norm(trained)), rel=1e-5)
  assert float(metrics['grad_norm']) < 0.99 * float(optax.tree.norm(grads))
  assert flops['part'] < most * flops['whole'], flops
