"""Surviving kills and preemption in a 2-process run (2 x 4 devices), and resuming its checkpoint on another mesh
and on one device: every resumed run ends like the uninterrupted one."""

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests import cli, resumes


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache_dir):
  """The uninterrupted run: 2 processes x 4 devices."""
  two = tmp_path_factory.mktemp('ref2')
  cli.wait(cli.launch(resumes.args(two, cache_dir), processes=2))
  return two


def test_sigkill_at_a_random_step_then_rerun_is_bit_exact(reference, tmp_path, cache_dir):
  resumes.check_sigkill_then_rerun(2, reference, tmp_path, cache_dir)


def test_sigterm_saves_and_exits_zero(reference, tmp_path, cache_dir):
  resumes.check_sigterm_saves_and_exits_zero(2, reference, tmp_path, cache_dir)


def test_restore_on_another_mesh_and_on_one_device(reference, tmp_path, cache_dir):
  """A checkpoint written by the 2-process run (data=8 over 2 x 4 devices) resumes on fsdp=8 and on 1 device."""
  source = min(int(p.name) for p in (reference / 'checkpoints').iterdir() if p.name.isdigit())
  assert source < 16
  for name, devices, mesh in [('fsdp8', 8, ['--config.mesh.data=1', '--config.mesh.fsdp=8']),
                              ('one', 1, [])]:
    workdir = tmp_path / name
    (workdir / 'checkpoints').mkdir(parents=True)
    shutil.copytree(reference / 'checkpoints' / str(source), workdir / 'checkpoints' / str(source))
    proc = cli.run_cli('jtune.train', *resumes.args(workdir, cache_dir, *mesh), devices=devices)
    assert 'Resuming from' in proc.stderr
    ours = load_file(workdir / 'export' / 'model.safetensors')
    theirs = load_file(reference / 'export' / 'model.safetensors')
    for key in ours:
      np.testing.assert_allclose(ours[key], theirs[key], atol=1e-5, err_msg=key)
