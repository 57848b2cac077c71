"""End to end through the command line: train the tiny config, resume, export, and bad input."""

import functools
import json
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest

from tests.cli import TINY, read_jsonl, run_cli


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp('tiny')
  run_cli('jtune.train', *TINY, f'--workdir={workdir}', f'--config.cache_dir={cache_dir}')
  return workdir


def test_outputs(tiny_run):
  records = read_jsonl(tiny_run / 'metrics.jsonl')
  train = [r for r in records if 'loss' in r]
  evals = [r for r in records if 'eval_accuracy' in r]
  assert [r['step'] for r in train] == list(range(2, 17, 2))  # 256 examples / 16 = 16 steps, log every 2
  assert set(train[0]) == {'step', 'loss', 'learning_rate', 'grad_norm', 'examples_per_sec',
                           'nonfinite_in_a_row', 'skipped_steps'}
  assert all(np.isfinite(r['loss']) and r['examples_per_sec'] > 0 for r in train)
  assert [r['step'] for r in evals] == [16]
  assert {'eval_loss', 'eval_accuracy', 'eval_f1', 'eval_precision', 'eval_recall'} <= set(evals[0])
  assert evals[0]['eval_count'] == 100  # every example counted once, padding excluded
  config = json.loads((tiny_run / 'config.json').read_text())
  assert config['model']['config_overrides']['num_hidden_layers'] == 2
  assert json.loads((tiny_run / 'labels.json').read_text()) == ['negative', 'positive']
  assert sorted(p.name for p in (tiny_run / 'checkpoints').iterdir() if p.name.isdigit()) == ['16', '8']


def test_tensorboard_reader_parses_events(tiny_run):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(tiny_run / 'tensorboard'))
  acc.Reload()
  tags = acc.Tags()['scalars']
  assert {'loss', 'learning_rate', 'eval_accuracy'} <= set(tags)
  assert [e.step for e in acc.Scalars('loss')] == list(range(2, 17, 2))


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp('tiny_lora')
  run_cli('jtune.train', '--config=configs/bert_cls.py:tiny,lora', f'--workdir={workdir}',
          f'--config.cache_dir={cache_dir}', '--config.model.lora.dropout=0.1')
  return workdir


@pytest.mark.parametrize('run', ['tiny_run', 'lora_run'])
def test_export_predicts_like_jtune(run, request):
  tiny_run = request.getfixturevalue(run)
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from jtune import export, step  # pylint: disable=g-import-not-at-top
  from jtune.data import pipeline  # pylint: disable=g-import-not-at-top

  cfg, model, _, params = export.restore_run(str(tiny_run))
  assert ('lora_a' in params['bert']['layer_0']['attention']['query']) == (run == 'lora_run')
  out = tiny_run / 'export'
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert hf.config.id2label == {0: 'negative', 1: 'positive'}
  assert (out / 'tokenizer.json').is_file() or (out / 'vocab.txt').is_file()
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  _, evaluation = pipeline.load_splits(cfg.data)
  texts = list(evaluation[cfg.data.text_column])
  enc = tokenizer(texts, padding='max_length', truncation=True, max_length=cfg.data.max_length,
                  return_tensors='np')
  batch = {k: enc[k].astype(np.int32) for k in ('input_ids', 'attention_mask', 'token_type_ids')}
  ours = np.asarray(step.predict_step(params, batch, model=model.module))
  with torch.no_grad():
    theirs = hf(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}).logits.numpy()
  assert len(texts) == 100
  assert np.max(np.abs(ours - theirs)) <= 1e-4


