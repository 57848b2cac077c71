"""Task losses, preprocessing and metrics against hand-worked values (no model)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tokenizers
import transformers

from jtune import config as config_lib
from jtune.data import batching
from jtune.data.features import IGNORE, Features, lengths_of, ragged
from jtune.tasks import causal_lm, common, mlm, multi_label, regression, token_classification


def test_regression_loss_and_correlations():
  outputs = jnp.array([[1.0], [2.0], [4.0], [9.0]])
  batch = {'labels': jnp.array([1.5, 2.0, 3.0, 0.0]), 'weights': jnp.array([1.0, 1.0, 1.0, 0.0])}
  total, weight = regression.loss_sums(outputs, batch)
  assert (float(total), float(weight)) == pytest.approx((0.25 + 0.0 + 1.0, 3.0))
  features = Features(tokens={}, rows={'labels': np.array([1.5, 2.0, 3.0])}, lengths=np.ones(3, np.int32))
  m = regression.summarize([regression.eval_outputs(outputs, batch)], features)
  pred, gold = np.array([1.0, 2.0, 4.0]), np.array([1.5, 2.0, 3.0])
  r = np.sum((pred - pred.mean()) * (gold - gold.mean())) / np.sqrt(
      np.sum((pred - pred.mean()) ** 2) * np.sum((gold - gold.mean()) ** 2))
  assert m['pearson'] == pytest.approx(r)  # 0.9820
  assert m['spearman'] == pytest.approx(1.0)  # same order
  assert m['loss'] == pytest.approx(1.25 / 3)
  assert m['count'] == 3  # the weight-0 filler row is not an example


def test_multi_label_hand_worked():
  # labels a b c. gold: {a}, {a, b}, {}, {c}; predicted (logit > 0): {a}, {a}, {b}, {c}; then a filler row.
  logits = jnp.array([[3., -3, -3], [3, -3, -3], [-3, 3, -3], [-3, -3, 3], [3, 3, 3]])
  gold = jnp.array([[1., 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]])
  batch = {'labels': gold, 'weights': jnp.array([1., 1, 1, 1, 0])}
  task = config_lib.TaskConfig(name='multi_label', threshold=0.5)
  m = multi_label.summarize([multi_label.eval_outputs(logits, batch, task)])
  # tp: a 2, b 0, c 1 = 3; fp: b 1 = 1; fn: b 1 = 1 -> micro P = R = 3/4, F1 = 0.75
  assert m['micro_precision'] == pytest.approx(0.75) and m['micro_recall'] == pytest.approx(0.75)
  assert m['micro_f1'] == pytest.approx(0.75)
  # per label F1: a 1.0, b 0 (P 0/1, R 0/1), c 1.0 -> macro 2/3
  assert m['macro_f1'] == pytest.approx(2 / 3)
  assert m['subset_accuracy'] == pytest.approx(2 / 4)  # rows 1 and 4 exactly right
  strict = multi_label.summarize([multi_label.eval_outputs(logits, batch, config_lib.TaskConfig(
      name='multi_label', threshold=0.999))])  # sigmoid(3) = 0.953 < 0.999: nothing predicted
  assert strict['micro_recall'] == 0.0 and strict['subset_accuracy'] == pytest.approx(1 / 4)


def test_first_sub_token_carries_the_word_label():
  # [CLS] Wash ##ington is [SEP]: word 0 -> tokens 1, 2; word 1 -> token 3
  assert token_classification.align_labels([None, 0, 0, 1, None], [3, 5]) == [IGNORE, 3, IGNORE, 5, IGNORE]


@pytest.mark.parametrize('tag', ['PER', 'U-PER', 'L-LOC', 'B-'])  # IO, BILOU, malformed
def test_token_classification_check_refuses_tags_entity_scoring_cannot_read(tag):
  import datasets  # pylint: disable=g-import-not-at-top
  ds = datasets.Dataset.from_list([{'tokens': ['Bo', 'left'], 'tags': ['B-PER', 'O']},
                                   {'tokens': ['Ada', 'left'], 'tags': [tag, 'O']}])
  cfg = dataclasses.replace(_data_cfg(16), text_column='tokens', label_column='tags')
  with pytest.raises(ValueError) as e:
    token_classification.check(ds, 'validation', cfg)
  assert str(e.value).startswith(f"split 'validation' row 1: bad tag {tag!r}: expected O or one of B-, I-, E-, S-")
  assert '\n' not in str(e.value)
  good = ds.map(lambda row: {'tags': ['B-PER', 'O']})
  token_classification.check(good, 'validation', cfg)
  names = datasets.Sequence(datasets.ClassLabel(names=['O', 'B-PER', tag]))  # a name no row uses still counts
  labelled = datasets.Dataset.from_dict({'tokens': [['Bo']], 'tags': [[1]]},
                                        features=datasets.Features({'tokens': ds.features['tokens'], 'tags': names}))
  with pytest.raises(ValueError, match=f"split 'train' column 'tags' \\(its ClassLabel names\\): bad tag {tag!r}"):
    token_classification.check(labelled, 'train', cfg)


def test_token_classification_loss_skips_ignored_tokens():
  logits = jnp.array([[[2.0, 0.0], [0.0, 0.0], [9.0, -9.0]]])
  batch = {'labels': jnp.array([[0, IGNORE, 1]]), 'weights': jnp.array([1.0])}
  total, count = token_classification.loss_sums(logits, batch)
  assert float(count) == 2
  assert float(total) == pytest.approx(np.log1p(np.exp(-2.0)) + np.log1p(np.exp(18.0)), rel=1e-5)


@pytest.mark.parametrize('loss_sums', [token_classification.loss_sums, mlm.loss_sums], ids=['token', 'mlm'])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_token_losses_are_optaxs_smoothed_one_hot_cross_entropy(loss_sums, smoothing):
  """The token and masked-LM losses (common.cross_entropy, no one-hot over the classes or the vocabulary) against
  optax's cross-entropy with smoothed one-hot targets, as they were computed before: values and gradients."""
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.standard_normal((3, 5, 40)) * 4, jnp.float32)
  labels = jnp.asarray(np.where(rng.random((3, 5)) < 0.5, rng.integers(0, 40, (3, 5)), IGNORE))
  batch = {'labels': labels, 'weights': jnp.array([1.0, 0.5, 0.0])}

  def want(x):
    mask = (labels != IGNORE) * batch['weights'][:, None]
    targets = optax.smooth_labels(jax.nn.one_hot(jnp.maximum(labels, 0), 40), smoothing)
    return jnp.sum(optax.softmax_cross_entropy(x, targets) * mask), jnp.sum(mask)

  (ours, count), grad = jax.value_and_grad(lambda x: loss_sums(x, batch, smoothing), has_aux=True)(logits)
  (theirs, their_count), their_grad = jax.value_and_grad(want, has_aux=True)(logits)
  assert float(count) == float(their_count) > 0
  assert float(ours) == pytest.approx(float(theirs), rel=1e-5)
  np.testing.assert_allclose(grad, their_grad, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope='module')
