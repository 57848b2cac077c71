"""Compiled steps on disk: a second load skips tracing and runs the same program (donation included), the key
tells programs apart, and a bad entry or folder costs a compile, never the run."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding, PartitionSpec as P

from jtune import executables


def _step(state, batch):
  new = {'w': state['w'] * 0.5 + batch.sum(), 'count': state['count'] + 1}
  return new, {'loss': (batch * new['w']).sum()}


def _jitted(mesh):
  row = NamedSharding(mesh, P('data'))
  whole = NamedSharding(mesh, P())
  state = {'w': whole, 'count': whole}
  return jax.jit(_step, in_shardings=(state, row), out_shardings=(state, whole), donate_argnums=(0,))


def _args(mesh, rows=4):
  whole = NamedSharding(mesh, P())
  state = {'w': jax.device_put(jnp.arange(3.0), whole), 'count': jax.device_put(jnp.zeros([], jnp.int32), whole)}
  batch = jax.device_put(jnp.ones((rows, 3)), NamedSharding(mesh, P('data')))
  return state, batch


class _Untraceable:
  """Stands for a step that must not be traced: lowering it fails the test."""
  __name__ = '_step'

  def lower(self, *args):
    raise AssertionError('traced and lowered although the executable was on disk')


@pytest.fixture
def mesh():
  jax.clear_caches()  # as in a new process: JAX holds no executable of _step in memory
  return jax.make_mesh((2,), ('data',), devices=jax.devices()[:2])


def test_second_load_skips_tracing_and_runs_the_same_program(tmp_path, mesh, caplog):
  first = executables.load_or_compile(_jitted(mesh), _args(mesh), tmp_path, 'toy')
  caplog.set_level(logging.INFO, logger='jtune')
  loaded = executables.load_or_compile(_Untraceable(), _args(mesh), tmp_path, 'toy')
  expected = _jitted(mesh)(*_args(mesh))
  assert '_step loaded from' in caplog.text
  for compiled in (first, loaded):
    state, batch = _args(mesh)
    out = compiled(state, batch)
    assert state['w'].is_deleted() and not batch.is_deleted()  # the state's buffers are donated, as with jit
    jax.tree_util.tree_map(np.testing.assert_array_equal, out, expected)
  assert [p.suffix for p in tmp_path.iterdir()] == ['.exe']  # one entry, no temporary file left


def test_key_tells_programs_apart(tmp_path, mesh):
  other_mesh = jax.make_mesh((2,), ('data',), devices=jax.devices()[2:4])
  for m, rows, description in ((mesh, 4, 'toy'), (mesh, 4, 'toy, another config'),
                               (mesh, 6, 'toy'),  # another batch shape
                               (other_mesh, 4, 'toy')):  # other devices
    jax.clear_caches()  # each as in its own process
    executables.load_or_compile(_jitted(m), _args(m, rows), tmp_path, description)
  assert len(list(tmp_path.iterdir())) == 4
  with pytest.raises(AssertionError, match='traced'):  # a description never seen: compiled, not loaded
    executables.load_or_compile(_Untraceable(), _args(mesh), tmp_path, 'toy, a third config')


def test_executable_jax_already_held_is_not_kept(tmp_path, mesh, caplog):
  # JAX reuses the executable of its own earlier call, which may come from its persistent cache: XLA:CPU serializes
  # such an executable without its kernels, and loading it back fails when it runs ('Function ... not found').
  expected = _jitted(mesh)(*_args(mesh))
  caplog.set_level(logging.INFO, logger='jtune')
  compiled = executables.load_or_compile(_jitted(mesh), _args(mesh), tmp_path, 'toy')
  assert 'JAX reused an executable it held' in caplog.text and not list(tmp_path.iterdir())
  jax.tree_util.tree_map(np.testing.assert_array_equal, compiled(*_args(mesh)), expected)


def test_step_in_jax_persistent_cache_is_compiled_afresh_and_kept(tmp_path, mesh):
  # An executable that JAX's persistent cache serves serializes without its kernels (loaded back, it fails when it
  # runs: 'Function ... not found'), so jtune compiles its entry afresh, with JAX's cache off
  compilation_cache.set_cache_dir(str(tmp_path / 'jax'))
  compilation_cache.reset_cache()
  try:
    expected = _jitted(mesh)(*_args(mesh))  # compiled, and written to JAX's cache
    assert list((tmp_path / 'jax').iterdir())
    jax.clear_caches()  # as in a second process: JAX's cache has the step, jtune's not
    executables.load_or_compile(_jitted(mesh), _args(mesh), tmp_path / 'exe', 'toy')
    jax.clear_caches()
    loaded = executables.load_or_compile(_Untraceable(), _args(mesh), tmp_path / 'exe', 'toy')
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded(*_args(mesh)), expected)
  finally:
    compilation_cache.set_cache_dir(os.environ['JAX_COMPILATION_CACHE_DIR'])
    compilation_cache.reset_cache()


def test_unreadable_entry_is_compiled_again(tmp_path, mesh, caplog):
  executables.load_or_compile(_jitted(mesh), _args(mesh), tmp_path, 'toy')
  (entry,) = tmp_path.iterdir()
  entry.write_bytes(b'half an executable')
  jax.clear_caches()
  compiled = executables.load_or_compile(_jitted(mesh), _args(mesh), tmp_path, 'toy')
  assert 'unreadable' in caplog.text and str(entry) in caplog.text
  jax.tree_util.tree_map(np.testing.assert_array_equal, compiled(*_args(mesh)), _jitted(mesh)(*_args(mesh)))
  executables.load_or_compile(_Untraceable(), _args(mesh), tmp_path, 'toy')  # rewritten whole


def test_unwritable_folder_still_runs(tmp_path, mesh, caplog):
  blocker = tmp_path / 'file'
  blocker.write_text('not a folder')
  compiled = executables.load_or_compile(_jitted(mesh), _args(mesh), blocker / 'executables', 'toy')
  assert [r.levelname for r in caplog.records if 'not written to' in r.message] == ['WARNING']
  jax.tree_util.tree_map(np.testing.assert_array_equal, compiled(*_args(mesh)), _jitted(mesh)(*_args(mesh)))


def test_cached_step_compiles_once_per_signature(tmp_path, mesh):
  step = executables.CachedStep(_jitted(mesh), tmp_path, 'toy')
  state, _ = _args(mesh)
  for rows in (4, 6, 4, 6):
    state, _ = step(state, _args(mesh, rows)[1])
  assert step.cache_size() == 2 and int(state['count']) == 4 and len(list(tmp_path.iterdir())) == 2


def test_step_that_cannot_be_serialized_still_runs(tmp_path, mesh, caplog):
  def printing(state, batch):
    jax.debug.print('loss {}', batch.sum())  # a host callback: no serialized form
    return _step(state, batch)
  fn = jax.jit(printing, donate_argnums=(0,))
  compiled = executables.load_or_compile(fn, _args(mesh), tmp_path, 'toy')
  assert [r.levelname for r in caplog.records if 'not written to' in r.message] == ['WARNING']
  assert not [p for p in tmp_path.iterdir() if p.suffix == '.exe']
  jax.tree_util.tree_map(np.testing.assert_array_equal, compiled(*_args(mesh)), _jitted(mesh)(*_args(mesh)))


def test_entry_that_loads_but_fails_to_run_is_compiled_again(tmp_path, mesh, caplog):
  fn = jax.jit(lambda x: x * 2)  # nothing donated: the call can be made again
  executables.load_or_compile(fn, (np.zeros(4),), tmp_path, 'toy')
  (good,) = tmp_path.iterdir()
  jax.clear_caches()
  executables.load_or_compile(fn, (np.zeros(6),), tmp_path, 'toy')
  (wrong,) = set(tmp_path.iterdir()) - {good}
  wrong.write_bytes(good.read_bytes())  # an entry that loads, but is another program
  jax.clear_caches()
  step = executables.CachedStep(fn, tmp_path, 'toy')
  np.testing.assert_array_equal(step(np.ones(6)), np.full(6, 2.0))
  assert 'deleted, compiling it again' in caplog.text and step.cache_size() == 1
  jax.clear_caches()
  np.testing.assert_array_equal(executables.CachedStep(fn, tmp_path, 'toy')(np.ones(6)), np.full(6, 2.0))


def test_entry_that_fails_after_donating_its_arguments_stops_with_a_hint(tmp_path, mesh):
  # An entry written from an executable that JAX's persistent cache served (what `_fresh_compile` prevents) loads,
  # then fails when it runs, after the state was donated: the run cannot go on, and the entry is deleted
  compilation_cache.set_cache_dir(str(tmp_path / 'jax'))
  compilation_cache.reset_cache()
  try:
    _jitted(mesh)(*_args(mesh))  # written to JAX's cache
    jax.clear_caches()
    served = _jitted(mesh).lower(*_args(mesh)).compile()  # served by JAX's cache
  finally:
    compilation_cache.set_cache_dir(os.environ['JAX_COMPILATION_CACHE_DIR'])
    compilation_cache.reset_cache()
  path = tmp_path / 'exe' / f'_step-{executables._key("toy", _args(mesh))}.exe'  # pylint: disable=protected-access
  executables._write(path, served)  # pylint: disable=protected-access
  jax.clear_caches()
  state, batch = _args(mesh)
  try:
    executables.CachedStep(_Untraceable(), tmp_path / 'exe', 'toy')(state, batch)
  except RuntimeError as e:
    assert 'entry is deleted: run again' in str(e) and state['w'].is_deleted() and not path.exists()
  else:
    pytest.skip('this jaxlib re-serializes an executable from its persistent cache whole')


def test_key_follows_jax_settings_changed_at_run_time(mesh):
  before = executables._key('toy', _args(mesh))  # pylint: disable=protected-access
  with jax.default_matmul_precision('highest'):  # a thread-local context is in jax.config.values too
    inside = executables._key('toy', _args(mesh))  # pylint: disable=protected-access
  assert before != inside
  assert executables._key('toy', _args(mesh)) == before  # pylint: disable=protected-access


def test_numpy_and_python_arguments(tmp_path, mesh):
  fn = jax.jit(lambda x, scale: x * scale)
  step = executables.CachedStep(fn, tmp_path, 'toy')
  np.testing.assert_array_equal(step(np.arange(3.0), 2.0), [0.0, 2.0, 4.0])
  np.testing.assert_array_equal(step(np.arange(3.0), 3.0), [0.0, 3.0, 6.0])  # the same signature: no new entry
  np.testing.assert_array_equal(step(np.arange(4.0), 2.0), [0.0, 2.0, 4.0, 6.0])
  assert step.cache_size() == 2