def test_resume_continues_from_latest_checkpoint(tiny_run, tmp_path, cache_dir):
  # A run that died after its step-8 checkpoint: keep that checkpoint and the files written before it.
  workdir = tmp_path / 'resumed'
  (workdir / 'checkpoints').mkdir(parents=True)
  shutil.copytree(tiny_run / 'checkpoints' / '8', workdir / 'checkpoints' / '8')
  for name in ('metrics.jsonl', 'config.json', 'labels.json'):
    shutil.copy(tiny_run / name, workdir / name)
  # another seed is another run: refused in one line, the checkpoint left as it was
  other = run_cli('jtune.train', *TINY, f'--workdir={workdir}', f'--config.cache_dir={cache_dir}', '--config.seed=7',
                  check=False)
  last = other.stderr.strip().splitlines()[-1]
  assert other.returncode == 2 and last == (f'jtune: error: config.seed=7: expected 0, as the run in {workdir} was '
                                            'started with (its checkpoints resume only that run: set the same value, '
                                            'or give a new --workdir)'), other.stderr[-3000:]
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['8']
  assert 'Parameters:' not in other.stderr  # refused before the data, the model and its state were made
  proc = run_cli('jtune.train', *TINY, f'--workdir={workdir}', f'--config.cache_dir={cache_dir}')
  assert 'Resuming from' in proc.stderr
  # The same config as tiny_run's: its compiled steps come from cache_dir/executables, and reproduce it below
  assert 'train_step loaded from' in proc.stderr and 'eval_step loaded from' in proc.stderr, proc.stderr[-3000:]
  ours = read_jsonl(workdir / 'metrics.jsonl')
  ref = read_jsonl(tiny_run / 'metrics.jsonl')
  assert [r['step'] for r in ours] == [r['step'] for r in ref]  # steps > 8 were dropped, then re-logged
  for a, b in zip(ours, ref):
    for key in set(a) - {'examples_per_sec'}:
      assert a[key] == pytest.approx(b[key], abs=1e-6), (a['step'], key)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  resumed = load_file(workdir / 'export' / 'model.safetensors')
  original = load_file(tiny_run / 'export' / 'model.safetensors')
  assert resumed.keys() == original.keys()
  for key in resumed:
    np.testing.assert_allclose(resumed[key], original[key], atol=1e-6, err_msg=key)


