"""When jtune starts jax.distributed, and the one-line errors for half-given coordinates."""

import pytest

from jtune import config as config_lib
from jtune import distributed


@pytest.mark.parametrize('env,expected', [
    ({}, False),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16'}, True),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}, False),  # a one-task job is one process
    ({'OMPI_COMM_WORLD_SIZE': '4'}, True),
])
def test_cluster_detection(env, expected, monkeypatch):
  monkeypatch.setattr(distributed.importlib.util, 'find_spec', lambda name: None)  # no libtpu here
  assert distributed.cluster_detected(env) is expected


def test_libtpu_means_a_tpu_vm(monkeypatch):
  monkeypatch.setattr(distributed.importlib.util, 'find_spec', lambda name: object() if name == 'libtpu' else None)
  assert distributed.cluster_detected({})


def test_single_process_by_default():
  assert distributed.initialize('auto') is False  # no flags, no cluster: plain single-process jax
  assert distributed.initialize('off', '127.0.0.1:1', 2, 0) is False


@pytest.mark.parametrize('args,needle', [
    (('auto', '127.0.0.1:1234', None, 0), 'expected all three or none'),
    (('auto', None, 2, None), 'expected all three or none'),
    (('auto', '127.0.0.1:1234', 2, 2), '--process_id=2: expected 0 <= process_id < --num_processes=2'),
    (('sometimes',), "--distributed='sometimes': expected one of auto, on, off"),
])
def test_bad_coordinates(args, needle):
  with pytest.raises(config_lib.ConfigError, match=needle.replace('(', r'\(').replace(')', r'\)')):
    distributed.initialize(*args)
