"""The best evaluation so far, by `train.best_metric`, and early stopping on it; saved in every checkpoint."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass
class BestTracker:
  """Ties count as the newer best (as Orbax's BestN keeps the newer of equal checkpoints), but only a strict
  improvement resets the early-stopping count."""
  metric: str
  mode: str  # 'max' or 'min'
  patience: int  # evaluations without a strict improvement before stopping; -1: never
  value: float | None = None
  step: int | None = None
  evals_since_improvement: int = 0

  def update(self, step: int, metrics: dict[str, float]) -> bool:
    """Records an evaluation; returns True when early stopping says to stop."""
    value = metrics[self.metric]
    if math.isnan(value):
      strict, tie = False, False
    elif self.value is None:
      strict, tie = True, False
    else:
      strict = value > self.value if self.mode == 'max' else value < self.value
      tie = value == self.value
    if strict or tie:
      self.value, self.step = value, step
    self.evals_since_improvement = 0 if strict else self.evals_since_improvement + 1
    return self.should_stop()

  def should_stop(self) -> bool:
    """Early stopping's verdict on the evaluations so far (also after a resume: a run that stopped stays so)."""
    return self.patience > 0 and self.evals_since_improvement >= self.patience

  def stop_reason(self, step: int) -> str:
    return (f'early stopping at step {step}: {self.patience} evaluations without a better {self.metric} than '
            f'{self.value:.4f} (step {self.step})')

  def state(self) -> dict[str, Any]:
    return {'value': self.value, 'step': self.step, 'evals_since_improvement': self.evals_since_improvement}

  def set_state(self, state: dict[str, Any]) -> None:
    self.value, self.step = state['value'], state['step']
    self.evals_since_improvement = int(state['evals_since_improvement'])
