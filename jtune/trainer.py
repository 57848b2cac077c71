"""The training loop: cadence of logging, evaluation, checkpointing and export. No math here."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import tqdm

from jtune import best as best_lib
from jtune import checkpoint as checkpoint_lib
from jtune import config as config_lib
from jtune import decoding, executables, seq2seq_decoding
from jtune import fs
from jtune import metrics as metrics_lib
from jtune import modeling, optim, preemption
from jtune import sharding as sharding_lib
from jtune import state as state_lib
from jtune import step as step_lib
from jtune import tasks
from jtune.data import batching, pipeline
from jtune.data.features import Features
from jtune.tasks import classification

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
  """Everything the loop needs, built once by `setup`."""
  cfg: config_lib.Config
  workdir: fs.epath.Path
  mesh: jax.sharding.Mesh
  model: modeling.Model
  task: Any  # the jtune.tasks module
  labels: list[str]
  train_iter: batching.TrainIterator
  eval_split: Features
  total_steps: int
  state: state_lib.TrainState
  shardings: state_lib.TrainState
  checkpointer: checkpoint_lib.Checkpointer
  train_fn: Callable
  eval_fn: Callable
  best: best_lib.BestTracker


# TrainConfig fields that the loop reads and the train and eval steps do not (length, cadence, checkpoints, export,
# batch sizes, which the batches' shapes carry): a second run that changes only these still loads its compiled steps
LOOP_ONLY = ('batch_size', 'eval_batch_size', 'num_epochs', 'num_steps', 'log_every_steps', 'eval_every_steps',
             'checkpoint_every_steps', 'async_checkpoints', 'keep_checkpoints', 'keep_best', 'best_metric',
             'best_mode', 'early_stopping_patience', 'max_nonfinite_steps', 'init_from', 'export',
             'export_checkpoint', 'eval_at_start', 'cache_executables')


class NonFiniteError(RuntimeError):
  """Too many steps in a row had a NaN or Inf loss or gradients."""


def prepare_workdir(workdir: str) -> fs.epath.Path:
  """Creates the workdir (a folder or a bucket path); one that cannot be written is an error up front."""
  path = fs.path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise config_lib.ConfigError(f'--workdir={workdir!r}: cannot create it ({e.strerror or e})') from e
  if fs.is_local(path) and not os.access(path, os.W_OK):
    raise config_lib.ConfigError(f'--workdir={workdir!r}: expected a writable folder')
  return path


def setup(cfg: config_lib.Config, workdir: str) -> Run:
  """Validates inputs, then builds mesh, data, model, state (restored or pretrained) and steps."""
  workdir_path = prepare_workdir(workdir)
  checkpoints = workdir_path / 'checkpoints'
  if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
    check_resumable(cfg, workdir_path)  # before the data and the model: a refusal comes at once
  mesh = sharding_lib.make_mesh(cfg.mesh)
  sharding_lib.check_batch_size(cfg.train.batch_size, mesh, 'train.batch_size')
  sharding_lib.check_batch_size(cfg.train.batch_size // cfg.train.accumulation_steps, mesh,
                                'train.batch_size / train.accumulation_steps')
  sharding_lib.check_batch_size(cfg.train.eval_batch_size, mesh, 'train.eval_batch_size')
  task, model, labels, train_data, eval_data = prepare(cfg)
  class_weights = (classification.class_weights(cfg.task.class_weights, train_data.labels, len(labels))
                   if cfg.task.class_weights else None)
  if cfg.data.oversample:
    train_data = classification.oversample(train_data, cfg.seed)
  train_iter = batching.TrainIterator(
      train_data, cfg.train.batch_size, cfg.data.buckets, cfg.seed, model.pad_id,
      sharding_lib.process_rows(mesh, cfg.train.batch_size), cfg.data.target_buckets, cfg.data.group_by_length)
  _LOG.info('Process %d of %d feeds rows %d:%d of each global batch of %d', jax.process_index(),
            jax.process_count(), train_iter.local_rows.start, train_iter.local_rows.stop, cfg.train.batch_size)
  steps_per_epoch = train_iter.steps_per_epoch
  if steps_per_epoch == 0:
    raise config_lib.ConfigError(
        f'config.train.batch_size={cfg.train.batch_size}: expected at most the '
        f'{len(train_data)} training examples')
  total = cfg.train.num_steps if cfg.train.num_steps > 0 else cfg.train.num_epochs * steps_per_epoch
  if optim.warmup_steps(cfg.optim, total) >= total:
    raise config_lib.ConfigError(
        f'config.optim.warmup_steps={cfg.optim.warmup_steps}: expected fewer than the {total} training steps')
  lr = optim.schedule(cfg.optim, total)
  tx = optim.optimizer(cfg.optim, lr)
  state, shardings = state_lib.init(model.module, tx, mesh, cfg.mesh.rules, cfg.seed,
                                    cfg.data.buckets[0], model.inputs)
  _check_lora_targets(cfg.model, state.params)
  _log_sizes(cfg, state)
  t = cfg.train
  checkpointer = checkpoint_lib.Checkpointer(
      workdir_path / 'checkpoints', t.keep_checkpoints, t.keep_best, t.best_metric, t.best_mode,
      t.async_checkpoints)
  best = best_lib.BestTracker(t.best_metric, t.best_mode, t.early_stopping_patience)
  state = _restore_or_load(cfg, model, labels, state, shardings, checkpointer, train_iter, best)
  steps_train = dataclasses.replace(t, **dict.fromkeys(LOOP_ONLY))  # all that the steps may read of cfg.train
  train_fn, eval_fn = step_lib.compile_steps(model.module, tx, lr, mesh, shardings, t.accumulation_steps,
                                             t.label_smoothing, task, cfg.task, model.inputs, class_weights,
                                             steps_train, t.dropout_rng, cfg.optim.trainable)
  if t.cache_executables:  # what the steps are made from, besides their arguments (not data, seed or cache_dir)
    description = repr((cfg.model, cfg.task, cfg.optim, cfg.mesh, steps_train, total, class_weights, model.module))
    folder = os.path.join(cfg.cache_dir, 'executables')
    train_fn = executables.cached(train_fn, folder, 'train ' + description)
    eval_fn = executables.cached(eval_fn, folder, 'eval ' + description)
  return Run(cfg, workdir_path, mesh, model, task, labels, train_iter, eval_data, total, state,
             shardings, checkpointer, train_fn, eval_fn, best)


def prepare(cfg: config_lib.Config) -> tuple[Any, modeling.Model, list[str], Features, Features]:
  """(task module, model, label names, train features, eval features): data checked, model built, tokenized."""
  d, task = cfg.data, tasks.TASKS[cfg.task.name]
  train_ds, eval_ds = pipeline.load_splits(d, functools.partial(task.check, task=cfg.task))
  labels = task.label_names(train_ds, d)
  model = modeling.build(cfg, task.HEAD, task.num_outputs(labels))
  train_data = task.featurize(train_ds, d.train_split, d, cfg.task, model.tokenizer, labels, training=True)
  eval_data = task.featurize(eval_ds, d.eval_split, d, cfg.task, model.tokenizer, labels, training=False)
  return task, model, labels, train_data, eval_data


def _check_lora_targets(m: config_lib.ModelConfig, params: Any) -> None:
  """Raises ConfigError when LoRA is on and its target patterns matched no layer (nothing would be adapted)."""
  paths = [optim.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  if m.lora_rank and not any(p.endswith('/lora_a') for p in paths):
    layers = [p.rsplit('/', 1)[0] for p in paths if p.endswith('/kernel')]
    raise config_lib.ConfigError(
        f'config.model.lora.targets={m.lora_targets}: match no layer of this model, so LoRA would adapt nothing; '
        f'expected patterns of its layer paths (e.g. {", ".join(layers[:3])})')


def _log_sizes(cfg: config_lib.Config, state: state_lib.TrainState) -> None:
  """Parameter count, how many of them train, and the optimizer state's size (all processes together)."""
  labels = optim.trainable_mask(cfg.optim.trainable)(state.params)
  sizes = jax.tree_util.tree_map(lambda x, label: (x.size, label == 'train'), state.params, labels)
  pairs = jax.tree_util.tree_leaves(sizes, is_leaf=lambda x: isinstance(x, tuple))
  total, trainable = sum(n for n, _ in pairs), sum(n for n, t in pairs if t)
  opt_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state.opt_state))
  _LOG.info('Parameters: %s (%s trainable); optimizer state: %.2f MiB', f'{total:,}', f'{trainable:,}',
            opt_bytes / 2**20)