def test_a_resume_must_keep_what_the_run_trains(tiny_run, tmp_path):
  """trainer.check_resumable: the fields that make a run another run are refused; the rest may change."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jtune import config as config_lib, trainer  # pylint: disable=g-import-not-at-top

  def saved_with(field, value):  # the run's own config.json, one field changed
    c = ml_collections.ConfigDict(json.loads((tiny_run / 'config.json').read_text()))
    *path, name = field.split('.')
    functools.reduce(getattr, path, c)[name] = value
    return config_lib.from_config_dict(c)
  for field, value in (('train.num_epochs', 3), ('optim.learning_rate', 0.5), ('train.eval_every_steps', 3)):
    trainer.check_resumable(saved_with(field, value), tiny_run)
  for field, value in (('model.config_overrides.hidden_size', 64), ('data.label_column', 'topic'), ('seed', 3),
                       ('data.max_train_examples', 64), ('train.batch_size', 32), ('model.lora.rank', 4),
                       ('task.prompt_template', '{text}!')):
    shown = 'model.config_overrides' if 'overrides' in field else field
    with pytest.raises(config_lib.ConfigError, match=rf'^config.{re.escape(shown)}=.*: expected .*, as the run '
                                                     rf'in {re.escape(str(tiny_run))} was started with'):
      trainer.check_resumable(saved_with(field, value), tiny_run)
  # a tuple-valued override, which config.json holds as a list, is the same value
  workdir = tmp_path / 'run'
  workdir.mkdir()
  saved = json.loads((tiny_run / 'config.json').read_text())
  saved['model']['config_overrides']['eos_token_id'] = [1, 2]
  (workdir / 'config.json').write_text(json.dumps(saved))
  live = ml_collections.ConfigDict(json.loads((tiny_run / 'config.json').read_text()))
  live.model.config_overrides['eos_token_id'] = (1, 2)
  trainer.check_resumable(config_lib.from_config_dict(live), workdir)
  # a config.json with data files an older jtune ignored (polarity does not read them) is still compared
  saved['data']['data_files']['train'] = 'unread.jsonl'
  (workdir / 'config.json').write_text(json.dumps(saved))
  live.seed = 3
  with pytest.raises(config_lib.ConfigError, match='^config.seed=3: expected 0, as the run'):
    trainer.check_resumable(config_lib.from_config_dict(live), workdir)


def test_export_command(tiny_run, tmp_path):
  out = tmp_path / 'hf'
  # A save of the run in flight (Orbax's temporary folder): the export, a reader, must leave it alone.
  saving = tiny_run / 'checkpoints' / '99.orbax-checkpoint-tmp-1733250000'
  saving.mkdir()
  (saving / 'shard').write_text('in flight')
  try:
    run_cli('jtune.export', f'--workdir={tiny_run}', f'--out={out}')
    assert (saving / 'shard').is_file()
  finally:
    shutil.rmtree(saving, ignore_errors=True)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  a, b = load_file(out / 'model.safetensors'), load_file(tiny_run / 'export' / 'model.safetensors')
  assert all(np.array_equal(a[k], b[k]) for k in a)



def test_a_damaged_or_partial_checkpoint_is_one_line(tiny_run, tmp_path):
  """A step folder copied in part, truncated array files, a step that is not there, or a damaged config.json or
  labels.json: one line naming the folder or file, and the latest complete step before it."""
  from jtune import checkpoint, config as config_lib, export, trainer  # pylint: disable=g-import-not-at-top
  run = tmp_path / 'run'
  shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns('export'))
  steps = sorted(int(p.name) for p in (run / 'checkpoints').iterdir() if p.name.isdigit())
  (run / 'checkpoints' / '99').mkdir()  # copied in part: nothing in it yet
  with pytest.raises(checkpoint.CheckpointError, match=(
      rf'^checkpoint {run}/checkpoints/99 is incomplete: expected its state and data folders, found no state or '
      rf'data \(copied in part\?\); remove that folder to go back to step {steps[-1]}$')):
    export.restore_run(str(run))
  listed = ', '.join(map(str, steps + [99]))
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf'^--step=5: no checkpoint of that step in {run}/checkpoints: expected one of {listed}$'):
    export.restore_run(str(run), 5)
  shutil.rmtree(run / 'checkpoints' / '99')
  for f in (run / 'checkpoints' / str(steps[-1]) / 'state').rglob('d/*'):
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])  # truncated
  back = f'remove that folder to go back to step {steps[-2]}' if len(steps) > 1 else 'there is no earlier checkpoint'
  with pytest.raises(checkpoint.CheckpointError, match=(
      rf'^checkpoint {run}/checkpoints/{steps[-1]} cannot be read \(damaged files\?\): .+; {back}$')) as e:
    export.restore_run(str(run))
  assert '\n' not in str(e.value)
  cfg = config_lib.from_saved(json.loads((run / 'config.json').read_text()))
  for name in ('labels.json', 'config.json'):
    (run / name).write_text('{"seed": 0, ')
    with pytest.raises(config_lib.ConfigError, match=rf"^--workdir='{run}': {name} is not valid JSON \(.+\): "
                                                     rf'expected the {name} that jtune wrote for this run$'):
      export.restore_run(str(run))
  with pytest.raises(config_lib.ConfigError, match=rf'^{run}/config.json: not valid JSON \(.+\): expected the '
                                                   rf'config.json that jtune wrote for the checkpoints in {run}/'):
    trainer.check_resumable(cfg, run)


def _snapshot(folder):
  return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob('*')}


def test_export_replaces_only_an_earlier_export(tiny_run, tmp_path):
  """--out may name a new or empty folder or an earlier jtune export; the workdir, a folder above it, a file or
  someone's model folder (no jtune mark in its safetensors header) is refused in one line and left as it was."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from jtune import export  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'hf'
  export.export_run(str(tiny_run), str(out))
  export.export_run(str(tiny_run), str(out))  # its own earlier export: replaced
  (tmp_path / 'empty').mkdir()
  export.export_run(str(tiny_run), str(tmp_path / 'empty'))
  theirs = tmp_path / 'theirs'  # a model folder that transformers wrote: the same files, an unmarked header
  shutil.copytree(out, theirs)
  safetensors.numpy.save_file(safetensors.numpy.load_file(out / 'model.safetensors'), theirs / 'model.safetensors',
                              metadata={'format': 'pt'})
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='an export by a jtune from before 2026-12-04 carries no mark: delete it'):
    export.export_run(str(tiny_run), str(theirs))
  own = tiny_run / 'export'  # the run's own export folder (here made as an older jtune wrote it) is the run's
  weights = safetensors.numpy.load_file(own / 'model.safetensors')
  safetensors.numpy.save_file(weights, own / 'model.safetensors', metadata={'format': 'pt'})
  export.export_run(str(tiny_run), str(own))
  for key, value in safetensors.numpy.load_file(own / 'model.safetensors').items():
    np.testing.assert_array_equal(value, weights[key], err_msg=key)
  for bad, why in ((tiny_run, 'not an earlier jtune Hugging Face export'), (tmp_path, 'not an earlier jtune'),
                   (theirs, 'not an earlier jtune'), (tmp_path / 'notes.txt', 'is a file: expected a folder')):
    before = _snapshot(bad) if bad.is_dir() else bad.read_text()
    with pytest.raises(FileExistsError, match=f'^{re.escape(str(bad))}: .*{why}'):
      export.export_run(str(tiny_run), str(bad))
    assert (_snapshot(bad) if bad.is_dir() else bad.read_text()) == before


