"""Every task end to end on a tiny model: train a few steps, evaluate, export, and the export predicts like jtune.

Each run uses another mesh preset on the 8 fake devices; tests/presets_test.py covers the remaining pairs.
"""

import importlib
import json

import jax
import numpy as np
import pytest

from jtune import config as config_lib
from jtune import sharding as sharding_lib
from jtune import step as step_lib
from jtune import trainer
from jtune.data import batching
from tests import task_data

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# task -> (config file, data maker, preset, the transformers class the export is for)
CASES = {
    'regression': ('bert_regression', task_data.regression, 'dp', 'AutoModelForSequenceClassification'),
    'multi_label': ('bert_multilabel', task_data.multi_label, 'fsdp', 'AutoModelForSequenceClassification'),
    'token_classification': ('bert_ner', task_data.ner, 'fsdp_tp', 'AutoModelForTokenClassification'),
    'qa': ('bert_qa', task_data.qa, 'fsdp_tp', 'AutoModelForQuestionAnswering'),
}


def run_task(config_file: str, variant: str, workdir, cache_dir, data_files=None, **overrides):
  """Trains in this process; returns (run, final eval metrics, metrics.jsonl records)."""
  c = importlib.import_module(f'configs.{config_file}').get_config(variant)
  c.cache_dir = cache_dir
  c.train.export_checkpoint = 'last'
  for split, path in (data_files or {}).items():
    c.data.data_files[split] = path
  for key, value in overrides.items():
    section, name = key.split('__')
    c[section][name] = value
  run = trainer.setup(config_lib.from_config_dict(c), str(workdir))
  metrics = trainer.train(run, c.to_dict())
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return run, metrics, records


def jtune_outputs(run, batch):
  with sharding_lib.activate(run.mesh, run.cfg.mesh.rules):
    out = jax.jit(lambda p, b: step_lib.predict_step(p, b, model=run.model.module, inputs=run.model.inputs))(
        run.state.params, batch)
  return np.asarray(out)


@pytest.mark.parametrize('task', list(CASES))
def test_task_trains_evaluates_and_exports(task, tmp_path, cache_dir):
  config_file, make_data, preset, auto_class = CASES[task]
  files = make_data(tmp_path)
  run, metrics, records = run_task(config_file, f'tiny,{preset}', tmp_path / 'run', cache_dir, files,
                                   train__num_epochs=2, train__log_every_steps=1)
  want = {m for m in config_lib.TASK_METRICS[task]}
  assert set(metrics) == {f'eval_{m}' for m in want}
  assert all(np.isfinite(v) for v in metrics.values())
  losses = [r['loss'] for r in records if 'loss' in r]
  assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses  # it learns
  # The export loads in transformers, as the class of its head, and predicts what jtune predicts.
  exported = getattr(transformers, auto_class).from_pretrained(tmp_path / 'run' / 'export').eval()
  local = next(batching.eval_batches(run.eval_split, 8, run.cfg.data.buckets, run.model.pad_id))
  ours = jtune_outputs(run, local)
  with torch.no_grad():
    out = exported(**{k: torch.tensor(local[k]) for k in ('input_ids', 'attention_mask', 'token_type_ids')})
  theirs = (np.stack([out.start_logits, out.end_logits], -1) if task == 'qa' else out.logits.numpy())
  mask = local['attention_mask'].astype(bool)
  if ours.ndim == 3:  # per-token outputs: compare the real tokens only
    ours, theirs = ours[mask], theirs[mask]
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  config = json.loads((tmp_path / 'run' / 'export' / 'config.json').read_text())
  if task == 'regression':
    assert config['problem_type'] == 'regression' and len(config['id2label']) == 1
  if task == 'multi_label':
    assert config['problem_type'] == 'multi_label_classification'
    assert sorted(config['id2label'].values()) == sorted(task_data.TOPICS)
  if task == 'token_classification':
    assert set(config['id2label'].values()) == {'O', 'B-PER', 'I-PER', 'B-LOC', 'I-LOC'}
