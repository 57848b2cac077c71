"""Entity-level NER scores against hand-worked examples (conlleval / seqeval 1.2.2 default-mode conventions).

The expected spans below were worked by hand from conlleval's startOfChunk / endOfChunk rules and agree with
seqeval 1.2.2's `get_entities` (whose ends are inclusive: add 1 to its third field).
"""

import pytest

from jtune.tasks import entities


@pytest.mark.parametrize('tags, want', [
    # IOB2: B- starts, I- of the same type continues, O ends
    (['B-PER', 'I-PER', 'O', 'B-LOC'], [('PER', 0, 2), ('LOC', 3, 4)]),
    # IOB1 / I- without B-: I- after O (or at the start) starts an entity
    (['I-PER', 'I-PER', 'O', 'I-LOC'], [('PER', 0, 2), ('LOC', 3, 4)]),
    (['B-PER', 'B-PER'], [('PER', 0, 1), ('PER', 1, 2)]),  # B- always starts a new one
    (['B-PER', 'I-LOC', 'I-LOC'], [('PER', 0, 1), ('LOC', 1, 3)]),  # a change of type ends one, starts another
    (['I-PER', 'I-LOC'], [('PER', 0, 1), ('LOC', 1, 2)]),
    (['O', 'B-ORG', 'I-ORG'], [('ORG', 1, 3)]),  # an entity that runs to the end of the sentence
    (['B-ORG'], [('ORG', 0, 1)]),
    # IOE: E- closes, the I- after it starts the next entity
    (['I-PER', 'E-PER', 'I-PER', 'E-PER'], [('PER', 0, 2), ('PER', 2, 4)]),
    (['O', 'E-PER', 'O'], [('PER', 1, 2)]),  # E- after O is a one-token entity
    # IOBES
    (['S-PER', 'B-LOC', 'I-LOC', 'E-LOC', 'O', 'S-PER'], [('PER', 0, 1), ('LOC', 1, 4), ('PER', 5, 6)]),
    (['B-LOC', 'E-LOC', 'I-LOC'], [('LOC', 0, 2), ('LOC', 2, 3)]),  # I- after E- starts a new one
    (['S-LOC', 'I-LOC'], [('LOC', 0, 1), ('LOC', 1, 2)]),  # S- ends at once
    (['B', 'I', 'O'], [('_', 0, 2)]),  # tags without a type: seqeval's '_'
    (['O', 'O'], []),
    ([], []),
])
def test_spans(tags, want):
  assert entities.spans(tags) == want


@pytest.mark.parametrize('tag', ['X-PER', 'PER', 'B-', 'o', 'L-PER'])
def test_bad_tags_are_refused(tag):
  with pytest.raises(ValueError, match=f"bad tag '{tag}'"):
    entities.spans(['O', tag])


def test_scores_exact_match():
  tags = [['B-PER', 'I-PER', 'O', 'B-LOC'], ['O', 'S-ORG']]
  s = entities.scores(tags, tags)
  assert (s['precision'], s['recall'], s['f1'], s['accuracy']) == (1.0, 1.0, 1.0, 1.0)
  assert s['per_type']['ORG'] == {'precision': 1.0, 'recall': 1.0, 'f1': 1.0, 'support': 1}


