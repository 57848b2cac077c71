"""SQuAD v1.1 metrics against hand-worked values, context windows with offsets, and best-span decoding."""

import datasets
import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jtune import config as config_lib
from jtune.tasks import qa, squad


@pytest.mark.parametrize('raw, want', [
    ('The  Eiffel-Tower!', 'eiffeltower'),  # punctuation inside a word joins its halves
    ('an apple a day', 'apple day'),
    ('theatre at the-end', 'theatre at theend'),  # 'the' is removed only as a word, after punctuation goes
    ("Paris's  A\tB", 'pariss b'),
    ('\u201cParis\u201d \u2013 Fran\u00e7e', '\u201cparis\u201d \u2013 fran\u00e7e'),  # only ASCII punctuation goes
    ('The', ''),
])
def test_normalize_answer(raw, want):
  assert squad.normalize_answer(raw) == want


def test_exact_match_and_f1_like_the_official_script():
  assert squad.exact_match('the Eiffel Tower', ['Eiffel Tower.']) == 1.0
  assert squad.exact_match('Paris, France', ['Paris']) == 0.0
  assert squad.exact_match('Paris', ['Lyon', 'paris!']) == 1.0  # any ground truth
  # Both normalise to '': equal strings (EM 1) but no common token (F1 0), as in the official script.
  assert squad.exact_match('the', ['a']) == 1.0
  assert squad.f1('the', ['a']) == 0.0
  # pred [paris, france], truth [paris]: 1 common, P 1/2, R 1 -> F1 2/3
  assert squad.f1('Paris, France', ['Paris']) == pytest.approx(2 / 3)
  # the best of several: [lyon] 0, [france] 2/3, [paris, france] 1
  assert squad.f1('Paris, France', ['Lyon', 'France']) == pytest.approx(2 / 3)
  assert squad.f1('Paris, France', ['Lyon', 'France', 'the paris france']) == 1.0
  # Counter overlap: pred [new, new, york], truth [new, york]: 2 common, P 2/3, R 1 -> F1 4/5
  assert squad.f1('New new York', ['new York']) == pytest.approx(0.8)
  # pred [in, 1990s], truth [1990s]: 'in' is not an article -> P 1/2, R 1 -> 2/3
  assert squad.f1('in the 1990s', ['The 1990s']) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match='expected a non-empty list'):
    squad.f1('Paris', [])


def test_evaluate_in_percent_over_the_references():
  result = squad.evaluate({'q1': 'Paris', 'q2': 'in Lyon', 'extra': 'x'},
                          {'q1': ['Paris'], 'q2': ['Lyon', 'Lyon, France'], 'q3': ['Nice']})
  # EM: q1 1, q2 0, q3 0 (no prediction) -> 100/3. F1: q2 max(2/3 for [lyon], 1/2 for [lyon, france]) -> 2/3.
  assert result['exact_match'] == pytest.approx(100 / 3)
  assert result['f1'] == pytest.approx(100 * (1 + 2 / 3) / 3)


def _filler(topic: str, first: int, count: int) -> str:
  return ' '.join(f'Sentence {i} is about {topic}.' for i in range(first, first + count))


LONG = _filler('the weather', 0, 12) + ' Ada lives in Lisbon, the capital of Portugal. ' + _filler('food', 12, 8)
START = 'Bo works in Oslo. ' + _filler('trees', 0, 14)
END = _filler('rain', 0, 14) + ' The last animal is a zebra'
TOO_LONG = _filler('cats', 0, 30)
EXAMPLES = [  # (question, context, answer): answers at the middle, start and end of long contexts
    ('Where does Ada live?', LONG, 'Lisbon, the capital of Portugal'),
    ('Who works in Oslo?', START, 'Bo'),
    ('What is the last animal?', END, 'zebra'),
    ('What is said about cats?', TOO_LONG, _filler('cats', 2, 10)),  # ~90 tokens: fits no window
]
MAX_LENGTH, STRIDE = 48, 16


@pytest.fixture(scope='module')
def minilm(minilm_dir):
  return transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope='module')
