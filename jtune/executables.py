"""Compiled steps kept on disk, so that a second run of the same program skips tracing, lowering and XLA.

JAX's persistent compilation cache keys an executable by the lowered program, so a process that finds it there
still traces and lowers the step first: 1.4 of the 3.3 s that a second BERT-base run spent on its train step on a
2-core Xeon (benchmarks/README.md). This cache keys the serialized executable (jax.experimental.serialize_executable)
by what the program is made from instead, and a process that finds it goes straight to XLA's load:
  - the caller's description of the step (jtune.trainer gives the whole config and the model);
  - the arguments' tree, shapes, dtypes and shardings (with the mesh's device ids);
  - the bytes of jtune's own source files, and the versions of jax, jaxlib, flax, optax, chex and numpy;
  - the devices (platform, kind, ids), XLA_FLAGS, JAX's settings and, on Linux, the CPU's model and features.
What it cannot see is a change to another library that keeps its version (an edited checkout of flax):
`train.cache_executables=False` turns the cache off, and the folder may be deleted at any time. An entry is
written whole (a temporary file, then a rename); one that fails to load is compiled again and rewritten.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import pickle
import tempfile
import threading
import time
import zlib
from typing import Any, Callable

import jax
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

_LOG = logging.getLogger(__name__)
_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'chex', 'numpy')
_FORMAT = 1  # bumped when the file layout changes
_BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'  # jax._src.dispatch.BACKEND_COMPILE_EVENT
_compiled_here = threading.local()  # .names: the functions XLA compiled on this thread


def _note_backend_compile(event: str, duration: float, **kwargs: Any) -> None:
  del duration
  if event == _BACKEND_COMPILE:
    _compiled_here.names = [*getattr(_compiled_here, 'names', []), kwargs.get('fun_name')]


jax.monitoring.register_event_duration_secs_listener(_note_backend_compile)


@functools.cache
def _source_digest() -> str:
  """sha256 over jtune's .py files (paths and bytes), read once per process."""
  root = pathlib.Path(__file__).parent
  digest = hashlib.sha256()
  for path in sorted(root.rglob('*.py')):
    digest.update(str(path.relative_to(root)).encode() + b'\0' + path.read_bytes() + b'\0')
  return digest.hexdigest()


def _cpu() -> str:
  """The CPU's model and feature flags (XLA:CPU compiles for the host's instruction set)."""
  try:
    lines = pathlib.Path('/proc/cpuinfo').read_text().splitlines()
  except OSError:
    return ''
  return '\n'.join(sorted({line for line in lines if line.startswith(('model name', 'flags'))}))


@functools.cache
def _environment() -> str:
  """Everything outside the caller's description that shapes the compiled program, in this process."""
  versions = []
  for name in _PACKAGES:
    try:
      versions.append(f'{name}=={importlib.metadata.version(name)}')
    except importlib.metadata.PackageNotFoundError:
      versions.append(f'{name} absent')
  devices = [(d.id, d.platform, d.device_kind, d.process_index) for d in jax.devices()]
  settings = sorted((k, repr(v)) for k, v in jax.config.values.items())
  return repr((_FORMAT, versions, _source_digest(), devices, jax.devices()[0].client.platform_version,
               os.environ.get('XLA_FLAGS', ''), os.environ.get('LIBTPU_INIT_ARGS', ''), settings, _cpu()))


def signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
  """The arguments' tree and, per leaf, shape, dtype, weak type and sharding (hashable; for the in-memory map)."""
  leaves, tree = jax.tree_util.tree_flatten(args)
  return (tree, *((x.shape, x.dtype, getattr(x, 'weak_type', False), x.sharding) for x in leaves))


def _key(description: str, args: tuple[Any, ...]) -> str:
  leaves = []
  for x in jax.tree_util.tree_leaves(args):
    mesh = getattr(x.sharding, 'mesh', None)
    leaves.append((x.shape, str(x.dtype), getattr(x, 'weak_type', False), repr(x.sharding),
                   None if mesh is None else mesh.device_ids.tolist()))
  text = repr((description, str(jax.tree_util.tree_structure(args)), leaves, _environment()))
  return hashlib.sha256(text.encode()).hexdigest()


