"""Entry point: python -m jtune.export --workdir=RUN_DIR --out=HF_DIR [--step=N].

Writes the run's latest (or chosen) checkpoint as a Hugging Face folder that `transformers` loads.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from absl import app, flags

from jtune import checkpoint as checkpoint_lib
from jtune import config as config_lib
from jtune import errors, fs, modeling, optim, tasks
from jtune import sharding as sharding_lib
from jtune import state as state_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'A jtune run folder (config.json, labels.json, checkpoints/).')
_OUT = flags.DEFINE_string('out', None, 'Where to write the Hugging Face folder.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the latest).')


def restore_run(workdir: str, step: int | None = None
                ) -> tuple[config_lib.Config, modeling.Model, list[str], Any]:
  """Restores a run's checkpoint onto this machine's devices: (config, model, labels, params)."""
  run_dir = fs.path(workdir)
  for name in ('config.json', 'labels.json'):
    if not (run_dir / name).is_file():
      raise FileNotFoundError(f'--workdir={workdir!r}: expected a jtune run folder with {name}')
  saved, labels = (_read_json(run_dir / name, workdir) for name in ('config.json', 'labels.json'))
  try:
    cfg = config_lib.from_saved(saved)
  except (AttributeError, KeyError) as e:  # ml_collections: a field this jtune reads that the run's config lacks
    field = str(e).strip('"\'')
    raise config_lib.ConfigError(
        f'--workdir={workdir!r}: its config.json has no field {field!r}: expected a run saved by a jtune that has '
        f'it (add it to config.json with its default from configs/common.py)') from e
  cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=-1, fsdp=1, tensor=1))
  checkpointer = checkpoint_lib.Checkpointer(run_dir / 'checkpoints', cfg.train.keep_checkpoints, read_only=True)
  if checkpointer.latest_step() is None:
    raise checkpoint_lib.CheckpointError(f'--workdir={workdir!r}: no complete checkpoint in '
                                         f'{checkpointer.directory}')
  if step is not None and step not in checkpointer.all_steps():
    raise checkpoint_lib.CheckpointError(
        f'--step={step}: no checkpoint of that step in {checkpointer.directory}: expected one of '
        f'{", ".join(map(str, sorted(checkpointer.all_steps())))}')
  mesh = sharding_lib.make_mesh(cfg.mesh)
  task = tasks.TASKS[cfg.task.name]
  model = modeling.build(cfg, task.HEAD, task.num_outputs(labels))
  tx = optim.optimizer(cfg.optim, optim.schedule(cfg.optim, 1))  # the structure, not the values
  state, _ = state_lib.init(model.module, tx, mesh, cfg.mesh.rules, cfg.seed, cfg.data.buckets[0], model.inputs)
  state, _ = checkpointer.restore(state, step)
  checkpointer.close()
  return cfg, model, labels, state.params


def _read_json(path: fs.epath.Path, workdir: str) -> Any:
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise config_lib.ConfigError(f'--workdir={workdir!r}: {path.name} is not valid JSON ({e}): expected the '
                                 f'{path.name} that jtune wrote for this run') from e


def export_run(workdir: str, out: str, step: int | None = None) -> fs.epath.Path:
  """Exports a run's checkpoint as a Hugging Face folder; returns `out`."""
  cfg, model, labels, params = restore_run(workdir, step)
  owned = str(fs.path(out)) == str(fs.path(workdir) / 'export')  # the run's own export, as the trainer writes it
  modeling.export(model, params, labels, tasks.TASKS[cfg.task.name].PROBLEM_TYPE, out, owned=owned)
  return fs.path(out)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  errors.quiet_libraries()
  with errors.one_line():
    print(export_run(_WORKDIR.value, _OUT.value, _STEP.value))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main, flags_parser=errors.parse_flags)
