"""Masked-LM domain-adaptive pretraining: BERT's masking, the BertForMaskedLM head both ways, loss on held-out
text, and fine-tuning from the result with `train.init_from`."""

import jax
import numpy as np
import pytest

from configs import bert_cls
from jtune import checkpoint, modeling, trainer
from jtune import config as config_lib
from jtune.data import masking
from jtune.data.features import IGNORE
from tests.cli import read_jsonl, run_cli

MASK, VOCAB = 103, 1000


def _batch(rows=400, length=128, seed=0):
  """Random ids with [CLS] ... [SEP] and padding; words of 1 to 3 pieces."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, 2000, (rows, length))
  units = np.zeros((rows, length), np.int32)
  for r in range(rows):
    n = rng.integers(10, length)
    pos = 1
    while pos < n - 1:
      pieces = min(int(rng.integers(1, 4)), n - 1 - pos)
      units[r, pos] = masking.WORD_START
      units[r, pos + 1:pos + pieces] = masking.CONTINUATION
      pos += pieces
  return ids, units


def test_token_masking_is_bert_80_10_10():
  ids, units = _batch()
  corrupted, labels = masking.mask(ids, units, masking.Masking(MASK, VOCAB), np.random.default_rng(1))
  chosen = labels != IGNORE
  assert not chosen[units == masking.SPECIAL].any()  # never [CLS], [SEP] or padding
  assert chosen.sum() / (units != masking.SPECIAL).sum() == pytest.approx(0.15, abs=0.005)
  np.testing.assert_array_equal(labels[chosen], ids[chosen])
  np.testing.assert_array_equal(corrupted[~chosen], ids[~chosen])  # the rest is untouched
  masked = corrupted[chosen] == MASK
  random = (corrupted[chosen] != MASK) & (corrupted[chosen] != ids[chosen])
  assert masked.mean() == pytest.approx(0.8, abs=0.01)
  assert random.mean() == pytest.approx(0.1, abs=0.01)  # random ids from [0, 1000): never the original
  assert np.all(corrupted[chosen][random] < VOCAB)


def test_whole_word_masking_masks_every_piece_of_a_chosen_word():
  ids, units = _batch()
  _, labels = masking.mask(ids, units, masking.Masking(MASK, VOCAB, whole_word=True), np.random.default_rng(2))
  chosen = labels != IGNORE
  starts = units == masking.WORD_START
  assert chosen[starts].mean() == pytest.approx(0.15, abs=0.01)  # 15% of the words
  for r in range(len(ids)):
    for pos in np.flatnonzero(units[r] == masking.CONTINUATION):
      assert chosen[r, pos] == chosen[r, pos - 1]  # a piece shares its word's fate
  assert masking.token_units([None, 0, 0, 1, None, None]) == [0, 1, 2, 1, 0, 0]


def test_predictions_keep_each_rows_masks_in_order_and_cut_an_overfull_row():
  ids, units = _batch(rows=50, length=32)
  corrupted, labels = masking.mask(ids, units, masking.Masking(MASK, VOCAB, probability=0.3), np.random.default_rng(3))
  chosen = labels != IGNORE
  count = int(chosen.sum(1).max())  # room for every row's masks
  again, positions, compact = masking.predictions(ids, corrupted, labels, count)
  np.testing.assert_array_equal(again, corrupted)
  assert positions.shape == compact.shape == (50, count)
  for r in range(50):
    n = int(chosen[r].sum())
    np.testing.assert_array_equal(positions[r, :n], np.flatnonzero(chosen[r]))
    np.testing.assert_array_equal(compact[r, :n], ids[r, chosen[r]])
    assert (compact[r, n:] == IGNORE).all() and (positions[r, n:] == 0).all()
  # with room for 3: a row keeps its first 3 masks, and its other chosen tokens get their own ids back
  cut, positions, compact = masking.predictions(ids, corrupted, labels, 3)
  for r in range(50):
    first = np.flatnonzero(chosen[r])[:3]
    np.testing.assert_array_equal(positions[r, :len(first)], first)
    np.testing.assert_array_equal(compact[r, :len(first)], ids[r, first])
    kept = np.zeros(32, bool)
    kept[first] = True
    np.testing.assert_array_equal(cut[r, kept], corrupted[r, kept])
    np.testing.assert_array_equal(cut[r, ~kept], ids[r, ~kept])
  assert masking.max_predictions(128, masking.Masking(MASK, VOCAB)) == 47
  assert masking.max_predictions(16, masking.Masking(MASK, VOCAB, probability=0.5)) == 16
  assert masking.max_predictions(128, masking.Masking(MASK, VOCAB, whole_word=True)) == 128  # words: any length


def test_whole_word_batches_predict_every_mask_at_a_power_of_two_of_positions():
  """Whole-word masking: the batch's P is the smallest power of two (at least 16, at most L) that holds its row
  with the most masks, so no chosen word loses a piece; the batch is the same as with P = L, cut."""
  from jtune.data import batching  # pylint: disable=g-import-not-at-top
  from jtune.data.features import Features, lengths_of, ragged  # pylint: disable=g-import-not-at-top
  ids, units = _batch(rows=16, length=128, seed=5)
  spec = masking.Masking(MASK, VOCAB, whole_word=True)
  split = Features(tokens={'input_ids': ragged(ids), 'units': ragged(units)}, rows={},
                   lengths=lengths_of(ragged(ids)), masking=spec)
  batch = batching.make_batch(split, np.arange(16), 128, 0, rng=np.random.default_rng(6))
  _, labels = masking.mask(ids.astype(np.int32), units, spec, np.random.default_rng(6))
  most = int((labels != IGNORE).sum(1).max())
  width = batch['mlm_positions'].shape[1]
  assert most <= width < 2 * max(most, 8) and width & (width - 1) == 0, (most, width)
  assert masking.max_predictions(128, spec, labels) == width
  everything = masking.predictions(ids, *masking.mask(ids.astype(np.int32), units, spec, np.random.default_rng(6)),
                                   128)
  np.testing.assert_array_equal(batch['input_ids'], everything[0])  # no mask undone
  np.testing.assert_array_equal(batch['mlm_positions'], everything[1][:, :width])
  np.testing.assert_array_equal(batch['labels'], everything[2][:, :width])
  assert (everything[2][:, width:] == IGNORE).all()


def test_the_head_at_the_masked_positions_gives_the_full_heads_loss():
  """BertForMaskedLM at `mlm_positions` against every position: the same logits there, the same masked-LM loss
  and gradient as the full [B, L, V] logits with [B, L] labels."""
  from jtune.models import bert  # pylint: disable=g-import-not-at-top
  from jtune.tasks import mlm  # pylint: disable=g-import-not-at-top
  cfg = bert.BertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                        max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12, initializer_range=0.2,
                        hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0, num_labels=0, head='mlm')
  ids, units = _batch(rows=6, length=24)
  ids = ids % VOCAB
  spec = masking.Masking(MASK, VOCAB)
  corrupted, labels = masking.mask(ids, units, spec, np.random.default_rng(4))
  corrupted, positions, compact = masking.predictions(ids, corrupted, labels, masking.max_predictions(24, spec))
  attention = (units != masking.SPECIAL).astype(np.int32)
  attention[:, 0] = 1
  module = bert.build(cfg)
  params = module.init(jax.random.PRNGKey(0), corrupted, attention, deterministic=True)['params']
  weights = np.linspace(1.0, 0.0, 6, dtype=np.float32)

  def loss(p, at_positions):
    extra = (positions,) if at_positions else ()
    logits = module.apply({'params': p}, corrupted, attention, None, *extra, deterministic=True)
    batch = {'labels': compact if at_positions else labels, 'weights': weights}
    total, count = mlm.loss_sums(logits, batch)
    return total / count, logits

  (ours, logits_p), grad_p = jax.value_and_grad(loss, has_aux=True)(params, True)
  (full, logits_l), grad_l = jax.value_and_grad(loss, has_aux=True)(params, False)
  assert logits_p.shape == (6, positions.shape[1], VOCAB) and logits_l.shape == (6, 24, VOCAB)
  np.testing.assert_allclose(logits_p, np.take_along_axis(np.asarray(logits_l), positions[:, :, None], 1),
                             atol=1e-5)
  assert float(ours) == pytest.approx(float(full), rel=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(grad_p), jax.tree_util.tree_leaves(grad_l)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.fixture(scope='module')
def hf_mlm(tmp_path_factory, minilm_dir):
  import torch  # pylint: disable=g-import-not-at-top  (test extra)
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, initializer_range=0.2)
  model = transformers.BertForMaskedLM(config).eval()
  with torch.no_grad():  # a bias that is not zero, so that its mapping shows
    model.cls.predictions.bias.normal_()
  folder = tmp_path_factory.mktemp('hf') / 'mlm'
  model.save_pretrained(folder)
  transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(folder)
  return model, folder


def _torch_logits(model, ids, mask):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def test_masked_lm_head_loads_and_exports_with_logit_parity(hf_mlm, tmp_path, cache_dir):
  import transformers  # pylint: disable=g-import-not-at-top

  torch_model, folder = hf_mlm
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 30000, (3, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  model, params = modeling.load(str(folder), cache_dir, head='mlm')
  ours = np.asarray(model.module.apply({'params': params}, ids, mask, deterministic=True))
  reference = _torch_logits(torch_model, ids, mask)
  assert ours.shape == (3, 12, 30522)
  np.testing.assert_allclose(ours, reference, atol=1e-4)

  modeling.export(model, params, [], None, tmp_path / 'export')
  again, info = transformers.BertForMaskedLM.from_pretrained(tmp_path / 'export', output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  assert again.config.architectures == ['BertForMaskedLM']
  np.testing.assert_allclose(_torch_logits(again.eval(), ids, mask), reference, atol=1e-4)


def test_mlm_loss_falls_on_held_out_text_then_a_classifier_starts_from_it(tmp_path, cache_dir):
  dapt = tmp_path / 'dapt'
  run_cli('jtune.train', '--config=configs/bert_mlm.py:tiny', f'--workdir={dapt}', f'--config.cache_dir={cache_dir}',
          '--config.train.num_steps=30', '--config.train.eval_every_steps=30', '--config.optim.learning_rate=3e-3')
  evals = [r for r in read_jsonl(dapt / 'metrics.jsonl') if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [0, 30]
  assert evals[-1]['eval_loss'] < evals[0]['eval_loss'] - 1.0  # held-out masked tokens, the same masks each time
  assert evals[-1]['eval_perplexity'] == pytest.approx(np.exp(evals[-1]['eval_loss']))

  # the classifier's encoder comes from the MLM run; its new head (and BERT's pooler) keep their fresh values
  c = bert_cls.get_config('tiny')
  c.cache_dir = cache_dir
  run = trainer.setup(config_lib.from_config_dict(c), str(tmp_path / 'fresh'))
  like = jax.device_get(run.state.params)
  merged = jax.device_get(checkpoint.restore_params(str(dapt), run.state.params))
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.PyTreeCheckpointer() as reader:
    mlm_params = jax.device_get(reader.restore(checkpoint.step_folder(str(dapt)) / 'state')['params'])
  for path, leaf in jax.tree_util.tree_leaves_with_path(merged['bert']):
    keys = tuple(k.key for k in path)
    source = like['bert'] if keys[0] == 'pooler' else mlm_params['bert']
    expected = source
    for k in keys:
      expected = expected[k]
    np.testing.assert_array_equal(leaf, expected, err_msg='/'.join(keys))
  np.testing.assert_array_equal(merged['classifier']['kernel'], like['classifier']['kernel'])

  proc = run_cli('jtune.train', '--config=configs/bert_cls.py:tiny', f'--workdir={tmp_path / "cls"}',
                 f'--config.cache_dir={cache_dir}', f'--config.train.init_from={dapt}', '--config.train.num_steps=4',
                 '--config.train.export=False')
  assert f'Warm start from the weights of {dapt}' in proc.stderr