def roberta_like():
  """A byte-level BPE tokenizer with RoBERTa's <s> q </s></s> c </s> layout, whose token_type_ids are all 0."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=['<s>', '<pad>', '</s>', '<unk>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([q + ' ' + c for q, c, _ in EXAMPLES], trainer)
  tok.post_processor = processors.RobertaProcessing(('</s>', tok.token_to_id('</s>')),
                                                    ('<s>', tok.token_to_id('<s>')), trim_offsets=True,
                                                    add_prefix_space=False)
  return transformers.RobertaTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>',
                                           sep_token='</s>', cls_token='<s>', pad_token='<pad>', unk_token='<unk>')


def _context_positions(offsets):
  return [j for j, o in enumerate(offsets) if o is not None]


@pytest.mark.parametrize('which', ['minilm', 'roberta_like'])
def test_windows_cover_the_context_and_map_answers_back(which, request):
  tokenizer = request.getfixturevalue(which)
  questions, contexts, _ = zip(*EXAMPLES)
  answers = [{'text': [t], 'answer_start': [c.index(t)]} for _, c, t in EXAMPLES]
  f = squad.train_features(questions, contexts, answers, tokenizer, MAX_LENGTH, STRIDE)
  e = squad.eval_features(questions, contexts, tokenizer, MAX_LENGTH, STRIDE)
  assert e['input_ids'] == f['input_ids'] and all(len(ids) <= MAX_LENGTH for ids in f['input_ids'])
  hits = [0] * len(EXAMPLES)
  for k, (question, context, text) in enumerate(EXAMPLES):
    windows = [w for w, x in enumerate(e['example_index']) if x == k]
    assert len(windows) > 2 and windows == list(range(windows[0], windows[-1] + 1))  # several, consecutive
    prefix = tokenizer(question)['input_ids'][:-1]  # the question's own tokens come first in every window
    whole = tokenizer(context, add_special_tokens=False)['input_ids']
    joined = []
    for n, w in enumerate(windows):
      assert f['input_ids'][w][:len(prefix)] == prefix
      positions = _context_positions(e['offsets'][w])
      assert all(e['offsets'][w][j] is None for j in range(positions[0]))  # question and special tokens
      ids = [f['input_ids'][w][j] for j in positions]
      if n:  # consecutive windows share exactly `stride` context tokens
        assert ids[:STRIDE] == joined[-STRIDE:]
      joined += ids if not n else ids[STRIDE:]
      s, t = f['start_positions'][w], f['end_positions'][w]
      if (s, t) != (0, 0):
        hits[k] += 1
        assert positions[0] <= s <= t <= positions[-1]
        assert context[e['offsets'][w][s][0]:e['offsets'][w][t][1]] == text
      else:  # the answer is not wholly inside this window's characters
        lo, hi = e['offsets'][w][positions[0]][0], e['offsets'][w][positions[-1]][1]
        assert not lo <= context.index(text) <= context.index(text) + len(text) <= hi
    assert joined == whole  # the windows, overlaps removed, are the whole context
  assert all(h >= 1 for h in hits[:3]) and hits[3] == 0
  if which == 'roberta_like':
    assert not any(any(types) for types in f['token_type_ids'])  # the context is found without type ids


def test_windowing_errors_and_unanswerable_examples(minilm):
  f = squad.train_features(['Who?'], ['Bo works.'], [{'text': [], 'answer_start': []}], minilm, 32, 8)
  assert (f['start_positions'], f['end_positions']) == ([0], [0])
  with pytest.raises(ValueError, match='stride 32 with max_length 32'):
    squad.eval_features(['Who?'], ['Bo works.'], minilm, 32, 32)
  with pytest.raises(ValueError, match='2 questions for 1 contexts'):
    squad.eval_features(['Who?', 'What?'], ['Bo works.'], minilm, 32, 8)


def test_a_question_too_long_for_the_stride_is_named_before_tokenizers_panics(minilm):
  # [CLS] question [SEP] context [SEP]: max_length 32 - 3 special tokens - stride 8 leaves 21, of which the
  # context needs more than the stride: questions of at most 20 tokens ('hello' is one token).
  context = ' '.join(['word'] * 100)  # long enough to be cut into windows
  longest = ' '.join(['hello'] * 20)
  assert len(squad.eval_features([longest], [context], minilm, 32, 8)['input_ids']) > 1
  ds = datasets.Dataset.from_dict({'question': ['Who?', longest + ' hello'], 'context': [context] * 2,
                                   'answers': [{'text': ['word'], 'answer_start': [0]}] * 2})
  cfg = config_lib.DataConfig(
      dataset='json', dataset_config='', data_files=(), train_split='train', eval_split='validation',
      text_column='question', text_pair_column='context', label_column='answers', max_length=32, buckets=(32,),
      max_train_examples=-1, max_eval_examples=-1, cache_dir='')
  for training in (True, False):
    with pytest.raises(ValueError) as e:  # not pyo3_runtime.PanicException, which no handler catches
      qa.featurize(ds, 'validation', cfg, config_lib.TaskConfig(name='qa', stride=8), minilm, [], training=training)
    assert str(e.value) == ("split 'validation' row 1: the question has 21 tokens: expected at most 20, so that a "
                            'window of max_length 32 keeps more than stride 8 tokens for the context (shorten it, '
                            'raise data.max_length or lower task.stride)')
  # The same question with a context short enough for one window cuts nothing: it featurizes as before.
  short = ds.map(lambda row: {'context': 'word word'})
  for training in (True, False):
    features = qa.featurize(short, 'validation', cfg, config_lib.TaskConfig(name='qa', stride=8), minilm, [],
                            training=training)
    assert len(features.lengths) == 2


def _token(features, window: int, context: str, word: str) -> int:
  """The position in a window of the token whose characters are exactly `word`."""
  return next(j for j, o in enumerate(features['offsets'][window]) if o and context[o[0]:o[1]].lower() == word)


def _windows_with(features, example: int, context: str, *words: str) -> list[int]:
  found = []
  for w, offsets in enumerate(features['offsets']):
    pieces = {context[o[0]:o[1]].lower() for o in offsets if o}
    if features['example_index'][w] == example and all(word in pieces for word in words):
      found.append(w)
  return found


def test_best_spans_over_windows(minilm):
  contexts = [LONG, START]
  e = squad.eval_features(['Where does Ada live?', 'Who works in Oslo?'], contexts, minilm, MAX_LENGTH, STRIDE)
  n, width = len(e['input_ids']), max(len(ids) for ids in e['input_ids']) + 3  # padded beyond the windows
  start, end = np.full((n, width), -100.0), np.full((n, width), -100.0)
  for w, ids in enumerate(e['input_ids']):
    question = [j for j, o in enumerate(e['offsets'][w]) if o is None]  # CLS, question, SEPs: never answers
    start[w, question], end[w, question] = 50.0, 50.0
    start[w, len(ids):], end[w, len(ids):] = 99.0, 99.0  # padding: never a candidate
  both = _windows_with(e, 0, LONG, 'lisbon', 'portugal')
  first = _windows_with(e, 0, LONG, 'lisbon')[0]
  t = both[-1]
  assert len(both) >= 1 and t != first and len(_windows_with(e, 0, LONG, 'lisbon')) >= 2
  lisbon, portugal = _token(e, t, LONG, 'lisbon'), _token(e, t, LONG, 'portugal')
  start[t, lisbon], end[t, lisbon] = 5.0, 5.0  # 'Lisbon': 10
  other = _context_positions(e['offsets'][first])[0]
  other_text = LONG[slice(*e['offsets'][first][other])]
  start[first, other], end[first, other] = 4.0, 5.5  # another word in another window scores 9.5: loses
  end[t, lisbon - 1] = 20.0  # an end before the only good start: never paired with it
  b = _token(e, e['example_index'].index(1), START, 'bo')
  start[e['example_index'].index(1), b], end[e['example_index'].index(1), b] = 3.0, 3.0
  assert squad.best_spans(start, end, e, contexts) == ['Lisbon', 'Bo']
  # A longer span scores 11 and wins when allowed; its length (tokens lisbon..portugal) is portugal - lisbon + 1.
  end[t, portugal] = 6.0
  longest = portugal - lisbon + 1
  assert squad.best_spans(start, end, e, contexts, max_answer_length=longest) == \
      ['Lisbon, the capital of Portugal', 'Bo']
  assert squad.best_spans(start, end, e, contexts, max_answer_length=longest - 1) == ['Lisbon', 'Bo']
  # Candidates per window are its n_best starts and ends: with 1, window t offers only (lisbon, lisbon - 1).
  assert squad.best_spans(start, end, e, contexts, n_best=2)[0] == 'Lisbon, the capital of Portugal'
  assert squad.best_spans(start, end, e, contexts, n_best=1)[0] == other_text != 'Lisbon'  # the other window


def test_best_spans_refuses_logits_that_do_not_fit(minilm):
  e = squad.eval_features(['Who?'], [START], minilm, MAX_LENGTH, STRIDE)
  n, width = len(e['input_ids']), max(len(ids) for ids in e['input_ids'])
  with pytest.raises(ValueError, match='expected both'):
    squad.best_spans(np.zeros((n + 1, width)), np.zeros((n + 1, width)), e, [START])
  with pytest.raises(ValueError, match=f'but logits only {width - 1}'):
    squad.best_spans(np.zeros((n, width - 1)), np.zeros((n, width - 1)), e, [START])