# What a resumed run must share with the run that wrote the checkpoint: what it trains, on what, and how its data
# is drawn. The rest (steps, epochs, learning rate, evaluation and checkpoint cadence, ...) may change on a resume.
RESUME_FIELDS = ('seed', 'model.name_or_path', 'model.architecture', 'model.init', 'model.config_overrides',
                 'model.lora_rank', 'model.lora_targets', 'task.name', 'data.dataset', 'data.dataset_config',
                 'data.data_files', 'data.train_split', 'data.text_column', 'data.text_pair_column',
                 'data.label_column', 'data.max_train_examples', 'data.max_length', 'data.oversample',
                 'model.tokenizer', 'task.stride', 'task.packing', 'task.prompt_template', 'task.response_template',
                 'optim.name', 'optim.trainable', 'train.batch_size')
_FLAG_NAMES = {'model.lora_rank': 'model.lora.rank', 'model.lora_targets': 'model.lora.targets'}  # typed -> flag


def check_resumable(cfg: config_lib.Config, workdir: fs.epath.Path) -> None:
  """Raises a one-line ConfigError when `cfg` differs from the workdir's config.json in a RESUME_FIELDS field, or
  when that file is not JSON (damaged: the run's checkpoints would resume unchecked and the file be overwritten).
  A config.json this jtune cannot read as a config (from an older version), or none, is not compared."""
  path = workdir / 'config.json'
  try:
    text = path.read_text()
  except OSError:
    return
  try:
    saved = json.loads(text)
  except ValueError as e:
    raise config_lib.ConfigError(
        f'{path}: not valid JSON ({e}): expected the config.json that jtune wrote for the checkpoints in '
        f'{workdir / "checkpoints"} (put it back, delete it to resume without checking the config, or give a new '
        '--workdir)') from e
  try:
    saved = config_lib.from_saved(saved)
  except (ValueError, AttributeError, KeyError, TypeError, config_lib.ConfigError):
    return
  for field in RESUME_FIELDS:
    was, now = (functools.reduce(getattr, field.split('.'), c) for c in (saved, cfg))
    if json.dumps(was) != json.dumps(now):  # as config.json holds them: tuples and lists alike
      raise config_lib.ConfigError(
          f'config.{_FLAG_NAMES.get(field, field)}={now!r}: expected {was!r}, as the run in {workdir} was started '
          'with (its checkpoints resume only that run: set the same value, or give a new --workdir)')


