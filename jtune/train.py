"""Entry point: python -m jtune.train --config=configs/bert_cls.py[:variant] --workdir=DIR [--config.a.b=v].

Multi-host: run the same command on every host. On Cloud TPU VMs, SLURM and Open MPI `jax.distributed` finds
the other processes itself; elsewhere pass --coordinator_address, --num_processes and --process_id.
"""

from __future__ import annotations

import logging as py_logging
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from jtune import aot
from jtune import config as config_lib
from jtune import distributed, errors, host_memory, trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:variant].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, metrics, export.')
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False, 'Compile the train step on the mesh, print the memory it needs per device, exit.')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', distributed.MODES,
    'Start jax.distributed: auto = when the flags below are given or on a TPU VM / SLURM / Open MPI job.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process: 0 .. num_processes - 1.')
_HEARTBEAT = flags.DEFINE_integer(
    'heartbeat_timeout_s', 100, 'Seconds without heartbeats after which a process is dead and the others stop.')
_LOG = py_logging.getLogger('jtune')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  errors.quiet_libraries()
  with errors.one_line():
    cfg = config_lib.from_config_dict(_CONFIG.value)
    host_memory.keep_freed_memory()  # XLA:CPU's step buffers reused, not faulted in anew (before the backend starts)
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           _HEARTBEAT.value)
    distributed.check_same_config(_CONFIG.value.to_dict())
    jax.config.update('jax_compilation_cache_dir', os.path.join(cfg.cache_dir, 'xla'))
    _LOG.info('jax %s: process %d of %d, %d of %d devices', jax.__version__, jax.process_index(),
              jax.process_count(), jax.local_device_count(), jax.device_count())
    if _COMPILE_ONLY.value:
      print(aot.format_report(aot.compile_report(cfg)), flush=True)
      return
    if not _WORKDIR.value:
      raise config_lib.ConfigError('--workdir is required (a folder for checkpoints, metrics and the export)')
    run = trainer.setup(cfg, _WORKDIR.value)
    metrics = trainer.train(run, _CONFIG.value.to_dict())
  if metrics:  # none where a SIGTERM stopped the run before its end
    _LOG.info('Final evaluation: %s', metrics)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=errors.parse_flags)
