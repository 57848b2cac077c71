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


def test_macro_averages_over_the_classes_true_or_predicted_like_scikit_learn():
  # 4 classes; true 0 0 1 1, predicted 0 2 1 1: class 3 is neither (left out), class 2 only predicted (counts).
  labels, pred = jnp.array([0, 0, 1, 1]), jnp.array([0, 2, 1, 1])
  out = classification.eval_outputs(jnp.eye(4)[pred] * 10.0, {'labels': labels, 'weights': jnp.ones(4)})
  m = classification.summarize([out])
  # sklearn precision_recall_fscore_support([0, 0, 1, 1], [0, 2, 1, 1], average='macro'): labels 0, 1, 2
  # precision 1, 1, 0 (0/1); recall 1/2, 1, 0 (no support); F1 2/3, 1, 0
  assert m['precision'] == pytest.approx(2 / 3)
  assert m['recall'] == pytest.approx(1.5 / 3)
  assert m['f1'] == pytest.approx(5 / 9)
  assert classification.macro(np.zeros((3, 3))) == {'precision': 0.0, 'recall': 0.0, 'f1': 0.0}  # no examples
