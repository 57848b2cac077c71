"""jtune.host_memory: with its malloc settings, a jitted function whose temporary buffer is 64 MiB stops
page-faulting it in once the heap has grown to fit it; with glibc's defaults it faults every page in, every call."""

import pathlib
import platform
import subprocess
import sys
import textwrap

import jax
import pytest

_CALLS = textwrap.dedent('''
    import resource, sys
    import jax, jax.numpy as jnp
    from jtune import host_memory
    if sys.argv[1] == 'keep':
      assert host_memory.keep_freed_memory()
    a, b = jnp.ones((4096, 64)), jnp.ones((64, 4096))
    f = jax.jit(lambda a, b: jnp.sum((a @ b).T @ a))  # the [4096, 4096] product: a 64 MiB temporary buffer
    for _ in range(25):  # the heap grows over the first calls until the freed blocks fit the next call's
      f(a, b).block_until_ready()
    faults = []
    for _ in range(10):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(a, b).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(min(faults))  # the steady state: calls the heap already fits
''')
_PAGES = 64 * 2**20 // 4096  # 4 KiB pages in the buffer


def _fewest_faults_in_a_call(mode: str) -> float:
  out = subprocess.run([sys.executable, '-c', _CALLS, mode], check=True, capture_output=True, text=True,
                       cwd=pathlib.Path(__file__).parent.parent)
  return float(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason="glibc's malloc settings")
def test_kept_memory_is_not_faulted_in_again():
  assert _fewest_faults_in_a_call('keep') < _PAGES / 20
  thp = pathlib.Path('/sys/kernel/mm/transparent_hugepage/enabled')
  if thp.exists() and '[always]' not in thp.read_text():  # 2 MiB pages would hide the 4 KiB faults
    assert _fewest_faults_in_a_call('default') > _PAGES / 2  # the control: glibc maps and unmaps it every call


def test_runs_on_cpu_follows_the_platforms_jax_was_given():
  from jtune import host_memory
  assert host_memory.runs_on_cpu()  # conftest: JAX_PLATFORMS=cpu
  before = jax.config.jax_platforms
  try:
    jax.config.update('jax_platforms', 'cuda,cpu')
    assert not host_memory.runs_on_cpu()
  finally:
    jax.config.update('jax_platforms', before)
