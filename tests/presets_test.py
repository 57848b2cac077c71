"""Every task under every mesh preset on the 8 fake devices: the pairs tests/tasks_e2e_test.py and
tests/causal_lm_test.py do not run end to end train two steps and evaluate here."""

import jax
import optax
import pytest

from tests.tasks_e2e_test import CASES, run_task

RUN_ELSEWHERE = {(task, preset) for task, (_, _, preset, _) in CASES.items()} | {('causal_lm', 'fsdp_tp')}
PAIRS = [(task, preset) for task in [*CASES, 'causal_lm'] for preset in ('dp', 'fsdp', 'fsdp_tp')
         if (task, preset) not in RUN_ELSEWHERE]


@pytest.mark.parametrize('task, preset', PAIRS)
def test_two_steps_and_an_evaluation(task, preset, tmp_path, cache_dir):
  if task == 'causal_lm':
    config_file, files = 'causal_lm', None
  else:
    config_file, make_data, _, _ = CASES[task]
    files = make_data(tmp_path, n_train=64, n_eval=16)
  _, metrics, records = run_task(config_file, f'tiny,{preset}', tmp_path / 'run', cache_dir, files,
                                 train__num_steps=2, train__eval_every_steps=2, train__log_every_steps=1,
                                 train__export=False, data__max_eval_examples=16, optim__warmup_steps=0)
  assert [r['step'] for r in records if 'loss' in r] == [1, 2]
  assert metrics and all(v == v for v in metrics.values())  # evaluated, no NaN


def test_adafactor_on_a_sharded_mesh(tmp_path, cache_dir):
  """Adafactor's moments inherit their parameter's axis names whatever their shape; under fsdp the misfits (the
  factored moments, the [1] placeholders of unfactored ones) stay replicated and the run trains and evaluates."""
  config_file, make_data, _, _ = CASES['regression']
  run, metrics, records = run_task(config_file, 'tiny,adafactor,fsdp', tmp_path / 'run', cache_dir,
                                   make_data(tmp_path, n_train=64, n_eval=16), train__num_steps=2,
                                   train__eval_every_steps=2, train__export=False, optim__warmup_steps=0)
  assert [r['step'] for r in records if 'loss' in r][-1] == 2 and metrics['eval_loss'] == metrics['eval_loss']
  kernel = run.state.params['bert']['embeddings']['word_embeddings']['embedding']
  v_row = optax.tree.get(run.state.opt_state, 'v_row')['bert']['embeddings']['word_embeddings']['embedding']
  assert kernel.sharding.spec != v_row.sharding.spec == jax.sharding.PartitionSpec()
