"""Orbax CheckpointManager: train state, data-iterator position and run bookkeeping saved together, atomically.

Orbax writes a step into a temporary folder and renames it when every file (of every process) is written, so a
crash mid-save leaves the previous checkpoint as the latest; leftover temporary folders are removed at start-up.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers as policies

from jtune import config as config_lib
from jtune import fs
from jtune.state import TrainState, abstract_like


class CheckpointError(RuntimeError):
  """A checkpoint folder cannot be restored into this run."""


def _root(e: BaseException) -> BaseException:
  """The innermost exception that `e` was raised from."""
  while e.__cause__ is not None:
    e = e.__cause__
  return e


def _cause(e: BaseException) -> str:
  """The OS reason when there is one (tensorstore buries it in a long message), else the first line."""
  text = str(e)
  for reason in ('No space left on device', 'Disk quota exceeded', 'Permission denied', 'Read-only file system'):
    if reason in text:
      return reason
  return config_lib.first_line(e)[:300]


def _reader(directory: fs.epath.Path, **kwargs: Any) -> ocp.CheckpointManager:
  """A read-only CheckpointManager, without Orbax's warnings that it will save nothing."""
  level = logging.get_verbosity()
  logging.set_verbosity(min(level, logging.ERROR))  # absl: the lower, the quieter
  try:
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True), **kwargs)
  finally:
    logging.set_verbosity(level)


class Checkpointer:
  """Keeps the last `keep` checkpoints and the best `keep_best` by `best_metric`; restores any of them."""

  def __init__(self, directory: str | fs.epath.Path, keep: int, keep_best: int = 0, best_metric: str = '',
               best_mode: str = 'max', async_save: bool = True, read_only: bool = False):
    """read_only: a reader beside a run that may be saving (jtune.export): it creates nothing and, unlike a
    writer, does not delete the temporary folders of saves in flight."""
    self.directory = fs.path(directory)
    keep_policies = [policies.LatestN(n=keep)]
    if keep_best > 0:
      keep_policies.append(policies.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == 'min', n=keep_best,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save,
        preservation_policy=policies.AnyPreservationPolicy(keep_policies))
    if read_only:
      self._manager = _reader(self.directory, item_names=('state', 'data'))
    else:
      self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'data'))
    self._saving: int | None = None  # the step of a save that may still be in flight

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: TrainState, data: dict[str, Any], metrics: dict[str, float] | None = None,
           force: bool = False) -> None:
    """Starts a save (in the background when async); the step is published only once complete."""
    try:
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       data=ocp.args.JsonSave(data)),
                         metrics=metrics, force=force)
    except (OSError, ValueError, RuntimeError) as e:  # this save, or the previous one still in flight
      raise self._failed(e) from e
    self._saving = step

  def _failed(self, e: BaseException) -> CheckpointError:
    """Removes the partial step folders of a failed save and says what is left."""
    try:  # the save's other writers may still be running: let them end before removing what they write
      self._manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except  (the failure being reported, or its echo)
      pass
    self._manager.reload()
    complete = {str(step) for step in self._manager.all_steps()}
    for path in self.directory.iterdir() if self.directory.exists() else ():
      partial = 'orbax-checkpoint-tmp' in path.name or (path.name.isdigit() and path.name not in complete)
      if partial and fs.is_local(path):
        shutil.rmtree(path, ignore_errors=True)  # none of them is among the complete steps just read
    latest = self._manager.latest_step()
    kept = f'step {latest} is the latest complete one' if latest is not None else 'there is no complete one yet'
    return CheckpointError(f'checkpoint step {self._saving} could not be written to {self.directory}: '
                           f'{_cause(e)}; {kept}')

  def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Restores `step` (default: latest) onto the shardings of `like`, whatever mesh wrote it.

    Raises CheckpointError, naming the step folder and the complete steps before it, for a folder that lacks an
    item (copied in part), files that cannot be read (truncated, damaged), or a state of another model.
    """
    step = self.latest_step() if step is None else step
    folder = self.directory / str(step)
    missing = [item for item in ('state', 'data') if not (folder / item).is_dir()]
    if missing:
      raise CheckpointError(f'checkpoint {folder} is incomplete: expected its state and data folders, found no '
                            f'{" or ".join(missing)} (copied in part?); {self._way_back(step)}')
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_like(like)), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001  (tensorstore wraps a file it cannot read in a bare Exception)
      root = _root(e)
      cause = config_lib.first_line(root)[:300]
      if (isinstance(root, (json.JSONDecodeError, FileNotFoundError))
          or any(code in cause for code in ('OUT_OF_RANGE', 'DATA_LOSS'))):  # tensorstore's words for bad files
        raise CheckpointError(f'checkpoint {folder} cannot be read (damaged files?): {cause}; '
                              f'{self._way_back(step)}') from e
      if isinstance(e, (ValueError, KeyError, TypeError)):
        raise CheckpointError(f'checkpoint {folder} does not match this model and optimizer: '
                              f'{config_lib.first_line(e)}') from e
      raise CheckpointError(f'checkpoint {folder} could not be restored: {cause}') from e
    return restored.state, restored.data

  def _way_back(self, step: int) -> str:
    """What a user can do about an unreadable `step`: the latest complete step before it."""
    earlier = [s for s in self.all_steps() if s < step]
    return f'remove that folder to go back to step {max(earlier)}' if earlier else 'there is no earlier checkpoint'

  def wait(self) -> None:
    """Blocks until a background save is complete; raises CheckpointError if it failed."""
    try:
      self._manager.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as e:
      raise self._failed(e) from e

  def close(self) -> None:
    self.wait()
    self._manager.close()


def step_folder(path: str) -> fs.epath.Path:
  """A checkpoint step folder from a run's workdir (its latest checkpoint) or from the step folder itself."""
  folder = fs.path(path)
  if (folder / 'state').is_dir():
    return folder
  if (folder / 'checkpoints').is_dir():
    manager = _reader(folder / 'checkpoints')
    latest = manager.latest_step()
    manager.close()
    if latest is not None:
      return folder / 'checkpoints' / str(latest)
  raise CheckpointError(f'config.train.init_from={path!r}: expected a jtune workdir with a complete checkpoint, '
                        'or a checkpoint step folder (one with a state/ subfolder)')


