"""Entity-level NER scores against hand-worked examples (the conlleval / seqeval default conventions)."""

import pytest

from jtune.tasks import entities


@pytest.mark.parametrize('tags, want', [
    (['B-PER', 'I-PER', 'O', 'B-LOC'], [('PER', 0, 2), ('LOC', 3, 4)]),
    (['I-PER', 'I-PER', 'O'], [('PER', 0, 2)]),  # I- after O starts an entity (IOB1)
    (['B-PER', 'B-PER'], [('PER', 0, 1), ('PER', 1, 2)]),  # B- always starts a new one
    (['B-PER', 'I-LOC', 'I-LOC'], [('PER', 0, 1), ('LOC', 1, 3)]),  # a change of type ends and starts
    (['O', 'B-ORG', 'I-ORG'], [('ORG', 1, 3)]),  # an entity at the end of the sentence
    (['S-PER', 'B-LOC', 'E-LOC', 'O'], [('PER', 0, 1), ('LOC', 1, 3)]),  # IOBES
    (['O', 'O'], []),
])
def test_spans(tags, want):
  assert entities.spans(tags) == want


def test_scores_hand_worked():
  true = [['B-PER', 'I-PER', 'O', 'B-LOC'],  # PER 0-2, LOC 3
          ['B-ORG', 'O', 'B-PER']]           # ORG 0, PER 2
  pred = [['B-PER', 'O', 'O', 'B-LOC'],      # PER 0-1 (boundary error), LOC 3 (right)
          ['B-LOC', 'O', 'B-PER']]           # LOC 0 (type error), PER 2 (right)
  s = entities.scores(true, pred)
  # 4 true, 4 predicted, 2 correct
  assert (s['precision'], s['recall'], s['f1']) == pytest.approx((0.5, 0.5, 0.5))
  assert s['accuracy'] == pytest.approx(5 / 7)  # tokens: 1 (I-PER vs O) and 4 (B-ORG vs B-LOC) wrong
  assert s['per_type']['PER'] == pytest.approx({'precision': 0.5, 'recall': 0.5, 'f1': 0.5, 'support': 2})
  assert s['per_type']['LOC'] == pytest.approx({'precision': 0.5, 'recall': 1.0, 'f1': 2 / 3, 'support': 1})
  assert s['per_type']['ORG'] == pytest.approx({'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'support': 1})


def test_entities_never_span_sentences_and_empty_predictions_score_zero():
  # As one sequence, I-PER would continue the entity; as two sentences it starts a new one.
  s = entities.scores([['B-PER'], ['I-PER']], [['B-PER'], ['B-PER']])
  assert s['precision'] == 1.0 and s['recall'] == 1.0
  none = entities.scores([['B-PER', 'O']], [['O', 'O']])
  assert (none['precision'], none['recall'], none['f1']) == (0.0, 0.0, 0.0)
  with pytest.raises(ValueError, match='differ in number or length'):
    entities.scores([['O']], [['O', 'O']])