def _restore_or_load(cfg, model, labels, state, shardings, checkpointer, train_iter, best):
  """Resume order: the workdir's latest checkpoint; else the pretrained weights (or random init), overlaid with
  the weights `init_from` shares with this model."""
  latest = checkpointer.latest_step()
  if latest is not None:
    _LOG.info('Resuming from %s', checkpointer.directory / str(latest))
    state, data_state = checkpointer.restore(state)
    if data_state['labels'] != labels:
      raise checkpoint_lib.CheckpointError(
          f'checkpoint labels {data_state["labels"]} differ from the dataset labels {labels}')
    train_iter.set_state(data_state['iterator'])
    best.set_state(data_state['best'])
    return state
  if cfg.model.init == 'pretrained':
    state = modeling.load_pretrained(model, state, shardings)
  if cfg.train.init_from:  # over the pretrained weights: what the other run lacks (a new head) stays as it was
    _LOG.info('Warm start from the weights of %s', cfg.train.init_from)
    state = state.replace(params=checkpoint_lib.restore_params(cfg.train.init_from, state.params))
  return state


def evaluate(run: Run, params) -> dict[str, float]:
  """The task's metrics over the whole evaluation split; filler rows of the last batch carry weight 0.

  Every batch is dispatched before anything is fetched; the outputs come to the host once, at the end.
  """
  batch_size = run.cfg.train.eval_batch_size
  outputs = [run.eval_fn(params, sharding_lib.global_batch(local, run.mesh))
             for local in batching.eval_batches(run.eval_split, batch_size, run.cfg.data.buckets, run.model.pad_id,
                                                sharding_lib.process_rows(run.mesh, batch_size),
                                                run.cfg.data.target_buckets)]
  metrics = run.task.summarize(jax.device_get(outputs), run.eval_split, run.cfg.task)
  if run.cfg.task.generate_examples:
    metrics.update(run.task.generation_metrics(functools.partial(generate, run, params), run.eval_split,
                                               run.model.tokenizer, run.cfg.task.generate_examples))
  return metrics


