"""Mesh construction from the config and batch-size checks."""

import jax
import numpy as np
import pytest

from jtune import config as config_lib
from jtune import sharding


def _mesh_cfg(data=-1, fsdp=1, tensor=1):
  return config_lib.MeshConfig(data=data, fsdp=fsdp, tensor=tensor, rules=())


@pytest.mark.parametrize('sizes,expected', [
    ((-1, 1, 1), (8, 1, 1)), ((1, -1, 1), (1, 8, 1)), ((2, 2, -1), (2, 2, 2)), ((1, 2, 4), (1, 2, 4))])
def test_minus_one_fills_the_devices(sizes, expected):
  assert sharding.mesh_shape(_mesh_cfg(*sizes), 8) == expected


@pytest.mark.parametrize('sizes,needle', [
    ((-1, -1, 1), 'at most one axis'), ((3, -1, 1), 'must divide'), ((2, 2, 1), 'multiply to the 8')])
def test_bad_mesh_is_a_config_error(sizes, needle):
  with pytest.raises(config_lib.ConfigError, match=needle):
    sharding.mesh_shape(_mesh_cfg(*sizes), 8)


def test_make_mesh_uses_all_devices():
  mesh = sharding.make_mesh(_mesh_cfg(2, -1, 2))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert sharding.data_parallel_size(mesh) == 4
  assert mesh.devices.size == jax.device_count() == 8


def test_batch_size_must_divide_the_data_parallel_size():
  mesh = sharding.make_mesh(_mesh_cfg(-1, 1, 1))
  sharding.check_batch_size(16, mesh, 'train.batch_size')
  with pytest.raises(config_lib.ConfigError,
                     match=r'config.train.batch_size=12: expected a multiple of the data-parallel size 8'):
    sharding.check_batch_size(12, mesh, 'train.batch_size')


def test_global_batch_is_split_over_the_data_axes():
  mesh = sharding.make_mesh(_mesh_cfg(2, 4, 1))
  batch = sharding.global_batch({'x': np.arange(16 * 3).reshape(16, 3)}, mesh)
  assert batch['x'].shape == (16, 3)
  assert {s.data.shape for s in batch['x'].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(batch['x']), np.arange(48).reshape(16, 3))
