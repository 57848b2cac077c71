"""SIGTERM (what a TPU VM gets before preemption, and what `kill` sends): stop at a step every process agrees on.

Single process: a signal handler sets a flag that the loop reads after each step. Multi-process: JAX's
preemption service (started by `jax.distributed`) catches the signal on whichever host gets it and agrees on a
step that every process reaches (`multihost_utils.reached_preemption_sync_point`), so all save the same step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

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

  def noted(self) -> bool:
    """Whether a SIGTERM came (one process; several agree on a step through `reached` only)."""
    return self._signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class Interrupted(BaseException):
  """SIGTERM arrived during work that a rerun of the command does again (the run's final export). A
  BaseException, as KeyboardInterrupt: no `except Exception` on the way takes it for that code's own failure."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
  """Within: SIGTERM raises Interrupted in the main thread of a single-process run, so that what was being
  written is removed by its own clean-up (a folder's staging copy) and the run can exit 0 at once: a preempted
  machine's grace period is short. Elsewhere (several processes: JAX's service owns the signal), nothing."""
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield
    return

  def interrupt(signum, frame):
    del signum, frame
    raise Interrupted('SIGTERM')

  previous = signal.signal(signal.SIGTERM, interrupt)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
