"""SIGTERM (what a TPU VM gets before preemption, and what `kill` sends): stop at a step every process agrees on.

Single process: a signal handler sets a flag that the loop reads after each step. Multi-process: JAX's
preemption service (started by `jax.distributed`) catches the signal on whichever host gets it and agrees on a
step that every process reaches (`multihost_utils.reached_preemption_sync_point`), so all save the same step.
"""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class Preemption:
  """`reached(step)` is True at the step where the run should save and stop; call it at every step."""

  def __init__(self):
    self._multi = jax.process_count() > 1
    self._signalled = False
    self._previous = None
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._signalled = True

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
