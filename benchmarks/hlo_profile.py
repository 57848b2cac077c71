"""XLA:CPU profiler events grouped by their HLO instruction: the library half of benchmarks/profile_step.py (no
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
