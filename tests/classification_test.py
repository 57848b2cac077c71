"""Classification loss and metrics against hand-worked values."""

import jax.numpy as jnp
import numpy as np
import pytest

from jtune.tasks import classification


def test_loss_ignores_padding_examples():
  logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
  batch = {'labels': jnp.array([0, 0, 1]), 'weights': jnp.array([1.0, 1.0, 0.0])}
  expected = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(2.0))) / 2
  assert float(classification.loss(logits, batch)) == pytest.approx(expected, rel=1e-6)


def test_metrics_hand_worked():
  # true: 0 0 0 1 1 2 ; predicted: 0 0 1 1 2 2 ; plus one padding example predicted 0.
  labels = jnp.array([0, 0, 0, 1, 1, 2, 0])
  pred = jnp.array([0, 0, 1, 1, 2, 2, 0])
  logits = jnp.eye(3)[pred] * 10.0
  weights = jnp.array([1, 1, 1, 1, 1, 1, 0], jnp.float32)
  batch = {'labels': labels, 'weights': weights}
  halves = [classification.eval_outputs(logits[rows], {k: v[rows] for k, v in batch.items()})
            for rows in (slice(0, 4), slice(4, 7))]  # two eval batches add up
  m = classification.summarize(halves)
  assert m['count'] == 6
  assert m['accuracy'] == pytest.approx(4 / 6)
  # per class precision: 2/2, 1/2, 1/2 ; recall: 2/3, 1/2, 1/1
  assert m['precision'] == pytest.approx((1 + 0.5 + 0.5) / 3)
  assert m['recall'] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
  f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 * 1 / 1.5]
  assert m['f1'] == pytest.approx(np.mean(f1))
