"""Multi-host start-up: JAX's own multi-controller runtime (`jax.distributed`), no launcher of our own.

One Python process per host (per GPU under SLURM); each sees its local devices and all of them form one mesh.
Coordinates come from explicit flags, or from the environment on Cloud TPU VMs, SLURM and Open MPI.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from jtune import config as config_lib

MODES = ('auto', 'on', 'off')


def cluster_detected(environ: dict[str, str] | None = None) -> bool:
  """True inside a multi-process SLURM or Open MPI job, or on a Cloud TPU VM (libtpu installed)."""
  env = os.environ if environ is None else environ
  if 'SLURM_JOB_ID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
    return True
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return True
  # On a TPU VM, jax finds the pod's workers from the metadata server (a single host is a pod of one).
  return importlib.util.find_spec('libtpu') is not None


def initialize(mode: str = 'auto', coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_s: int = 100) -> bool:
  """Starts `jax.distributed` when asked to, or when `mode='auto'` finds a cluster; returns whether it did.

  Must run before anything touches a JAX device. If a process dies, the coordination service stops hearing its
  heartbeats and, after `heartbeat_timeout_s`, terminates every other process with a message naming the
  unhealthy task ("Terminating process because the JAX distributed service detected fatal errors"): a run never
  hangs forever on a lost worker.
  """
  if mode not in MODES:
    raise config_lib.ConfigError(f'--distributed={mode!r}: expected one of {", ".join(MODES)}')
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise config_lib.ConfigError(
        f'--coordinator_address={coordinator_address!r} --num_processes={num_processes} '
        f'--process_id={process_id}: expected all three or none')
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise config_lib.ConfigError(f'--process_id={process_id}: expected 0 <= process_id < --num_processes='
                                 f'{num_processes}')
  if heartbeat_timeout_s <= 0:
    raise config_lib.ConfigError(f'--heartbeat_timeout_s={heartbeat_timeout_s}: expected a positive number')
  if mode == 'off' or (mode == 'auto' and coordinator_address is None and not cluster_detected()):
    return False
  # CPU processes exchange collectives through gloo; GPUs and TPUs ignore this setting.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
  return True


def check_same_config(resolved: dict) -> None:
  """Raises ConfigError on every process when the processes were started with configs that differ (cache_dir,
  a host's own folder, aside). Else the run's first collective of another shape aborts in gloo or hangs."""
  if jax.process_count() == 1:
    return
  text = json.dumps({k: v for k, v in resolved.items() if k != 'cache_dir'}, sort_keys=True, default=str)
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
  digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
  differ = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
  if differ:
    raise config_lib.ConfigError(
        f'--config: process{"es" if len(differ) > 1 else ""} {", ".join(map(str, differ))} of '
        f'{jax.process_count()} started with a config that differs from process 0\'s: expected the same --config '
        'file and overrides on every process')
