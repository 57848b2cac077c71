"""Keep freed host memory in the process, so that XLA:CPU's steps stop page-faulting their buffers.

XLA's CPU backend allocates an execution's temporary buffer with malloc every time it runs and frees it after (for
BERT-base's train step at 16 x 128, one 2.6 GiB block). glibc serves a block that large with a fresh mmap and
unmaps it on free, so every step touches new pages: about 190,000 minor page faults and 0.3 s of kernel time per
MiniLM-L6 step on this 2-core machine (benchmarks/README.md). Three documented mallopt(3) settings make glibc keep
the memory: one arena (M_ARENA_MAX=1, so blocks asked for by XLA's threads come from the main heap, which grows
without the 64 MiB limit of the others), no mmap for large blocks (M_MMAP_MAX=0) and no trimming of the heap
(M_TRIM_THRESHOLD=-1). After the first steps nothing faults: BERT-base's train step went from 6.2 to 5.0 s.

The costs: the process keeps its peak host memory until it exits (BERT-base: 4.4 instead of 2.1 GiB resident),
and XLA's compiler threads share that one arena, which made BERT-base's first compile 2-2.5 s longer. The settings
only take hold for threads that have not allocated yet, so they go in before JAX starts its backend, and only
where that backend will be the CPU: an accelerator's buffers are not malloc's.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import platform

import jax

_LOG = logging.getLogger('jtune')
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>


def runs_on_cpu() -> bool:
  """Whether JAX's default backend will be the CPU, decided without starting a backend: the platforms JAX was
  told to use (JAX_PLATFORMS or jax_platforms) or, when none were, the absence of GPU and TPU plugins."""
  platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(',')[0] == 'cpu'
  return not (importlib.metadata.entry_points(group='jax_plugins') or importlib.util.find_spec('libtpu'))


def keep_freed_memory() -> bool:
  """Applies the three settings; False (and nothing changed) where the backend will not be the CPU or the C
  library is not glibc. Call it before anything starts JAX's backend."""
  if not runs_on_cpu() or platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  done = all(mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  if not done:
    _LOG.warning('mallopt refused a setting: host memory is returned to the system after every step')
  return done