def restore_params(path: str, like_params: Any) -> Any:
  """The parameters another run's checkpoint shares with `like_params` (same path), placed on the shardings of
  `like_params`; the others keep their values from `like_params`. A masked-LM run's encoder goes into a
  classifier this way, whose head (and pooler) the MLM run never had.

  Raises:
    CheckpointError: no complete checkpoint at `path`, no parameter in common, or a shared one of another shape.
  """
  folder = step_folder(path)
  name = f'config.train.init_from={path!r}'
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      saved = checkpointer.metadata(folder / 'state').item_metadata['params']
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    raise CheckpointError(f'{name}: its parameters cannot be read: {config_lib.first_line(e)}') from e
  saved = {tuple(str(k.key) for k in p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(saved)}
  like = traverse_util.flatten_dict(like_params)
  shared = [p for p in like if p in saved]
  if not shared:
    raise CheckpointError(f'{name}: its parameters ({", ".join(sorted({p[0] for p in saved}))}) have none in '
                          f'common with this model ({", ".join(sorted({p[0] for p in like}))})')
  for p in shared:
    if tuple(saved[p].shape) != tuple(like[p].shape):
      raise CheckpointError(f'{name}: parameter {"/".join(p)} has shape {tuple(saved[p].shape)}: expected '
                            f'{tuple(like[p].shape)} for this model')
  target = {'params': traverse_util.unflatten_dict({
      p: jax.ShapeDtypeStruct(like[p].shape, like[p].dtype, sharding=like[p].sharding) for p in shared})}
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(folder / 'state', args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    raise CheckpointError(f'{name}: its parameters do not match this model: {config_lib.first_line(e)}') from e
  like.update(traverse_util.flatten_dict(restored['params']))
  return traverse_util.unflatten_dict(like)
