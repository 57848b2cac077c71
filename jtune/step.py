"""The pure train and eval steps, and where they are jitted with explicit shardings."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jtune import optim, prng, robust
from jtune import sharding as sharding_lib
from jtune.models.layers import HeadInputs
from jtune.state import ENCODER_INPUTS, HEAD_INPUTS, TrainState
from jtune.tasks import classification, common

Batch = dict[str, jax.Array]
# Columns a model takes that a batch may lack: a causal LM's target positions (without them, logits at every one).
OPTIONAL_INPUTS = HEAD_INPUTS['causal_lm']
# XLA:CPU's memory-optimised scheduler, for steps that recompute whole unrolled layers (model.remat='full',
# model.scan_layers=False): XLA's default scheduler keeps several layers' recomputed activations live at once, which
# undoes most of what remat saves (BERT-base 8 x 512: 6,112 MiB of temporaries without remat, 5,845 with, 3,935
# with this scheduler; 12-42% less on the benchmark shapes at 128 and 512 tokens, at the same step times). Not
# used with remat='dots' (-33% to +16%), with scanned layers (-13% to +14%: the scan already frees each layer's
# activations, 1,481 MiB for that BERT-base) nor without remat (the Llama shape needed 15% more memory and 2.5%
# more time): benchmarks/README.md.
REMAT_CPU_OPTIONS = {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}


def compiler_options(mesh: Mesh, remat: str, scan_layers: bool = False) -> dict[str, str] | None:
  """The XLA options the steps compile with: REMAT_CPU_OPTIONS on a CPU mesh when `remat` (model.remat) is
  'full' and the layers are unrolled (model.scan_layers False), else XLA's defaults (None)."""
  cpu = mesh.devices.flat[0].platform == 'cpu'
  return dict(REMAT_CPU_OPTIONS) if remat == 'full' and not scan_layers and cpu else None


def _outputs(model: nn.Module, params: Any, batch: Batch, inputs: tuple[str, ...], perturbations: Any = None,
             **kwargs) -> jax.Array:
  """The model's outputs (logits) for `batch`; `inputs` names the columns the model takes, in order (None for an
  OPTIONAL_INPUTS column the batch lacks). `perturbations`: added to the marked activations (see jtune/robust.py)."""
  variables = {'params': params} if perturbations is None else {'params': params, 'perturbations': perturbations}
  return model.apply(variables, *_columns(batch, inputs), **kwargs)


def _columns(batch: Batch, inputs: tuple[str, ...]) -> list[jax.Array | None]:
  return [batch.get(name) if name in OPTIONAL_INPUTS else batch[name] for name in inputs]


def _micro_batches(batch: Batch, k: int) -> Batch:
  """[B, ...] -> [k, B/k, ...]: micro-batch m takes rows m, m + k, ..., so each keeps the batch's split over
  the data axes (every device contributes B/k/devices rows to every micro-batch)."""
  return jax.tree_util.tree_map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def _perturbation_zeros(model: nn.Module, micro: Batch, inputs: tuple[str, ...]) -> Any:
  """Zeros shaped like the model's 'perturbations' (its word embeddings for this batch)."""
  shapes = jax.eval_shape(lambda: model.init(
      {'params': jax.random.PRNGKey(0)}, *_columns(micro, inputs), deterministic=True))
  if 'perturbations' not in shapes:
    raise ValueError(f'{type(model).__name__} marks no embeddings to perturb: adversarial training '
                     '(train.adversarial) supports the BERT-family encoders')
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['perturbations'])


def dropout_rng_impl(name: str, mesh: Mesh) -> str:
  """The PRNG implementation that draws the dropout masks (config.train.dropout_rng).

  'auto' is 'rbg_xor_fold' where the mesh's devices are CPUs and 'threefry2x32' (JAX's default) on accelerators.
  XLA:CPU runs threefry as a while loop per draw and per fold_in (91 in BERT-base's train step), slow to compile
  and to run; unsafe_rbg draws with XLA's RngBitGenerator (Philox), which it expands into fused element-wise code:
  BERT-base's step compiles about a fifth faster on a 2-core Xeon, and runs as fast (benchmarks/README.md).
  rbg_xor_fold (jtune/prng.py) is unsafe_rbg with a fold_in that XLA folds to a constant, a tenth fewer
  instructions again. Their masks are the same on any mesh, but XLA draws them whole on every device and keeps its
  shard (threefry draws only the shard), which is why accelerators, where meshes are wide, keep threefry. 'unsafe'
  is JAX's word for a fold_in and split that are not proven hashes, as T5X and MaxText use it for dropout.
  """
  if name == 'auto':
    return 'rbg_xor_fold' if all(d.platform == 'cpu' for d in mesh.devices.flat) else 'threefry2x32'
  return name