def _older_run(tiny_run, folder, section, field):
  """A copy of the tiny run's folder (no checkpoints) whose config.json lacks a field, as an older jtune saved it."""
  folder.mkdir()
  config = json.loads((tiny_run / 'config.json').read_text())
  del config[section][field]
  (folder / 'config.json').write_text(json.dumps(config))
  shutil.copy(tiny_run / 'labels.json', folder / 'labels.json')
  return folder


def test_export_of_a_run_saved_before_a_field_existed_is_one_line(tiny_run, tmp_path):
  from jtune import config as config_lib, export  # pylint: disable=g-import-not-at-top
  older = _older_run(tiny_run, tmp_path / 'old', 'data', 'group_by_length')
  proc = run_cli('jtune.export', f'--workdir={older}', f'--out={tmp_path / "hf"}', check=False)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('jtune: error: ') and "config.json has no field 'group_by_length'" in last, proc.stderr
  older = _older_run(tiny_run, tmp_path / 'older', 'train', 'dropout_rng')  # TrainConfig reads by key
  with pytest.raises(config_lib.ConfigError, match="config.json has no field 'dropout_rng'"):
    export.restore_run(str(older))
  # data files that an older jtune ignored for a packaged corpus (a ConfigError now) do not stop its export
  ignored = tmp_path / 'ignored'
  shutil.copytree(tiny_run, ignored)
  config = json.loads((ignored / 'config.json').read_text())
  assert config['data']['dataset'] == 'polarity'
  config['data']['data_files']['train'] = 'unread.jsonl'
  (ignored / 'config.json').write_text(json.dumps(config))
  _, _, labels, _ = export.restore_run(str(ignored))
  assert labels == json.loads((tiny_run / 'labels.json').read_text())


def _write_csv(path: pathlib.Path, rows: list[tuple[str, str]], header=('label', 'text')):
  path.write_text('\n'.join([','.join(header)] + [f'{label},"{text}"' for label, text in rows]) + '\n')


