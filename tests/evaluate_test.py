"""python -m jtune.evaluate: exported classifiers scored alone and as an ensemble, checked against PyTorch."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from configs import bert_cls
from jtune import config as config_lib
from jtune import ensemble
from jtune import report as report_lib
from jtune.data import pipeline
from jtune.tasks import classification
from tests.cli import TINY, run_cli

LABELS = ['negative', 'positive']  # the polarity corpus's


def _classifier(folder, tokenizer_dir, seed: int, labels=LABELS):
  """A small random BertForSequenceClassification saved as a Hugging Face folder (what jtune exports)."""
  import torch  # pylint: disable=g-import-not-at-top  (test extra)
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  config = transformers.BertConfig(
      vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
      initializer_range=0.2, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
  model = transformers.BertForSequenceClassification(config).eval()
  model.save_pretrained(folder)
  transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
  return model


def _torch_probs(model, tokenizer_dir, texts, max_length):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  inputs = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors='pt')
  with torch.no_grad():
    return torch.softmax(model(**inputs).logits.double(), dim=-1).numpy()


@pytest.fixture(scope='module')
def setup(tmp_path_factory, cache_dir, minilm_dir):
  root = tmp_path_factory.mktemp('evaluate')
  c = bert_cls.get_config('tiny')
  c.cache_dir = cache_dir
  cfg = config_lib.from_config_dict(c)
  models = [_classifier(root / f'model_{seed}', minilm_dir, seed) for seed in (1, 2)]
  return cfg, root, models, minilm_dir


def test_members_match_pytorch_and_the_ensemble_averages_them(setup):
  cfg, root, models, tokenizer_dir = setup
  _, ds = pipeline.load_splits(cfg.data)
  labels = pipeline.encode_labels(ds, cfg.data.eval_split, cfg.data.label_column, LABELS)
  reference = [_torch_probs(m, tokenizer_dir, list(ds[cfg.data.text_column]), cfg.data.max_length) for m in models]
  for i, ref in enumerate(reference):
    probs, got_labels, names = ensemble.probabilities(str(root / f'model_{i + 1}'), cfg, cfg.data.eval_split, ds)
    np.testing.assert_allclose(probs, ref, atol=1e-5)  # the exported head is loaded and applied as PyTorch does
    np.testing.assert_array_equal(got_labels, labels)
    assert names == LABELS
  mean = np.mean(reference, axis=0)
  assert np.abs(mean[:, 0] - mean[:, 1]).min() > 1e-4  # no near-tie that rounding could flip
  result = ensemble.evaluate(cfg, [str(root / 'model_1'), str(root / 'model_2')])
  expected = np.zeros((2, 2), int)
  np.add.at(expected, (labels, mean.argmax(axis=1)), 1)
  scored = result['ensemble']
  assert scored['confusion'] == expected.tolist() and scored['count'] == len(labels) == 100
  assert scored['accuracy'] == pytest.approx(np.mean(mean.argmax(axis=1) == labels))
  assert scored['loss'] == pytest.approx(-np.mean(np.log(mean[np.arange(len(labels)), labels])), rel=1e-5)
  for member, ref in zip(result['members'], reference):  # each model alone, as PyTorch scores it
    assert member['accuracy'] == pytest.approx(np.mean(ref.argmax(axis=1) == labels))


def test_only_the_scored_split_is_read_and_only_classifiers_are_scored(setup, tmp_path):
  """A file for the scored split alone is enough (no train file); a config of another task is refused."""
  cfg, root, _, _ = setup
  path = tmp_path / 'test.jsonl'
  path.write_text(''.join(json.dumps({'text': text, 'label': label}) + '\n'
                          for text, label in [('a fine film', 'positive'), ('a dull film', 'negative')] * 3))
  data = dataclasses.replace(cfg.data, dataset='json', dataset_config='',
                             data_files=(('test', str(path)), ('train', str(tmp_path / 'absent.jsonl'))))
  result = ensemble.evaluate(dataclasses.replace(cfg, data=data), [str(root / 'model_1')], 'test')
  assert result['ensemble']['count'] == 6 and result['split'] == 'test'
  other = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, name='regression'))
  with pytest.raises(config_lib.ConfigError, match=r"^config.task.name='regression': expected 'classification' "
                                                   r'\(jtune.evaluate scores exported sequence classifiers\)$'):
    ensemble.evaluate(other, [str(root / 'model_1')])


def test_a_model_of_another_head_is_one_line(setup, tmp_path):
  """A token classifier (or any folder saved with another head) where a sequence classifier is expected: named
  before its weights load (was a Flax traceback about the pooler from jtune.serve)."""
  cfg, root, _, _ = setup
  tagger = tmp_path / 'tagger'
  shutil.copytree(root / 'model_1', tagger)
  config = json.loads((tagger / 'config.json').read_text())
  (tagger / 'config.json').write_text(json.dumps({**config, 'architectures': ['BertForTokenClassification']}))
  with pytest.raises(ValueError, match=rf"^model folder '{tagger}' holds a BertForTokenClassification: expected a "
                                       r"\*ForSequenceClassification folder \(the 'sequence' head\)$"):
    ensemble.evaluate(cfg, [str(tagger)])
  from jtune import modeling  # pylint: disable=g-import-not-at-top  (what jtune.generate loads a model with)
  with pytest.raises(ValueError, match=rf"^model folder '{root / 'model_1'}' holds a BertForSequenceClassification "
                                       r'encoder: expected a decoder \(GPT-2, Llama\) or T5 folder for generation$'):
    modeling.load(str(root / 'model_1'), cfg.cache_dir, head=None)


def test_per_class_metrics_from_a_confusion_matrix():
  # rows: true class; columns: predicted. Class 2 is never predicted and has no examples.
  per = classification.per_class(np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]]))
  np.testing.assert_allclose(per['precision'], [3 / 5, 4 / 5, 0.0])
  np.testing.assert_allclose(per['recall'], [3 / 4, 4 / 6, 0.0])
  np.testing.assert_allclose(per['f1'], [2 * .6 * .75 / 1.35, 2 * .8 * (2 / 3) / (.8 + 2 / 3), 0.0])
  np.testing.assert_array_equal(per['support'], [4, 6, 0])


def test_report_macro_averages_leave_out_a_class_neither_true_nor_predicted():
  # true 0 0 1, predicted 0 1 1 by a 3-class model: class 2 does not count (scikit-learn's average='macro')
  s = ensemble.scores(np.eye(3)[[0, 1, 1]] * 0.7 + 0.1, np.array([0, 0, 1]))
  assert (s['precision'], s['recall'], s['f1']) == pytest.approx(((1 + 1 / 2) / 2, (1 / 2 + 1) / 2, 2 / 3))
  assert s['per_class']['f1'][2] == 0.0  # still listed per class


def test_models_with_other_labels_do_not_form_an_ensemble(setup, tmp_path):
  cfg, root, _, tokenizer_dir = setup
  _classifier(tmp_path / 'other', tokenizer_dir, 3, labels=['positive', 'negative'])
  with pytest.raises(ValueError, match=r"--model=.*other predicts labels \['positive', 'negative'\]: expected"):
    ensemble.evaluate(cfg, [str(root / 'model_1'), str(tmp_path / 'other')])
  _classifier(tmp_path / 'three', tokenizer_dir, 3, labels=['negative', 'neutral', 'positive'])
  with pytest.raises(ValueError, match='predicts labels'):
    ensemble.evaluate(cfg, [str(root / 'model_1'), str(tmp_path / 'three')])


def test_command_line_writes_the_report(setup, tmp_path, cache_dir):
  _, root, _, _ = setup
  out = tmp_path / 'report'
  proc = run_cli('jtune.evaluate', *TINY, f'--config.cache_dir={cache_dir}', f'--model={root / "model_1"}',
                 f'--model={root / "model_2"}', f'--out={out}')
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  report = json.loads((out / 'report.json').read_text())
  assert summary['accuracy'] == report['ensemble']['accuracy'] and summary['count'] == 100
  assert len(report['members']) == 2 and report['labels'] == LABELS
  assert report['ensemble']['per_class']['support'] == [float(sum(r)) for r in report['ensemble']['confusion']]
  markdown = (out / 'report.md').read_text()
  assert 'ensemble of 2 (mean probabilities)' in markdown and '| negative |' in markdown
  from matplotlib import image  # pylint: disable=g-import-not-at-top
  assert image.imread(out / 'confusion.png').ndim == 3  # a real PNG

  missing = run_cli('jtune.evaluate', *TINY, f'--config.cache_dir={cache_dir}', f'--model={tmp_path / "nope"}',
                    f'--out={tmp_path / "none"}', check=False)
  assert missing.returncode == 2 and 'nope' in missing.stderr.strip().splitlines()[-1]
  assert not (tmp_path / 'none').exists()  # nothing half-written

  # --out replaces only an earlier report: a folder of anything else is refused in one line and left whole
  (tmp_path / 'notes.txt').write_text('mine')
  refused = run_cli('jtune.evaluate', *TINY, f'--config.cache_dir={cache_dir}', f'--model={root / "model_1"}',
                    f'--out={tmp_path}', check=False)
  last = refused.stderr.strip().splitlines()[-1]
  assert refused.returncode == 2 and last.startswith(f'jtune: error: {tmp_path}: a folder that is not empty and '
                                                     'not an earlier jtune evaluation report'), refused.stderr
  assert (tmp_path / 'notes.txt').read_text() == 'mine' and (out / 'report.json').is_file()
  report_lib.write(report, out)  # an earlier report: replaced
  assert json.loads((out / 'report.json').read_text()) == report
  (out / 'mine.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='not an earlier jtune evaluation report'):
    report_lib.write(report, out)
  assert (out / 'mine.txt').is_file()