def dropout_key(rng: jax.Array, step: jax.Array, impl: str, micro_batch: jax.Array | None = None) -> jax.Array:
  """The dropout key of a step (and of one of its micro-batches): the state's raw threefry key folded with the
  step (and the micro-batch's index) by threefry, then drawn into `impl`'s key. unsafe_rbg's and rbg_xor_fold's
  own fold_in is an XOR with a hash of the data, so folding the micro-batch there would commute with apply_layers'
  fold of the layer index: micro-batch m's layer i would draw micro-batch i's layer m masks."""
  key = jax.random.fold_in(rng, step)
  if micro_batch is not None:
    key = jax.random.fold_in(key, micro_batch)
  if impl == 'threefry2x32':
    return key
  return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl=prng.impl(impl))


def _trainable_part(params: Any, trainable: tuple[str, ...]) -> tuple[Any, Callable[[Any], Any],
                                                                        Callable[[Any], Any]]:
  """(the parameters that train, with None where one is frozen; a function that puts the frozen ones back
  beside them; one that fills a gradient of the trainable ones out with zeros). `trainable`: config.optim.trainable.
  The train step differentiates the trainable part only, so a LoRA or frozen-backbone step computes no frozen
  weight's gradient, and its logged norm and non-finite check cover what trains, the norm its clip uses."""
  if trainable == ('.*',):
    return params, lambda part: part, lambda grads: grads
  labels = optim.trainable_mask(trainable)(params)
  part = jax.tree_util.tree_map(lambda label, p: p if label == 'train' else None, labels, params)
  merge = lambda part: jax.tree_util.tree_map(  # noqa: E731
      lambda label, t, p: t if label == 'train' else p, labels, part, params)
  fill = lambda grads: jax.tree_util.tree_map(  # noqa: E731
      lambda label, g, p: g if label == 'train' else jnp.zeros_like(p), labels, grads, params)
  return part, merge, fill