def generate(run: Run, params, prompts: list[list[int]]) -> list[list[int]]:
  """The model's outputs for `prompts` (token ids), with the KV cache, in eval-batch-sized groups: a decoder
  LM's greedy continuations, or an encoder-decoder's greedy or beam-searched (task.num_beams) targets."""
  out = []
  size, task, model = run.cfg.train.eval_batch_size, run.cfg.task, run.model
  for start in range(0, len(prompts), size):
    rows = prompts[start:start + size]
    if run.task.HEAD == 'seq2seq':
      out += seq2seq_decoding.generate(model.module, params, rows, max_new_tokens=task.max_new_tokens,
                                       num_beams=task.num_beams, length_penalty=task.length_penalty,
                                       eos_token_id=model.eos_id, pad_token_id=model.pad_id)
    else:
      out += decoding.generate(model.module, params, rows, max_new_tokens=task.max_new_tokens,
                               eos_token_id=model.tokenizer.eos_token_id, pad_token_id=model.pad_id)
  return out


def _write_run_files(run: Run, resolved_config: dict) -> None:
  if jax.process_index() != 0:
    return
  fs.write_text(run.workdir / 'config.json', json.dumps(resolved_config, indent=2, sort_keys=True))
  fs.write_text(run.workdir / 'labels.json', json.dumps(run.labels))


def _is_due(step: int, every: int, total: int) -> bool:
  return step % every == 0 or step == total


def _check_finite(in_a_row: int, step: int, limit: int) -> None:
  if in_a_row >= limit:
    raise NonFiniteError(
        f'step {step}: the last {in_a_row} steps had a NaN or Inf loss or gradients (updates skipped; '
        f'train.max_nonfinite_steps={limit}); lower optim.learning_rate or check the data. The last '
        'checkpoint holds the finite state before them')


class _StepLogger:
  """Train metrics fetched one step late, so the device never waits on the host."""

  def __init__(self, writer: metrics_lib.MetricWriter, bar: tqdm.tqdm, batch_size: int, step: int,
               max_nonfinite: int):
    self._writer, self._bar, self._batch_size = writer, bar, batch_size
    self._max_nonfinite = max_nonfinite
    self._pending = None
    self.restart_clock(step)

  def restart_clock(self, step: int) -> None:
    """Throughput counts from here (after evaluation, which is not training time)."""
    self._last_time, self._last_step = time.perf_counter(), step

  def push(self, step: int, metrics: dict[str, jax.Array], due: bool) -> None:
    self.flush()
    if due:
      self._pending = (step, metrics)

  def flush(self) -> None:
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    values['examples_per_sec'] = ((step - self._last_step) * self._batch_size /
                                  max(now - self._last_time, 1e-9))
    self._last_time, self._last_step = now, step
    self._writer.write(step, values)
    self._bar.set_postfix(loss=f'{values["loss"]:.4f}', lr=f'{values["learning_rate"]:.2e}',
                          ex_s=f'{values["examples_per_sec"]:.1f}')
    _check_finite(int(values['nonfinite_in_a_row']), step, self._max_nonfinite)


def _save(run: Run, step: int, state, metrics: dict[str, float] | None, force: bool = False) -> None:
  """Checkpoints a state known to be finite (the non-finite count is read back first: one sync)."""
  in_a_row = int(jax.device_get(optim.nonfinite_counts(state.opt_state)['nonfinite_in_a_row']))
  _check_finite(in_a_row, step, run.cfg.train.max_nonfinite_steps)
  data = {'iterator': run.train_iter.get_state(), 'labels': run.labels, 'best': run.best.state()}
  run.checkpointer.save(step, state, data, metrics=metrics, force=force)


def _export(run: Run, state) -> None:
  """The best checkpoint's weights when evaluation ran and export_checkpoint='best', else the last ones."""
  params, best_step = state.params, run.best.step
  if run.cfg.train.export_checkpoint == 'best' and best_step is not None and best_step != int(state.step):
    run.checkpointer.wait()
    if best_step in run.checkpointer.all_steps():
      _LOG.info('Exporting the best checkpoint: step %d (%s=%.4f)', best_step, run.best.metric, run.best.value)
      params = run.checkpointer.restore(state, best_step)[0].params
  modeling.export(run.model, params, run.labels, run.task.PROBLEM_TYPE, run.workdir / 'export', owned=True)
  if jax.process_count() > 1:  # the others wait for process 0's writing: exiting, they would enter JAX's shutdown
    multihost_utils.sync_global_devices('jtune export')  # barrier, whose timeout (300 s) kills a slow upload