def _csv_data(tmp_path, train_rows, valid_rows, header=('label', 'text')):
  _write_csv(tmp_path / 'train.csv', train_rows, header)
  _write_csv(tmp_path / 'valid.csv', valid_rows, header)
  return ['--config.data.dataset=csv', f'--config.data.data_files.train={tmp_path / "train.csv"}',
          f'--config.data.data_files.validation={tmp_path / "valid.csv"}']


GOOD = [('pos', 'a fine film'), ('neg', 'a dull film')] * 16


@pytest.mark.parametrize('case', [
    'unknown_field', 'bad_value', 'missing_model', 'missing_file', 'missing_column', 'unknown_label',
    'empty_split', 'indivisible_batch', 'unknown_flag', 'unparsable_override', 'missing_config_file',
    'unknown_variant'])
def test_bad_input_is_one_line(case, tmp_path, cache_dir):
  workdir = tmp_path / 'run'
  args = [*TINY, f'--workdir={workdir}', f'--config.cache_dir={cache_dir}']
  needle = {
      'unknown_field': 'batchsize',
      'bad_value': 'config.optim.learning_rate=-0.1',
      'missing_model': '/nonexistent/model',
      'missing_file': 'nope.csv',
      'missing_column': "'text'",
      'unknown_label': "'maybe'",
      'empty_split': "'validation'",
      'indivisible_batch': 'config.train.batch_size=12',
      'unknown_flag': "Unknown command line flag 'nosuchflag' (--helpshort lists the flags)",
      'unparsable_override': "flag --config.train.batch_size=abc: invalid literal for int() with base 10: 'abc'",
      'missing_config_file': "No such file or directory: 'configs/nope.py'",
      'unknown_variant': "ValueError: unknown variant 'nope' of configs/bert_cls.py; expected one of: topics",
  }[case]
  if case == 'unknown_field':
    args.append('--config.train.batchsize=3')
  elif case == 'bad_value':
    args.append('--config.optim.learning_rate=-0.1')
  elif case == 'missing_model':
    args.append('--config.model.name_or_path=/nonexistent/model')
  elif case == 'missing_file':
    args += ['--config.data.dataset=csv', f'--config.data.data_files.train={tmp_path / "nope.csv"}']
  elif case == 'missing_column':
    args += _csv_data(tmp_path, GOOD, GOOD, header=('label', 'sentence'))
  elif case == 'unknown_label':
    args += _csv_data(tmp_path, GOOD, GOOD + [('maybe', 'an odd film')])
  elif case == 'empty_split':
    args += _csv_data(tmp_path, GOOD, [])
  elif case == 'indivisible_batch':
    args.append('--config.train.batch_size=12')
  elif case == 'unknown_flag':
    args.append('--nosuchflag=3')
  elif case == 'unparsable_override':
    args.append('--config.train.batch_size=abc')
  elif case == 'missing_config_file':  # with an override, which ml_collections applies while parsing the flags
    args = ['--config=configs/nope.py', *args[1:], '--config.train.batch_size=4']
  elif case == 'unknown_variant':  # ml_collections quotes the config file's traceback: its last line is kept
    args = ['--config=configs/bert_cls.py:nope', *args[1:]]
  proc = run_cli('jtune.train', *args, check=False)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('jtune: error: ') and needle in last, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert not (workdir / 'checkpoints').exists() or not any(
      p.name.isdigit() for p in (workdir / 'checkpoints').iterdir())
  assert not (workdir / 'export').exists()


