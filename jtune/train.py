"""Entry point: python -m jtune.train --config=configs/bert_cls.py[:variant] --workdir=DIR [--config.a.b=v]."""

from __future__ import annotations

import logging as py_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jtune import config as config_lib
from jtune import errors, trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:variant].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, metrics, export.')
_LOG = py_logging.getLogger('jtune')


def quiet_libraries() -> None:
  """jtune's own messages at INFO on stderr; Orbax and JAX chatter only with an explicit --verbosity."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  handler = py_logging.StreamHandler(sys.stderr)
  handler.setFormatter(py_logging.Formatter('%(asctime)s jtune: %(message)s', '%H:%M:%S'))
  log = py_logging.getLogger('jtune')
  log.setLevel(py_logging.INFO)
  log.addHandler(handler)
  log.propagate = False


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  quiet_libraries()
  with errors.one_line():
    cfg = config_lib.from_config_dict(_CONFIG.value)
    jax.config.update('jax_compilation_cache_dir', os.path.join(cfg.cache_dir, 'xla'))
    _LOG.info('jax %s: %d processes, %d devices', jax.__version__, jax.process_count(),
              jax.device_count())
    run = trainer.setup(cfg, _WORKDIR.value)
    metrics = trainer.train(run, _CONFIG.value.to_dict())
  _LOG.info('Final evaluation: %s', metrics)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=errors.parse_flags)