def test_scores_boundary_and_type_errors():
  true = [['B-PER', 'I-PER', 'O', 'B-LOC'],  # PER 0-2, LOC 3-4
          ['B-ORG', 'O', 'B-PER']]           # ORG 0-1, PER 2-3
  pred = [['B-PER', 'O', 'O', 'B-LOC'],      # PER 0-1 (boundary error), LOC 3-4 (right)
          ['B-LOC', 'O', 'B-PER']]           # LOC 0-1 (type error), PER 2-3 (right)
  s = entities.scores(true, pred)
  # 4 true, 4 predicted, 2 correct: P = R = F1 = 1/2
  assert (s['precision'], s['recall'], s['f1']) == pytest.approx((0.5, 0.5, 0.5))
  assert s['accuracy'] == pytest.approx(5 / 7)  # 7 tokens; wrong: I-PER vs O, B-ORG vs B-LOC
  # PER: 2 true, 2 predicted, 1 right. LOC: 1 true, 2 predicted, 1 right. ORG: 1 true, 0 predicted.
  assert s['per_type']['PER'] == pytest.approx({'precision': 0.5, 'recall': 0.5, 'f1': 0.5, 'support': 2})
  assert s['per_type']['LOC'] == pytest.approx({'precision': 0.5, 'recall': 1.0, 'f1': 2 / 3, 'support': 1})
  assert s['per_type']['ORG'] == {'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'support': 1}


def test_scores_seqeval_docstring_example():
  # seqeval 1.2.2's precision_recall_fscore_support docstring: micro (0.5, 0.5, 0.5); MISC 0, PER 1.
  true = [['O', 'O', 'O', 'B-MISC', 'I-MISC', 'I-MISC', 'O'], ['B-PER', 'I-PER', 'O']]
  pred = [['O', 'O', 'B-MISC', 'I-MISC', 'I-MISC', 'I-MISC', 'O'], ['B-PER', 'I-PER', 'O']]
  s = entities.scores(true, pred)
  assert (s['precision'], s['recall'], s['f1']) == pytest.approx((0.5, 0.5, 0.5))
  assert s['per_type']['MISC']['f1'] == 0.0 and s['per_type']['PER']['f1'] == 1.0
  assert s['accuracy'] == pytest.approx(8 / 10)  # tokens 2 and 3 differ


def test_scores_i_without_b_and_mixed_schemes():
  true = [['B-PER', 'I-PER', 'O', 'B-LOC', 'I-LOC']]  # PER 0-2, LOC 3-5
  pred = [['I-PER', 'I-PER', 'O', 'I-LOC', 'B-LOC']]  # PER 0-2 (I- starts it: right), LOC 3-4, LOC 4-5 (wrong)
  s = entities.scores(true, pred)
  # 2 true, 3 predicted, 1 right: P 1/3, R 1/2, F1 2/5
  assert (s['precision'], s['recall'], s['f1']) == pytest.approx((1 / 3, 1 / 2, 2 / 5))
  assert s['accuracy'] == pytest.approx(2 / 5)  # only tokens 1 (I-PER) and 2 (O) match
  assert s['per_type']['LOC'] == pytest.approx({'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'support': 1})


def test_entities_never_span_sentences():
  # As one sequence I-PER would continue B-PER (one entity 0-2); as two sentences it starts a new one, so the
  # prediction of two B-PER entities is right, and a prediction of one sentence-crossing entity cannot exist.
  s = entities.scores([['B-PER'], ['I-PER']], [['B-PER'], ['B-PER']])
  assert (s['precision'], s['recall']) == (1.0, 1.0)
  # The same entity in two sentences counts twice: sentence 0 right, sentence 1 missed -> P 1, R 1/2, F1 2/3.
  s = entities.scores([['O', 'B-LOC'], ['O', 'B-LOC']], [['O', 'B-LOC'], ['O', 'O']])
  assert (s['precision'], s['recall'], s['f1']) == pytest.approx((1.0, 0.5, 2 / 3))


def test_empty_predictions_and_zero_denominators():
  none = entities.scores([['B-PER', 'O'], ['S-LOC']], [['O', 'O'], ['O']])  # 2 true, 0 predicted
  assert (none['precision'], none['recall'], none['f1']) == (0.0, 0.0, 0.0)
  assert none['accuracy'] == pytest.approx(1 / 3)
  assert none['per_type']['LOC'] == {'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'support': 1}
  spurious = entities.scores([['O', 'O']], [['B-PER', 'O']])  # 0 true, 1 predicted
  assert (spurious['precision'], spurious['recall'], spurious['f1']) == (0.0, 0.0, 0.0)
  assert spurious['per_type']['PER']['support'] == 0
  empty = entities.scores([], [])
  assert (empty['f1'], empty['accuracy'], empty['per_type']) == (0.0, 0.0, {})


def test_mismatched_lengths_are_refused():
  with pytest.raises(ValueError, match='sentence 0 has 2 predicted tags for 1 true'):
    entities.scores([['O']], [['O', 'O']])
  with pytest.raises(ValueError, match='1 predicted sentences for 2 true'):
    entities.scores([['O'], ['O']], [['O']])