def test_compile_only_reports_memory_without_training(tmp_path, cache_dir):
  proc = run_cli('jtune.train', *TINY, '--compile_only', f'--config.cache_dir={cache_dir}',
                 '--config.mesh.data=1', '--config.mesh.fsdp=8')
  report = proc.stdout
  assert 'mesh data=1 x fsdp=8 x tensor=1' in report, report
  assert 'peak_bytes' in report and 'MiB per device' in report
  # 3 layers: a sequence classifier scans all but its last (first-position-only) layer, so 2 must differ from 1
  three = ('--config.model.config_overrides.num_hidden_layers=3', '--config.mesh.data=1', '--config.mesh.fsdp=8')
  unrolled = run_cli('jtune.train', *TINY, '--compile_only', f'--config.cache_dir={cache_dir}', *three).stdout
  scanned = run_cli('jtune.train', *TINY, '--compile_only', f'--config.cache_dir={cache_dir}', *three,
                    '--config.model.scan_layers=True').stdout
  assert 'peak_bytes' in scanned and scanned != unrolled  # the step compiled, and compiled differently
  proc = run_cli('jtune.train', *TINY, '--compile_only', f'--config.cache_dir={cache_dir}',
                 '--config.mesh.data=1', '--config.mesh.tensor=8', check=False)
  assert proc.returncode == 2
  assert "config.mesh.tensor=8" in proc.stderr.strip().splitlines()[-1]


def _corrupt_model(tmp_path, minilm_dir):
  folder = tmp_path / 'model'
  shutil.copytree(minilm_dir, folder)
  weights = folder / 'model.safetensors'
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
  return ['--config.model.init=pretrained', f'--config.model.name_or_path={folder}',
          '--config.model.config_overrides.num_hidden_layers=6', '--config.model.config_overrides.hidden_size=384',
          '--config.model.config_overrides.num_attention_heads=12',
          '--config.model.config_overrides.intermediate_size=1536']


def _mismatched_checkpoint(tmp_path, tiny_run):
  shutil.copytree(tiny_run / 'checkpoints' / '8', tmp_path / 'run' / 'checkpoints' / '8')
  return ['--config.model.config_overrides.hidden_size=64']


def _non_utf8(tmp_path):
  (tmp_path / 'train.csv').write_bytes(b'label,text\npos,a fine film\nneg,caf\xe9 noir\n' * 8)
  return ['--config.data.dataset=csv', f'--config.data.data_files.train={tmp_path / "train.csv"}',
          f'--config.data.data_files.validation={tmp_path / "train.csv"}']


def _non_utf8_json(tmp_path):  # Arrow's JSON reader keeps the bytes; they fail when the column is read
  (tmp_path / 'train.jsonl').write_bytes(b'{"label": "pos", "text": "a fine film"}\n'
                                         b'{"label": "neg", "text": "caf\xe9 noir"}\n' * 8)
  return ['--config.data.dataset=json', f'--config.data.data_files.train={tmp_path / "train.jsonl"}',
          f'--config.data.data_files.validation={tmp_path / "train.jsonl"}']


def _small_disk(tmp_path):
  mount = tmp_path / 'small'
  mount.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', str(mount)],
                    capture_output=True, check=False).returncode != 0:
    pytest.skip('needs root to mount a 3 MB tmpfs that fills during the first checkpoint')
  return mount


