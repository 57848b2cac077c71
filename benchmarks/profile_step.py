"""Where a train step's time goes on the CPU: XLA's ops, grouped by kind, shape and the JAX operation they came from.

  python -m benchmarks.profile_step --model=bert-base --top=40

Compiles the train step of `--model` (benchmarks/workloads.py) with XLA's optimized HLO dumped to a temporary
folder, runs `--warmup` steps, then `--steps` steps under `jax.profiler.trace`. Each op event of XLA's worker threads
is joined with its HLO instruction (its shape and the `op_name` of the JAX operation, layers folded into
`layer_N`), and the groups are printed by time per step. Events overlap where XLA runs independent ops at once (a
layer's query, key and value projections; a backward pass's two gradients), so the figures are thread time, not
shares of the step; an Eigen `dot` is timed only while it is being dispatched.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import hlo_profile

_MODEL = flags.DEFINE_string('model', 'minilm', 'Model shape (benchmarks/workloads.py SHAPES).')
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch size.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Sequence length.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps first.')
_STEPS = flags.DEFINE_integer('steps', 2, 'Profiled steps.')
_TOP = flags.DEFINE_integer('top', 40, 'Groups printed.')


def main(argv):
  del argv
  dump = pathlib.Path(tempfile.mkdtemp(prefix='jtune-hlo-'))
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' --xla_dump_to={dump} --xla_dump_hlo_as_text'
                             ' --xla_dump_hlo_module_re=.*train_step.*').strip()
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS)
  from benchmarks import workloads  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    sys.exit('profile_step reads XLA:CPU worker threads; use the TensorBoard profile on an accelerator')
  train, _ = workloads.jtune_timers(workloads.jtune_steps(workloads.SHAPES[_MODEL.value], _BATCH.value, _SEQ.value))
  for _ in range(_WARMUP.value):
    train()
  trace = dump / 'trace'
  with jax.profiler.trace(str(trace)):
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      train()
    step_s = (time.perf_counter() - start) / _STEPS.value
  hlo = sorted(dump.glob('*train_step*cpu_after_optimizations.txt'))[-1]
  profile = jax.profiler.ProfileData.from_file(str(sorted(trace.rglob('*.xplane.pb'))[-1]))
  events = [(e.name, e.duration_ns) for line in profile.find_plane_with_name('/host:CPU').lines
            if line.name.startswith('tf_XLAEigen') for e in line.events]
  totals = hlo_profile.group_events(events, hlo_profile.hlo_ops(hlo.read_text()))
  per_step = lambda ns: ns / 1e6 / _STEPS.value  # noqa: E731
  print(f'{_MODEL.value} {_BATCH.value} x {_SEQ.value}: step {step_s:.3f} s under the profiler; '
        f'{per_step(sum(totals.values())) / 1e3:.3f} s of op events per step (both threads)')
  for (kind, shape, op_name), ns in totals.most_common(_TOP.value):
    print(f'{per_step(ns):8.1f} ms  {kind[:26]:26s} {shape:20s} {op_name}')


if __name__ == '__main__':
  app.run(main)
