"""Compiled steps kept on disk, so that a second run of the same program skips tracing, lowering and XLA.

JAX's persistent compilation cache keys an executable by the lowered program, so a process that finds it there
still traces and lowers the step first: about 1.0 of the 2.5-2.65 s that a second BERT-base run spends on its
train step through that cache on a 2-core Xeon, against 1.9-2.0 s through this one (benchmarks/README.md). This
cache keys the serialized executable (jax.experimental.serialize_executable) by what the program is made from
instead, and a process that finds it goes straight to XLA's load:
  - the caller's description of the step (jtune.trainer: the model, task, optimizer, mesh and train settings, the
    step count, the class weights and the Flax module, whose fields carry the model's own config);
  - the arguments' tree, shapes, dtypes and shardings (with the mesh's device ids);
  - the bytes of jtune's own source files, and the versions of jax, jaxlib, flax, optax, chex and numpy;
  - the devices (platform, kind, ids), XLA_FLAGS, JAX's settings and, on Linux, the CPU's model and features.
What it cannot see is a change to another library that keeps its version (an edited checkout of flax):
`train.cache_executables=False` turns the cache off, and the folder may be deleted at any time. An entry is
written whole (a temporary file, then a rename); one that fails to load is compiled again and rewritten, and one
that loads but fails on its first run (`CachedStep`) is deleted. An entry is a pickle (JAX's format for a
serialized executable) holding native code: like JAX's persistent cache beside it, the folder must be writable
by trusted users only. It is the one place where jtune unpickles (tests/security_test.py).
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
import threading
import time
import uuid
import zlib
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

_LOG = logging.getLogger(__name__)
_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'chex', 'numpy')
_FORMAT = 1  # bumped when the file layout changes
_BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'  # jax._src.dispatch.BACKEND_COMPILE_EVENT
_compiling = threading.local()  # .fresh: inside `_fresh_compile`, whether XLA compiled on this thread
_JAX_CACHE_LOCK = threading.Lock()  # one `_fresh_compile` at a time turns JAX's persistent cache off and on


def _note_backend_compile(event: str, duration: float, **kwargs: Any) -> None:
  del duration, kwargs
  if event == _BACKEND_COMPILE and getattr(_compiling, 'fresh', None) is not None:
    _compiling.fresh = True


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
def _installation() -> str:
  """What cannot change within a process: versions, jtune's sources, devices, XLA's flags, the CPU."""
  versions = []
  for name in _PACKAGES:
    try:
      versions.append(f'{name}=={importlib.metadata.version(name)}')
    except importlib.metadata.PackageNotFoundError:
      versions.append(f'{name} absent')
  devices = [(d.id, d.platform, d.device_kind, d.process_index) for d in jax.devices()]
  return repr((_FORMAT, versions, _source_digest(), devices, jax.devices()[0].client.platform_version,
               os.environ.get('XLA_FLAGS', ''), os.environ.get('LIBTPU_INIT_ARGS', ''), _cpu()))


def _environment() -> str:
  """Everything outside the caller's description that shapes the compiled program: the installation and JAX's
  settings now (jax.config.update may change them at any time)."""
  return repr((_installation(), sorted((k, repr(v)) for k, v in jax.config.values.items())))


def _leaf(x: Any) -> tuple[Any, ...]:
  """Shape, dtype, weak type and sharding (None for a NumPy array or a Python number) of one argument leaf."""
  dtype = x.dtype if hasattr(x, 'dtype') else np.result_type(x)
  return (np.shape(x), dtype, getattr(x, 'weak_type', False), getattr(x, 'sharding', None))


def signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
  """The arguments' tree and, per leaf, shape, dtype, weak type and sharding (hashable; for the in-memory map)."""
  leaves, tree = jax.tree_util.tree_flatten(args)
  return (tree, *map(_leaf, leaves))


def _key(description: str, args: tuple[Any, ...]) -> str:
  leaves = []
  for x in jax.tree_util.tree_leaves(args):
    shape, dtype, weak, sharding = _leaf(x)
    mesh = getattr(sharding, 'mesh', None)
    leaves.append((shape, str(dtype), weak, repr(sharding), None if mesh is None else mesh.device_ids.tolist()))
  text = repr((description, str(jax.tree_util.tree_structure(args)), leaves, _environment()))
  return hashlib.sha256(text.encode()).hexdigest()


def _write(path: pathlib.Path, compiled: Any) -> None:
  """The serialized executable and the ids of the devices it runs on, at `path`, whole or not at all."""
  devices = [d.id for d in compiled._executable._unloaded_executable.device_list]  # pylint: disable=protected-access
  entry = (serialize_executable.serialize(compiled), devices)
  blob = zlib.compress(pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL), 1)
  path.parent.mkdir(parents=True, exist_ok=True)
  for stale in path.parent.glob('.*.exe.*'):  # left by a process killed while writing, a day or more ago
    with contextlib.suppress(OSError):
      if time.time() - stale.stat().st_mtime > 86400:
        stale.unlink()
  tmp = path.with_name(f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex}')
  try:  # os.open's mode, less the umask, as for every file jtune writes
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), 'wb') as f:
      f.write(blob)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      tmp.unlink()
    raise