@pytest.mark.parametrize('case,needle', [
    ('zero_batch', 'config.train.batch_size=0: expected a positive integer'),
    ('long_warmup', 'config.optim.warmup_ratio=1.5: expected a fraction in [0, 1) of the training steps'),
    ('corrupt_safetensors', 'is not a readable safetensors file'),
    ('checkpoint_mismatch', 'does not match this model and optimizer'),
    ('empty_text', "column 'text' is '': expected non-empty text"),
    ('non_utf8', "codec can't decode byte 0xe9"),
    ('non_utf8_json', "split 'train' row 1: column 'text' is not UTF-8 text (invalid continuation byte at byte 3): "
                      'expected a UTF-8 file'),
    ('workdir_not_writable', 'cannot create it'),
    ('cache_dir_a_file', "expected a folder, not a file (or a path where jtune may create one)"),
    ('disk_full', 'could not be written to'),
])
def test_more_bad_input_is_one_line(case, needle, tmp_path, cache_dir, minilm_dir, tiny_run):
  workdir = tmp_path / 'run'
  extra = {
      'zero_batch': lambda: ['--config.train.batch_size=0'],
      'long_warmup': lambda: ['--config.optim.warmup_ratio=1.5'],
      'corrupt_safetensors': lambda: _corrupt_model(tmp_path, minilm_dir),
      'checkpoint_mismatch': lambda: _mismatched_checkpoint(tmp_path, tiny_run),
      'empty_text': lambda: _csv_data(tmp_path, GOOD + [('pos', '')], GOOD),
      'non_utf8': lambda: _non_utf8(tmp_path),
      'non_utf8_json': lambda: _non_utf8_json(tmp_path),
      'workdir_not_writable': lambda: [],
      'cache_dir_a_file': lambda: [f'--config.cache_dir={tmp_path / "file"}'],
      'disk_full': lambda: ['--config.train.checkpoint_every_steps=4'],
  }[case]()
  if case in ('workdir_not_writable', 'cache_dir_a_file'):
    (tmp_path / 'file').write_text('a file, not a folder')
  if case == 'workdir_not_writable':
    workdir = tmp_path / 'file' / 'run'
  if case == 'disk_full':
    workdir = _small_disk(tmp_path) / 'run'
  try:
    proc = run_cli('jtune.train', *TINY, f'--workdir={workdir}', f'--config.cache_dir={cache_dir}', *extra,
                   check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('jtune: error: ') and needle in last, proc.stderr[-3000:]
    checkpoints = workdir / 'checkpoints'
    if case != 'checkpoint_mismatch' and checkpoints.is_dir():
      assert not any(p.name.isdigit() or 'tmp' in p.name for p in checkpoints.iterdir())
    assert not (workdir / 'export').exists()
  finally:
    if case == 'disk_full':
      subprocess.run(['umount', str(workdir.parent)], check=False)


def test_lora_on_the_pretrained_model_exports_merged_and_as_a_peft_adapter(tmp_path, cache_dir, minilm_dir):
  """Both exports predict what jtune predicts: the merged folder in plain transformers, the adapter folder
  through peft on the original model."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from jtune import export, step  # pylint: disable=g-import-not-at-top
  peft = pytest.importorskip('peft')
  workdir = tmp_path / 'run'
  run_cli('jtune.train', '--config=configs/bert_cls.py:lora', f'--workdir={workdir}',
          f'--config.cache_dir={cache_dir}', '--config.train.num_steps=3', '--config.data.max_train_examples=64',
          '--config.data.max_eval_examples=32', '--config.data.max_length=32', '--config.data.buckets=(32,)',
          '--config.train.batch_size=16', '--config.train.eval_batch_size=32', '--config.optim.learning_rate=1e-2')
  _, model, _, params = export.restore_run(str(workdir))
  adapter = workdir / 'export_adapter'
  config = json.loads((adapter / 'adapter_config.json').read_text())
  assert config['r'] == 8 and config['peft_type'] == 'LORA' and config['modules_to_save'] == ['classifier']
  tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / 'export')
  enc = tokenizer(['a gorgeous, moving film', 'tedious and flat'], padding='max_length', max_length=32,
                  return_tensors='np')
  batch = {k: enc[k].astype(np.int32) for k in ('input_ids', 'attention_mask', 'token_type_ids')}
  ours = np.asarray(step.predict_step(params, batch, model=model.module))
  torch_batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}
  merged = transformers.AutoModelForSequenceClassification.from_pretrained(workdir / 'export').eval()
  base = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
  with_adapter = peft.PeftModel.from_pretrained(base, adapter).eval()
  with torch.no_grad():
    for hf in (merged, with_adapter):
      assert np.max(np.abs(hf(**torch_batch).logits.numpy() - ours)) <= 1e-4
  lora_b = params['bert']['layer_0']['attention']['query']['lora_b']
  assert float(np.abs(np.asarray(lora_b)).max()) > 0  # the adapters trained