def word_tokenizer():
  """A whitespace word-level tokenizer with an end-of-sequence token: ids are easy to read."""
  vocab = {w: i for i, w in enumerate(['<pad>', '</s>', 'Review:', 'good', 'bad', 'film', 'Sentiment:',
                                       'positive', 'negative', 'a', 'long', 'text'])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<pad>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='</s>', pad_token='<pad>')


def _data_cfg(max_length):
  return config_lib.DataConfig(
      dataset='json', dataset_config='', data_files=(), train_split='train', eval_split='validation',
      text_column='text', text_pair_column='', label_column='label', max_length=max_length, buckets=(max_length,),
      max_train_examples=-1, max_eval_examples=-1, cache_dir='')


def test_instruction_targets_are_the_response_and_packing_keeps_examples_apart(word_tokenizer):
  import datasets  # pylint: disable=g-import-not-at-top
  ds = datasets.Dataset.from_list([{'text': 'good film', 'label': 'positive'}, {'text': 'bad', 'label': 'negative'}])
  task = config_lib.TaskConfig(name='causal_lm', prompt_template='Review: {text} Sentiment:',
                               response_template=' {label}', packing=True)
  f = causal_lm.featurize(ds, 'train', _data_cfg(16), task, word_tokenizer, [], training=True)
  assert len(f) == 1  # 5 + 4 tokens fit one row of 16
  # Review: good film Sentiment: positive </s> | Review: bad Sentiment: negative </s>  (inputs drop the last)
  np.testing.assert_array_equal(f.tokens['input_ids'][0], [2, 3, 5, 6, 7, 2, 4, 6, 8])
  # the answer and EOS are predicted, from the token before each; nothing across the boundary
  np.testing.assert_array_equal(f.tokens['targets'][0], [IGNORE, IGNORE, IGNORE, 7, 1, IGNORE, IGNORE, 8, 1])
  np.testing.assert_array_equal(f.tokens['segment_ids'][0], [1, 1, 1, 1, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(f.tokens['positions'][0], [0, 1, 2, 3, 4, 0, 1, 2, 3])
  assert f.host['prompt_ids'] == [[2, 3, 5, 6], [2, 4, 6]]
  unpacked = causal_lm.featurize(ds, 'train', _data_cfg(16), task.__class__(**{**task.__dict__, 'packing': False}),
                                 word_tokenizer, [], training=True)
  assert len(unpacked) == 2 and list(unpacked.lengths) == [5, 4]
  np.testing.assert_array_equal(unpacked.tokens['segment_ids'][1], [1, 1, 1, 1])


def test_prompts_that_fill_max_length_are_an_error_not_a_run_that_learns_nothing(word_tokenizer):
  import datasets  # pylint: disable=g-import-not-at-top
  ds = datasets.Dataset.from_list([{'text': 'good film', 'label': 'positive'}])
  task = config_lib.TaskConfig(name='causal_lm', prompt_template='Review: {text} Sentiment:',
                               response_template=' {label}', packing=False)
  assert len(causal_lm.featurize(ds, 'train', _data_cfg(4), task, word_tokenizer, [], training=True)) == 1
  with pytest.raises(ValueError, match=r"^split 'validation': no token to predict fits in config.data.max_length=3 "
                                       r"\(each example's prompt fills it\): expected a larger data.max_length"):
    causal_lm.featurize(ds, 'validation', _data_cfg(3), task, word_tokenizer, [], training=False)


def _causal_split(target_counts, length, compact_targets=True):
  """A causal-LM split of rows `length` tokens long whose last `count` tokens have targets (100 + position)."""
  targets = [[100 + j if j >= length - count else IGNORE for j in range(length)] for count in target_counts]
  ids = [list(range(length))] * len(target_counts)
  tokens = {'input_ids': ragged(ids), 'targets': ragged(targets), 'positions': ragged(ids),
            'segment_ids': ragged([[1] * length] * len(target_counts))}
  return Features(tokens=tokens, rows={}, lengths=lengths_of(tokens['input_ids']), compact_targets=compact_targets)


def test_instruction_batches_carry_the_target_positions_for_every_process_alike():
  """A response split's batch holds its targets at `target_positions` only: P the smallest power of two, at least
  16, that holds the row with the most targets, at most the bucket's length; the global batch's P on every
  process. A raw-text split's batch predicts every position and has none."""
  split = _causal_split([3, 17, 5, 2], 64)
  assert batching.target_positions(split, np.arange(4), 64) == 32  # 17 targets
  assert batching.target_positions(split, np.array([0, 2, 3]), 64) == 16  # at least 16
  assert batching.target_positions(split, np.array([1]), 20) == 20  # at most the length
  batch = batching.make_batch(split, np.array([0, 3]), 64, 0)
  np.testing.assert_array_equal(batch['target_positions'][0, :4], [61, 62, 63, 0])
  np.testing.assert_array_equal(batch['targets'][0, :4], [161, 162, 163, IGNORE])
  assert batch['target_positions'].shape == batch['targets'].shape == (2, 16)
  halves = [next(batching.eval_batches(split, 4, (64,), 0, local_rows=rows)) for rows in (slice(0, 2), slice(2, 4))]
  assert [h['target_positions'].shape for h in halves] == [(2, 32), (2, 32)]  # rows 2 and 3 alone would make 16
  whole = next(batching.eval_batches(split, 4, (64,), 0))
  for name in ('target_positions', 'targets', 'input_ids'):
    np.testing.assert_array_equal(np.concatenate([h[name] for h in halves]), whole[name])
  short = batching.make_batch(_causal_split([3, 9], 16), np.arange(2), 16, 0)  # P = L: every position, in order
  np.testing.assert_array_equal(short['target_positions'], np.tile(np.arange(16), (2, 1)))
  np.testing.assert_array_equal(short['targets'][1], [IGNORE] * 7 + list(range(107, 116)))
  with pytest.raises(ValueError, match='logits at 64 positions for targets at 16'):
    causal_lm.loss_sums(jnp.zeros((2, 64, 5)), {**batch, 'weights': np.ones(2, np.float32)})
  raw = batching.make_batch(_causal_split([64, 64], 64, compact_targets=False), np.arange(2), 64, 0)
  assert 'target_positions' not in raw and raw['targets'].shape == (2, 64)


def test_raw_text_is_cut_into_max_length_pieces(word_tokenizer):
  import datasets  # pylint: disable=g-import-not-at-top
  ds = datasets.Dataset.from_list([{'text': 'a long text a long text a long'}])  # 8 words
  task = config_lib.TaskConfig(name='causal_lm', prompt_template='{text}', response_template='', packing=False)
  f = causal_lm.featurize(ds, 'train', _data_cfg(4), task, word_tokenizer, [], training=True)
  # 8 words + EOS = 9 tokens -> inputs of 4, 4 (targets shifted by one; the last piece predicts EOS)
  assert [list(x) for x in f.tokens['input_ids']] == [[9, 10, 11, 9], [10, 11, 9, 10]]
  assert [list(x) for x in f.tokens['targets']] == [[10, 11, 9, 10], [11, 9, 10, 1]]


def test_causal_loss_counts_only_targets_of_weighted_rows():
  logits = jnp.zeros((2, 3, 5))  # uniform: every predicted token costs log 5
  batch = {'targets': jnp.array([[1, IGNORE, 2], [3, 3, 3]]), 'weights': jnp.array([1.0, 0.0])}
  total, count = causal_lm.loss_sums(logits, batch)
  assert float(count) == 2 and float(total) == pytest.approx(2 * np.log(5), rel=1e-6)
  m = causal_lm.summarize([causal_lm.eval_outputs(logits, batch)])
  assert m['perplexity'] == pytest.approx(5.0, rel=1e-5)


def test_cross_entropy_and_its_gradient_are_optaxs_with_large_logits():
  """common.cross_entropy (its logsumexp's sum a product on a CPU, its gradient written out) against optax's
  values and gradient, with logits far from zero (the max is subtracted before the exponentials)."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((2, 3, 1000)) * 20 + 500, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 1000, (2, 3)))
  weights = jnp.asarray(rng.random((2, 3)), jnp.float32)
  ours, want = (jax.value_and_grad(lambda x, f=f: jnp.sum(f(x, targets) * weights))(logits)
                for f in (common.cross_entropy, optax.softmax_cross_entropy_with_integer_labels))
  assert np.isfinite(ours[0]) and float(ours[0]) == pytest.approx(float(want[0]), rel=1e-5)
  np.testing.assert_allclose(ours[1], want[1], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(jnp.sum(ours[1], -1), 0, atol=1e-4)  # softmax - one-hot, per row, weighted


def test_generation_metrics_compares_normalised_answers(word_tokenizer):
  features = Features(tokens={}, rows={}, lengths=np.zeros(3, np.int32),
                      host={'prompt_ids': [[2], [2], [2]], 'responses': [' positive', ' negative', ' positive']})
  answers = [[7, 1], [7], [8, 7]]  # "positive</s>", "positive", "negative positive"
  m = causal_lm.generation_metrics(lambda prompts: answers[:len(prompts)], features, word_tokenizer, limit=3)
  assert m['generation_accuracy'] == pytest.approx(1 / 3)