def _read(path: pathlib.Path) -> Any:
  (executable, in_tree, out_tree), ids = pickle.loads(zlib.decompress(path.read_bytes()))
  by_id = {d.id: d for d in jax.devices()}
  return serialize_executable.deserialize_and_load(executable, in_tree, out_tree,
                                                   execution_devices=[by_id[i] for i in ids])


def _fresh_compile(lowered: Any) -> tuple[Any, bool]:
  """(lowered.compile(), whether XLA compiled it now). JAX's persistent cache is off meanwhile: an XLA:CPU
  executable that JAX loaded from it serializes without its kernels (a later load fails when it runs, 'Function
  ... not found'). False where JAX reused an executable it held in memory, which may have come from there."""
  with _JAX_CACHE_LOCK:
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update('jax_enable_compilation_cache', False)
    compilation_cache.reset_cache()  # JAX decides once whether to use its cache; make it decide again
    _compiling.fresh = False
    try:
      compiled = lowered.compile()
      return compiled, _compiling.fresh
    finally:
      _compiling.fresh = None
      jax.config.update('jax_enable_compilation_cache', enabled)
      compilation_cache.reset_cache()


def load_or_compile(fn: Callable, args: tuple[Any, ...], folder: str | os.PathLike, description: str) -> Any:
  """`fn` (a jax.jit function) compiled for `args`: loaded from `folder` when an entry there has the same key,
  else lowered and compiled afresh (`_fresh_compile`) and written there. `description` names what `fn` was built
  from that its arguments do not show (the config, the model); two different programs must never share one.
  Returns a jax.stages.Compiled, called like `fn`."""
  return _load_or_compile(fn, args, folder, description)[0]


def _load_or_compile(fn: Callable, args: tuple[Any, ...], folder: str | os.PathLike, description: str
                     ) -> tuple[Any, pathlib.Path | None]:
  """(compiled, the entry's path where it was loaded from one, else None)."""
  name = getattr(fn, '__name__', 'step')
  path = pathlib.Path(folder) / f'{name}-{_key(description, args)}.exe'
  start = time.perf_counter()
  if path.exists():
    try:
      compiled = _read(path)
      _LOG.info('%s loaded from %s (%.1f s)', name, path, time.perf_counter() - start)
      return compiled, path
    except Exception as e:  # noqa: BLE001  (any unreadable entry is replaced, never fatal)
      _LOG.warning('%s: %s unreadable (%s: %s); compiling it again', name, path, type(e).__name__, e)
  compiled, fresh = _fresh_compile(fn.lower(*args))
  if not fresh:
    _LOG.info('%s: JAX reused an executable it held, which may not serialize whole; not written to %s', name,
              folder)
    return compiled, None
  try:
    _write(path, compiled)
  except Exception as e:  # noqa: BLE001  (a step that cannot be kept still runs: host callbacks, a full disk)
    _LOG.warning('%s: not written to %s (%s: %s)', name, folder, type(e).__name__, e)
  else:
    _LOG.info('%s compiled and written to %s (%.1f s)', name, path, time.perf_counter() - start)
  return compiled, None


class CachedStep:
  """`fn` (a jax.jit function) called through `load_or_compile`, once per argument signature (a batch bucket)."""

  def __init__(self, fn: Callable, folder: str | os.PathLike, description: str):
    self.fn, self.folder, self.description = fn, folder, description
    self._compiled: dict[tuple[Any, ...], Any] = {}

  def __call__(self, *args: Any) -> Any:
    sig = signature(args)
    compiled = self._compiled.get(sig)
    if compiled is not None:
      return compiled(*args)
    compiled, path = _load_or_compile(self.fn, args, self.folder, self.description)
    if path is None:
      self._compiled[sig] = compiled
      return compiled(*args)
    try:  # the first run of a loaded entry is waited for: an entry that loads but cannot run is removed
      out = jax.block_until_ready(compiled(*args))
    except Exception as e:
      with contextlib.suppress(OSError):
        path.unlink()
      if any(x.is_deleted() for x in jax.tree_util.tree_leaves(args) if isinstance(x, jax.Array)):
        raise RuntimeError(f'the compiled step loaded from {path} failed ({type(e).__name__}: {e}); the entry is '
                           'deleted: run again, or set train.cache_executables=False') from e
      _LOG.warning('the step loaded from %s failed (%s: %s); deleted, compiling it again', path,
                   type(e).__name__, e)  # its arguments were not donated: the run goes on
      compiled = _load_or_compile(self.fn, args, self.folder, self.description)[0]
      out = compiled(*args)
    self._compiled[sig] = compiled
    return out

  def cache_size(self) -> int:
    """How many signatures this step has been compiled or loaded for (as jax.jit's _cache_size counts)."""
    return len(self._compiled)


def cached(fn: Callable, folder: str | os.PathLike, description: str) -> Callable:
  """`fn` through the cache in `folder`; `fn` itself where JAX runs more than one process (each would keep its
  own executables; multi-host runs rely on JAX's persistent cache)."""
  return CachedStep(fn, folder, description) if jax.process_count() == 1 else fn