def train_step(state: TrainState, batch: Batch, *, model: nn.Module, tx: optax.GradientTransformation,
               lr: optax.Schedule, accumulation_steps: int = 1, label_smoothing: float = 0.0,
               task: Any = classification, task_cfg: Any = None, inputs: tuple[str, ...] = ENCODER_INPUTS,
               class_weights: tuple[float, ...] | None = None, robust_cfg: Any = None,
               rng_impl: str = 'threefry2x32', trainable: tuple[str, ...] = ('.*',)
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on one global batch, its gradient summed over `accumulation_steps` micro-batches.

  `task` is a jtune.tasks module: its `loss_sums` turns the model's outputs into (loss sum, weight sum).
  `class_weights`: each example's loss weighted by its class's weight (a weighted mean, as PyTorch's
  CrossEntropyLoss(weight=...)). `robust_cfg`: the TrainConfig whose adversarial / R-Drop options
  (jtune/robust.py) replace the plain loss when set. `rng_impl`: the PRNG implementation of the dropout masks
  (`dropout_rng_impl`). `trainable`: the patterns of the parameters that train (config.optim.trainable); the
  gradient is taken of those only (`_trainable_part`).
  """
  part, merge, fill = _trainable_part(state.params, trainable)

  def loss_sums(part, micro, rng):
    params = merge(part)
    if class_weights is not None:
      micro = {**micro, 'weights': micro['weights'] * jnp.asarray(class_weights, jnp.float32)[micro['labels']]}
    loss = lambda outputs: task.loss_sums(outputs, micro, label_smoothing, task_cfg)  # noqa: E731
    if robust_cfg is None or not robust.is_on(robust_cfg):
      return loss(_outputs(model, params, micro, inputs, deterministic=False, rngs={'dropout': rng}))

    def apply(params, delta, rng):
      return _outputs(model, params, micro, inputs, delta, deterministic=False, rngs={'dropout': rng})
    zeros = _perturbation_zeros(model, micro, inputs) if robust_cfg.adversarial != 'none' else None
    return robust.loss_sums(apply, loss, params, zeros, rng, robust_cfg, micro['weights'])

  if accumulation_steps == 1:
    def mean_loss(params, micro, rng):  # the mean's gradient directly: no pass dividing every gradient after
      total, weight = loss_sums(params, micro, rng)
      return common.weighted_mean(total, jax.lax.stop_gradient(weight))
    loss, grads = jax.value_and_grad(mean_loss)(part, batch, dropout_key(state.rng, state.step, rng_impl))
  else:
    sums_and_grads = jax.value_and_grad(loss_sums, has_aux=True)

    def accumulate(carry, xs):
      micro, index = xs
      out = sums_and_grads(part, micro, dropout_key(state.rng, state.step, rng_impl, index))
      return jax.tree_util.tree_map(jnp.add, carry, out), None
    zeros = ((jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
             jax.tree_util.tree_map(jnp.zeros_like, part))
    ((total, weight), grads), _ = jax.lax.scan(
        accumulate, zeros, (_micro_batches(batch, accumulation_steps), jnp.arange(accumulation_steps)))
    loss, grads = common.weighted_mean(total, weight), jax.tree_util.tree_map(
        lambda g: common.weighted_mean(g, weight), grads)
  grad_norm = optax.tree.norm(grads)
  params, opt_state = optim.apply_gradients(tx, fill(grads), state.opt_state, state.params, grad_norm)
  metrics = {'loss': loss, 'grad_norm': grad_norm, 'learning_rate': lr(state.step),
             **optim.nonfinite_counts(opt_state)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, *, model: nn.Module, task: Any = classification, task_cfg: Any = None,
              inputs: tuple[str, ...] = ENCODER_INPUTS) -> dict[str, jax.Array]:
  """The task's evaluation outputs for one global batch (sums, or per-row predictions)."""
  return task.eval_outputs(_outputs(model, params, batch, inputs, deterministic=True), batch, task_cfg)


def predict_step(params: Any, batch: Batch, *, model: nn.Module, inputs: tuple[str, ...] = ENCODER_INPUTS
                 ) -> jax.Array:
  """The model's logits for `batch`; a causal LM that hands its loss the LM head's inputs (model.lm_head_chunks)
  gets its head applied here."""
  outputs = _outputs(model, params, batch, inputs, deterministic=True)
  return outputs.logits(outputs.x_BLD) if isinstance(outputs, HeadInputs) else outputs


def compile_steps(model: nn.Module, tx: optax.GradientTransformation, lr: optax.Schedule,
                  mesh: Mesh, state_shardings: TrainState, accumulation_steps: int = 1,
                  label_smoothing: float = 0.0, task: Any = classification, task_cfg: Any = None,
                  inputs: tuple[str, ...] = ENCODER_INPUTS, class_weights: tuple[float, ...] | None = None,
                  robust_cfg: Any = None, dropout_rng: str = 'auto', trainable: tuple[str, ...] = ('.*',)
                  ) -> tuple[Callable, Callable]:
  """jit(train_step) and jit(eval_step) with explicit shardings; the state's buffers are donated.
  `dropout_rng`: config.train.dropout_rng (`dropout_rng_impl`); `trainable`: config.optim.trainable. The model's
  config (`model.cfg`: remat, scan_layers) picks the XLA options (`compiler_options`)."""
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  options = compiler_options(mesh, model.cfg.remat, model.cfg.scan_layers)
  train = jax.jit(
      functools.partial(train_step, model=model, tx=tx, lr=lr, accumulation_steps=accumulation_steps,
                        label_smoothing=label_smoothing, task=task, task_cfg=task_cfg, inputs=inputs,
                        class_weights=class_weights, robust_cfg=robust_cfg,
                        rng_impl=dropout_rng_impl(dropout_rng, mesh), trainable=trainable),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,), compiler_options=options)
  evaluate = jax.jit(
      functools.partial(eval_step, model=model, task=task, task_cfg=task_cfg, inputs=inputs),
      in_shardings=(state_shardings.params, batch_sharding),
      out_shardings=replicated, compiler_options=options)
  return train, evaluate