def _write(path: pathlib.Path, compiled: Any) -> None:
  """The serialized executable and the ids of the devices it runs on, at `path`, whole or not at all."""
  devices = [d.id for d in compiled._executable._unloaded_executable.device_list]  # pylint: disable=protected-access
  entry = (serialize_executable.serialize(compiled), devices)
  blob = zlib.compress(pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL), 1)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(blob)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _read(path: pathlib.Path) -> Any:
  (executable, in_tree, out_tree), ids = pickle.loads(zlib.decompress(path.read_bytes()))
  by_id = {d.id: d for d in jax.devices()}
  return serialize_executable.deserialize_and_load(executable, in_tree, out_tree,
                                                   execution_devices=[by_id[i] for i in ids])


@contextlib.contextmanager
def _without_jax_cache():
  """JAX's persistent cache off: an XLA:CPU executable that JAX loaded from it serializes without its kernels
  (a later load fails with 'Function ... not found'), so what this cache keeps is compiled afresh."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  compilation_cache.reset_cache()  # JAX decides once whether to use its cache; make it decide again
  try:
    yield
  finally:
    jax.config.update('jax_enable_compilation_cache', enabled)
    compilation_cache.reset_cache()


def load_or_compile(fn: Callable, args: tuple[Any, ...], folder: str | os.PathLike, description: str) -> Any:
  """`fn` (a jax.jit function) compiled for `args`: loaded from `folder` when an entry there has the same key,
  else lowered and compiled (not through JAX's persistent cache, see `_without_jax_cache`) and written there. `description` names what
  `fn` was built from that its arguments do not show (the config, the model); two different programs must
  never share one. Returns a jax.stages.Compiled, called like `fn`."""
  name = getattr(fn, '__name__', 'step')
  path = pathlib.Path(folder) / f'{name}-{_key(description, args)}.exe'
  start = time.perf_counter()
  if path.exists():
    try:
      compiled = _read(path)
      _LOG.info('%s loaded from %s (%.1f s)', name, path, time.perf_counter() - start)
      return compiled
    except Exception as e:  # noqa: BLE001  (any unreadable entry is replaced, never fatal)
      _LOG.warning('%s: %s unreadable (%s: %s); compiling it again', name, path, type(e).__name__, e)
  lowered = fn.lower(*args)
  _compiled_here.names = []
  with _without_jax_cache():
    compiled = lowered.compile()
  if not _compiled_here.names:  # JAX had this executable in memory, maybe from its persistent cache
    _LOG.info('%s: not kept in %s (JAX reused an executable it held, which may not serialize whole)', name, folder)
    return compiled
  try:
    _write(path, compiled)
  except (OSError, ValueError, NotImplementedError, pickle.PicklingError) as e:
    _LOG.warning('%s: not kept in %s (%s: %s)', name, folder, type(e).__name__, e)
  else:
    _LOG.info('%s compiled and kept in %s (%.1f s)', name, path, time.perf_counter() - start)
  return compiled


class CachedStep:
  """`fn` (a jax.jit function) called through `load_or_compile`, once per argument signature (a batch bucket)."""

  def __init__(self, fn: Callable, folder: str | os.PathLike, description: str):
    self.fn, self.folder, self.description = fn, folder, description
    self._compiled: dict[tuple[Any, ...], Any] = {}

  def __call__(self, *args: Any) -> Any:
    sig = signature(args)
    compiled = self._compiled.get(sig)
    if compiled is None:
      compiled = self._compiled[sig] = load_or_compile(self.fn, args, self.folder, self.description)
    return compiled(*args)

  def cache_size(self) -> int:
    """How many signatures this step has been compiled or loaded for (as jax.jit's _cache_size counts)."""
    return len(self._compiled)


def cached(fn: Callable, folder: str | os.PathLike, description: str) -> Callable:
  """`fn` through the cache in `folder`; `fn` itself where JAX runs more than one process (each would keep its
  own executables; multi-host runs rely on JAX's persistent cache)."""
  return CachedStep(fn, folder, description) if jax.process_count() == 1 else fn
