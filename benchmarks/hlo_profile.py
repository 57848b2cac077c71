"""XLA profiler events grouped by their HLO instruction: the library half of benchmarks/profile_step.py (no
flags, so tests can import it)."""

from __future__ import annotations

import collections
import re

_INSTRUCTION = re.compile(r'^\s+(?:ROOT )?%([\w.\-]+) = (\w+\[[0-9,]*\])\S* \w+\((.*)$', re.M)
_SKIPPED = ('end:', 'ThreadpoolListener', 'ThunkExecutor', 'SlinkyThreadPool')


def hlo_ops(text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (shape, JAX op_name with layer numbers folded, less `jit(train_step)/`) from optimized
  HLO text."""
  ops = {}
  for name, shape, rest in _INSTRUCTION.findall(text):
    op_name = re.search(r'op_name="([^"]*)"', rest)
    op_name = re.sub(r'layer_\d+', 'layer_N', op_name.group(1) if op_name else '')
    ops[name] = (shape, op_name.removeprefix('jit(train_step)/')[:110])
  return ops


def group_events(events, ops: dict[str, tuple[str, str]]) -> collections.Counter:
  """(kind, shape, op_name) -> total nanoseconds over (name, duration_ns) events of XLA's ops."""
  totals = collections.Counter()
  for name, duration_ns in events:
    if not name.startswith(_SKIPPED):
      totals[(re.sub(r'[.\d]+$', '', name),) + ops.get(name, ('?', '?'))] += duration_ns
  return totals


def op_events(profile) -> list[tuple[str, float]]:
  """(HLO instruction, duration_ns) of the XLA op events in a `jax.profiler.ProfileData`: on a CPU the events that
  carry an `hlo_op` stat (XLA's worker threads, and the client thread where a small op runs inline); on an
  accelerator the kernels of the first device plane (its 'XLA Ops' line where there is one, else its streams),
  named by their `hlo_op` stat where they carry one."""
  devices = [plane for plane in profile.planes if plane.name.startswith('/device:')]
  if not devices:
    return [(stats['hlo_op'], event.duration_ns) for line in profile.find_plane_with_name('/host:CPU').lines
            for event in line.events if 'hlo_op' in (stats := dict(event.stats))]
  lines = list(devices[0].lines)
  lines = ([line for line in lines if line.name == 'XLA Ops']
           or [line for line in lines if line.name.startswith('Stream')])
  return [(dict(event.stats).get('hlo_op', event.name), event.duration_ns) for line in lines for event in line.events]
