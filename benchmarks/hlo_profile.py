"""XLA profiler events grouped by their HLO instruction: the library half of benchmarks/profile_step.py (no
flags, so tests can import it)."""

from __future__ import annotations

import collections
import re

# name, shape (an array's, or a tuple's such as a GPU matmul's `(bf16[...]{1,0}, s8[...]{0})`), then the rest
_INSTRUCTION = re.compile(r'^\s+(?:ROOT )?%([\w.\-]+) = (\([^)]*\)|\w+\[[0-9,]*\])\S* [\w\-]+\((.*)$', re.M)
_DEVICE_PLANE = re.compile(r'/device:(GPU|TPU):\d+$')
_SKIPPED = ('end:', 'ThreadpoolListener', 'ThunkExecutor', 'SlinkyThreadPool')


def hlo_ops(text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (shape, JAX op_name with layer numbers folded, less `jit(train_step)/`) from optimized
  HLO text."""
  ops = {}
  for name, shape, rest in _INSTRUCTION.findall(text):
    op_name = re.search(r'op_name="([^"]*)"', rest)
    op_name = re.sub(r'layer_\d+', 'layer_N', op_name.group(1) if op_name else '')
    ops[name] = (re.sub(r'\{[^}]*\}', '', shape), op_name.removeprefix('jit(train_step)/')[:110])
  return ops


def group_events(events, ops: dict[str, tuple[str, str]]) -> collections.Counter:
  """(kind, shape, op_name) -> total nanoseconds over (name, duration_ns) events of XLA's ops."""
  totals = collections.Counter()
  for name, duration_ns in events:
    if not name.startswith(_SKIPPED):
      totals[(re.sub(r'[.\d]+$', '', name),) + ops.get(name, ('?', '?'))] += duration_ns
  return totals


def op_events(profile, module: str = '') -> list[tuple[str, float]]:
  """(HLO instruction, duration_ns) of the XLA op events in a `jax.profiler.ProfileData`, of programs whose name
  contains `module` where an event says (its `hlo_module` stat): on a CPU the events that carry an `hlo_op` stat
  (XLA's worker threads, and the client thread where a small op runs inline; `end:` markers carry none); on an
  accelerator the kernels of the first GPU or TPU plane (its 'XLA Ops' line where there is one, else its streams),
  named by their `hlo_op` stat where they carry one. A control-flow op (a `while`, a `call`, a `conditional`) is
  timed with the ops inside it, which have events of their own."""
  devices = [plane for plane in profile.planes if _DEVICE_PLANE.match(plane.name)]
  if devices:
    lines = list(devices[0].lines)
    lines = ([line for line in lines if line.name == 'XLA Ops']
             or [line for line in lines if line.name.startswith('Stream')])
  else:
    lines = list(profile.find_plane_with_name('/host:CPU').lines)
  events = []
  for line in lines:
    for event in line.events:
      stats = dict(event.stats)
      if (devices or 'hlo_op' in stats) and module in str(stats.get('hlo_module', module)):
        events.append((stats.get('hlo_op', event.name), event.duration_ns))
  return events
