"""The device mesh and the logical-axis rules that place parameters and batches on it."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jtune import config as config_lib

AXES = config_lib.MESH_AXES
BATCH_AXES = ('data', 'fsdp')  # the mesh axes a batch is split over
# The logical axes every model's activations name (nn.with_logical_constraint), besides its parameters' axes
# (a head's `classes` or `vocab` logits name its kernel's axis); tests/sharding_test.py checks the models agree.
ACTIVATION_AXES = ('batch', 'lookup_batch', 'length', 'act_embed', 'act_heads', 'kv', 'act_mlp')


def mesh_shape(cfg: config_lib.MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Resolves a single -1 entry so that the product equals `num_devices`."""
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise config_lib.ConfigError(
        f'config.mesh={dict(zip(AXES, sizes))}: expected at most one axis of size -1')
  known = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % known:
      raise config_lib.ConfigError(
          f'config.mesh={dict(zip(AXES, sizes))}: the fixed axes ({known}) must divide the '
          f'{num_devices} devices')
    sizes[free[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise config_lib.ConfigError(
        f'config.mesh={dict(zip(AXES, sizes))}: expected the axis sizes to multiply to the '
        f'{num_devices} devices')
  return tuple(sizes)


def make_mesh(cfg: config_lib.MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  if len(devices) == jax.device_count():
    grid = mesh_utils.create_device_mesh(shape, devices)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def unbox_misfits(tree: Any) -> Any:
  """`tree` with every box whose axis names do not describe its array replaced by the bare array (replicated).

  Optimizer statistics inherit their parameter's box whatever their shape: Adafactor's factored row and column
  moments (of lower rank) and the [1] placeholders of the parameters it does not factor. They are small;
  their parameter's names would make Flax's unboxing and the shardings fail.
  """
  def one(x):
    if _is_box(x) and jax.tree_util.tree_leaves(x.value) and (
        np.ndim(x.value) != len(x.names) or np.size(x.value) == 1):
      return x.value
    return x
  return jax.tree_util.tree_map(one, tree, is_leaf=_is_box)


def unruled_axes(boxed_tree: Any, rules) -> list[str]:
  """The logical axes that the parameters of `boxed_tree` or the activations name and `rules` leaves out.

  Flax replicates such an axis without a word; a table of the user's own usually means to place it.
  """
  named = set(ACTIVATION_AXES)
  for box in jax.tree_util.tree_leaves(boxed_tree, is_leaf=_is_box):
    if _is_box(box):
      named.update(name for name in box.names if name is not None)
  return sorted(named - {name for name, _ in rules})


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree whose leaves carry Flax logical-partitioning metadata (others: replicated).

  A box around no array (optax's MaskedNode: the optimizer state a frozen parameter does not have) stays empty.
  """
  def one(x):
    if _is_box(x):
      if not jax.tree_util.tree_leaves(x.value):
        return x.value
      return NamedSharding(mesh, nn.logical_to_mesh_axes(x.names, rules))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map(one, boxed_tree, is_leaf=_is_box)


def _axis_size(mesh: Mesh, axes: str | tuple[str, ...]) -> tuple[tuple[str, ...], int]:
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return axes, math.prod(mesh.shape[a] for a in axes)


def check_divisible(boxed_tree: Any, mesh: Mesh, rules) -> None:
  """Raises ConfigError, before anything compiles, for an axis whose size its mesh axes do not divide.

  E.g. 12 attention heads over tensor=8: XLA would fail later with a message about shapes, not the config.
  """
  for path, box in jax.tree_util.tree_leaves_with_path(boxed_tree, is_leaf=_is_box):
    if not _is_box(box) or not jax.tree_util.tree_leaves(box.value):
      continue
    for dim, name, mesh_axes in zip(box.value.shape, box.names, nn.logical_to_mesh_axes(box.names, rules)):
      if mesh_axes is None:
        continue
      axes, size = _axis_size(mesh, mesh_axes)
      if dim % size:
        field = f'config.mesh.{axes[0]}={size}' if len(axes) == 1 else f'config.mesh {" x ".join(axes)}={size}'
        raise config_lib.ConfigError(
            f'{field}: {jax.tree_util.keystr(path, simple=True, separator="/")} has {dim} entries on its '
            f'{name!r} axis, which do not split evenly over mesh axis {" x ".join(axes)} of size {size}; '
            f'expected a mesh axis size that divides {dim}')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the data axes; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh: Mesh, rules) -> Iterator[None]:
  """The context under which steps are traced: the mesh and the logical rules for activations."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
  """Raises ConfigError unless the global batch divides over the data axes."""
  dp = data_parallel_size(mesh)
  if batch_size % dp:
    raise config_lib.ConfigError(
        f'config.{field}={batch_size}: expected a multiple of the data-parallel size {dp} '
        f'(mesh data x fsdp = {mesh.shape["data"]} x {mesh.shape["fsdp"]})')


def process_rows(mesh: Mesh, global_batch_size: int) -> slice:
  """The rows of each global batch that this process's devices hold: all that it loads and feeds."""
  indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  ranges = sorted({index[0].indices(global_batch_size)[:2] for index in indices.values()})
  start, stop = ranges[0][0], ranges[-1][1]
  if sum(b - a for a, b in ranges) != stop - start:
    raise ValueError(f'the mesh gives process {jax.process_index()} the batch rows {ranges}: expected one '
                     'contiguous range; order the devices so that each process holds a block of the data axes')
  return slice(start, stop)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's share of a batch into global arrays sharded over the data axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
