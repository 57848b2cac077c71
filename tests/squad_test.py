"""SQuAD v1.1 metrics against hand-worked values, context windows with offsets, and best-span decoding."""

import numpy as np
import pytest
import transformers

from jtune.tasks import squad


def test_normalize_and_scores_like_the_official_script():
  assert squad.normalize_answer('The  Eiffel-Tower!') == 'eiffeltower'  # punctuation inside words is dropped
  assert squad.normalize_answer('an apple a day') == 'apple day'
  assert squad.exact_match('the Eiffel Tower', ['Eiffel Tower.']) == 1.0
  assert squad.exact_match('Paris, France', ['Paris']) == 0.0
  # tokens: pred [paris, france], truth [paris] -> P 1/2, R 1 -> F1 2/3
  assert squad.f1('Paris, France', ['Paris']) == pytest.approx(2 / 3)
  assert squad.f1('Paris, France', ['Lyon', 'France']) == pytest.approx(2 / 3)  # the best ground truth
  assert squad.f1('the', ['a']) == 0.0  # both normalise to nothing: no common token
  result = squad.evaluate({1: 'Paris', 2: 'in Lyon'}, {1: ['Paris'], 2: ['Lyon'], 3: ['Nice']})
  # EM: 1 / 3; F1: (1 + 2/3 + 0) / 3 (3 has no prediction)
  assert result['exact_match'] == pytest.approx(100 / 3)
  assert result['f1'] == pytest.approx(100 * (1 + 2 / 3) / 3)


@pytest.fixture(scope='module')
def tokenizer(minilm_dir):
  return transformers.AutoTokenizer.from_pretrained(minilm_dir)


CONTEXT = ' '.join(f'Sentence {i} is about the weather.' for i in range(12)) + ' Ada lives in Lisbon. ' + \
          ' '.join(f'Sentence {i} is about food.' for i in range(12, 20))


def test_windows_map_answers_back_to_their_text(tokenizer):
  start = CONTEXT.index('Lisbon')
  answers = [{'text': ['Lisbon'], 'answer_start': [start]}]
  f = squad.train_features(['Where does Ada live?'], [CONTEXT], answers, tokenizer, 48, 16)
  assert len(f['input_ids']) > 3  # a long context: several windows
  assert all(len(ids) <= 48 for ids in f['input_ids'])
  e = squad.eval_features(['Where does Ada live?'], [CONTEXT], tokenizer, 48, 16)
  assert e['example_index'] == [0] * len(f['input_ids'])
  hits = 0
  for i, (s, t) in enumerate(zip(f['start_positions'], f['end_positions'])):
    if s == 0:
      assert t == 0
      continue
    hits += 1
    offsets = e['offsets'][i]
    assert CONTEXT[offsets[s][0]:offsets[t][1]] == 'Lisbon'
  assert hits >= 1
  # every context token of every window points into the context; question tokens have no offsets
  first = e['offsets'][0]
  assert first[0] is None and first[1] is None  # [CLS] and the question's first token


def test_best_span_over_windows(tokenizer):
  e = squad.eval_features(['Where does Ada live?'], [CONTEXT], tokenizer, 48, 16)
  n = len(e['input_ids'])
  width = max(len(ids) for ids in e['input_ids']) + 3  # padded beyond the windows
  start, end = np.full((n, width), -5.0), np.full((n, width), -5.0)
  target = [i for i, offsets in enumerate(e['offsets'])  # the last window with it: room for a longer span
            if any(o and CONTEXT[o[0]:o[1]] == 'Lisbon' for o in offsets)][-1]
  j = next(k for k, o in enumerate(e['offsets'][target]) if o and CONTEXT[o[0]:o[1]] == 'Lisbon')
  start[target, j], end[target, j] = 5.0, 5.0
  start[0, 0], end[0, 0] = 50.0, 50.0  # [CLS] scores highest but is outside the context
  start[0, width - 1] = 99.0  # padding beyond the window is never a candidate
  assert squad.best_spans(start, end, e, [CONTEXT]) == ['Lisbon']
  # a longer span wins when allowed, and max_answer_length rules it out
  k = next(k for k, o in enumerate(e['offsets'][target]) if o and k > j + 2)
  end[target, k] = 6.0
  assert squad.best_spans(start, end, e, [CONTEXT], max_answer_length=30).pop().startswith('Lisbon')
  assert squad.best_spans(start, end, e, [CONTEXT], max_answer_length=30).pop() != 'Lisbon'
  assert squad.best_spans(start, end, e, [CONTEXT], max_answer_length=2) == ['Lisbon']
