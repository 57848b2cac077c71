"""The best-evaluation tracker and early stopping."""

import math

from jtune import best


def test_max_mode_ties_move_the_best_but_not_the_patience():
  tracker = best.BestTracker('eval_accuracy', 'max', patience=2)
  assert not tracker.update(2, {'eval_accuracy': 0.5})
  assert not tracker.update(4, {'eval_accuracy': 0.7})
  assert not tracker.update(6, {'eval_accuracy': 0.7})  # a tie: newer best step (as Orbax keeps), no reset
  assert (tracker.step, tracker.evals_since_improvement) == (6, 1)
  assert tracker.update(8, {'eval_accuracy': 0.6})  # the second evaluation without a strict improvement
  assert tracker.value == 0.7


def test_min_mode_nan_and_state_round_trip():
  tracker = best.BestTracker('eval_loss', 'min', patience=-1)
  for step, loss in [(1, 0.9), (2, math.nan), (3, 0.4), (4, 0.5)]:
    assert not tracker.update(step, {'eval_loss': loss})  # patience -1: never stops
  assert (tracker.step, tracker.value, tracker.evals_since_improvement) == (3, 0.4, 1)
  again = best.BestTracker('eval_loss', 'min', patience=-1)
  again.set_state(tracker.state())
  assert again == tracker
