"""Orbax CheckpointManager: train state, data-iterator position and labels saved together, atomically."""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp

from jtune import fs
from jtune.state import TrainState, abstract_like


class CheckpointError(RuntimeError):
  """A checkpoint folder cannot be restored into this run."""


class Checkpointer:
  """Keeps the last `keep` checkpoints under `directory`; restores the latest one."""

  def __init__(self, directory: str | fs.epath.Path, keep: int):
    self.directory = fs.path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: TrainState, data: dict[str, Any], force: bool = False) -> None:
    """Starts an asynchronous save; orbax publishes the step only once every file is written."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data)), force=force)

  def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Restores `step` (default: latest) onto the shardings of `like`."""
    step = self.latest_step() if step is None else step
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_like(like)), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f'checkpoint {self.directory / str(step)} does not match this model and optimizer: {first}'
      ) from e
    return restored.state, restored.data

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