def train(run: Run, resolved_config: dict) -> dict[str, float]:
  """Runs from the state's step to the end, early stopping or preemption; returns the last evaluation.

  Checkpoints: every `checkpoint_every_steps`, after every evaluation (with its metrics, for keep-best), at the
  end, and at the step where a SIGTERM is honoured (then the run exits without exporting; rerun to resume).
  """
  cfg, start = run.cfg, int(jax.device_get(run.state.step))
  _write_run_files(run, resolved_config)
  is_main = jax.process_index() == 0
  writer = metrics_lib.MetricWriter(run.workdir, enabled=is_main, resume_step=start)
  eval_every = cfg.train.eval_every_steps
  if eval_every == -1:
    eval_every = run.train_iter.steps_per_epoch
  bar = tqdm.tqdm(total=run.total_steps, initial=start, disable=not is_main, unit='step',
                  dynamic_ncols=True)
  logger = _StepLogger(writer, bar, cfg.train.batch_size, start, cfg.train.max_nonfinite_steps)
  preempt = preemption.Preemption()
  stopped = run.best.stop_reason(start) if start and run.best.should_stop() else ''  # a rerun stays stopped
  state, eval_metrics, last = run.state, {}, start if stopped else run.total_steps
  try:
    with sharding_lib.activate(run.mesh, cfg.mesh.rules):
      if cfg.train.eval_at_start and start == 0:
        before = {f'eval_{k}': v for k, v in evaluate(run, state.params).items()}
        writer.write(0, before)
        bar.write('step 0: ' + ', '.join(f'{k}={v:.4f}' for k, v in before.items()))
        logger.restart_clock(0)
      for step in range(start + 1, last + 1):
        batch = sharding_lib.global_batch(next(run.train_iter), run.mesh)
        state, metrics = run.train_fn(state, batch)
        logger.push(step, metrics, due=_is_due(step, cfg.train.log_every_steps, run.total_steps))
        bar.update(1)
        saved_metrics = None
        if _is_due(step, eval_every, run.total_steps):
          logger.flush()
          eval_metrics = {f'eval_{k}': v for k, v in evaluate(run, state.params).items()}
          writer.write(step, eval_metrics)
          bar.write(f'step {step}: ' + ', '.join(f'{k}={v:.4f}' for k, v in eval_metrics.items()))
          logger.restart_clock(step)
          saved_metrics = eval_metrics
          if run.best.update(step, eval_metrics):
            stopped = run.best.stop_reason(step)
        if preempt.reached(step):
          stopped = f'SIGTERM: saved step {step}; run the same command again to resume'
        if saved_metrics is not None or stopped or _is_due(step, cfg.train.checkpoint_every_steps,
                                                           run.total_steps):
          _save(run, step, state, saved_metrics, force=bool(stopped))
        if stopped:
          break
      logger.flush()
  finally:
    bar.close()
    run.checkpointer.wait()  # under Preemption's handler: a SIGTERM meanwhile is noted, not fatal to the save
    writer.close()
    preempt.close()
  if not stopped and preempt.noted():  # a SIGTERM after the loop's last look (during the last save or flush)
    stopped = f'SIGTERM: saved step {int(jax.device_get(state.step))}; run the same command again to export'
  _finish(run, state, stopped)
  return eval_metrics


def _finish(run: Run, state, stopped: str) -> None:
  """Exports the run unless a SIGTERM stopped it; a SIGTERM during the export ends it, as a rerun exports."""
  if stopped:
    _LOG.info('Stopped: %s', stopped)
  run.state = state
  if run.cfg.train.export and not stopped.startswith('SIGTERM'):
    try:
      with preemption.sigterm_interrupts():
        _export(run, state)
    except preemption.Interrupted:
      _LOG.info('Stopped: SIGTERM during the export, after step %d was saved; run the same command again to '
                'export', int(jax.device_get(state.step)))
  run.checkpointer.close()
