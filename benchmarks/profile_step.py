"""Where a train (or eval) step's time goes: XLA's ops, grouped by kind, shape and the JAX operation they came from.

  python -m benchmarks.profile_step --model=bert-base --top=40
  python -m benchmarks.profile_step --model=bert-base --step=eval
  python -m benchmarks.profile_step --model=bert-base --batch=32 --seq=512 --attention_dropout=0 \
    --trace_dir=$OUT/trace   # on a GPU: bf16, the trace kept for TensorBoard

Compiles the train and eval steps of `--model` (benchmarks/workloads.py; `--dtype=auto`: float32 on a CPU, bfloat16
on an accelerator; `--attention_dropout` to time the model without it) with the optimized HLO of the `--step`
profiled (train or eval) dumped beside the trace, runs `--warmup` of those steps, then `--steps` under
`jax.profiler.trace`. Each op event is joined with its HLO instruction (its shape and the `op_name` of the JAX
operation, layers folded into `layer_N`), and the groups are printed by time per step. On a CPU the events are those
of XLA's worker threads (and of the client thread, where XLA runs a small op inline); they overlap where XLA runs
independent ops at once (a layer's query, key and value projections; a backward pass's two gradients), so the
figures are thread time, not shares of the step, and an Eigen `dot` is timed only while it is being dispatched. On
an accelerator they are the device's kernels (hlo_profile.op_events), with XLA's command buffers off (on an H200,
2026-12-04, the whole step was one CUDA-graph event otherwise), so the step profiled may run a little slower than
throughput.py's.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import hlo_profile

_MODEL = flags.DEFINE_string('model', 'minilm', 'Model shape (benchmarks/workloads.py SHAPES).')
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch size.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Sequence length.')
_DTYPE = flags.DEFINE_enum('dtype', 'auto', ['auto', 'float32', 'bfloat16'],
                           'auto: float32 on a CPU, bfloat16 on an accelerator.')
_ATTENTION_DROPOUT = flags.DEFINE_float('attention_dropout', None,
                                        "The model's attention dropout (default: the shape's, as in throughput.py).")
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps first.')
_STEPS = flags.DEFINE_integer('steps', 2, 'Profiled steps.')
_TOP = flags.DEFINE_integer('top', 40, 'Groups printed.')
_STEP = flags.DEFINE_enum('step', 'train', ['train', 'eval'], 'Which step: the train step, or the eval step '
                          '(forward only, dropout off).')
_TRACE_DIR = flags.DEFINE_string('trace_dir', '', 'Where the trace and the HLO dump go (default: a temporary folder).')


def main(argv):
  del argv
  dump = pathlib.Path(_TRACE_DIR.value or tempfile.mkdtemp(prefix='jtune-hlo-'))
  for old in (dump / 'hlo', dump / 'trace'):  # a --trace_dir used before: only this run's files
    shutil.rmtree(old, ignore_errors=True)
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' --xla_dump_to={dump / "hlo"} --xla_dump_hlo_as_text'
                             f' --xla_dump_hlo_module_re=.*{_STEP.value}_step.*'
                             # on a GPU, kernels one by one: a command buffer (a CUDA graph) is one event
                             ' --xla_gpu_enable_command_buffer=').strip()
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS)
  from benchmarks import workloads  # pylint: disable=g-import-not-at-top
  dtype = workloads.resolve_dtype(_DTYPE.value, jax.default_backend())
  timers = workloads.jtune_timers(workloads.jtune_steps(
      workloads.SHAPES[_MODEL.value], _BATCH.value, _SEQ.value, dtype, attention_dropout=_ATTENTION_DROPOUT.value))
  step = timers[_STEP.value == 'eval']
  for _ in range(_WARMUP.value):
    step()
  trace = dump / 'trace'
  with jax.profiler.trace(str(trace)):
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      step()
    step_s = (time.perf_counter() - start) / _STEPS.value
  hlo = sorted((dump / 'hlo').glob(f'*{_STEP.value}_step*after_optimizations.txt'))
  if not hlo:
    sys.exit(f'no optimized HLO of the {_STEP.value} step in {dump / "hlo"}: XLA did not compile it here (a persistent '
             'compilation cache that had it? unset JAX_COMPILATION_CACHE_DIR)')
  for path in (dump / 'hlo').iterdir():  # the other dumps (each kernel's LLVM IR and object code, JAX's modules)
    if path.is_dir():
      shutil.rmtree(path)
    elif path != hlo[-1]:
      path.unlink()
  profile = jax.profiler.ProfileData.from_file(str(sorted(trace.rglob('*.xplane.pb'))[-1]))
  totals = hlo_profile.group_events(hlo_profile.op_events(profile, f'{_STEP.value}_step'),
                                    hlo_profile.hlo_ops(hlo[-1].read_text()))
  if not totals:  # a profiler whose planes hlo_profile.op_events does not know: say what there is
    sys.exit(f'no XLA op events in {trace}; its planes and lines: ' + '; '.join(
        f'{plane.name}: {", ".join(line.name for line in plane.lines)}' for plane in profile.planes))
  per_step = lambda ns: ns / 1e6 / _STEPS.value  # noqa: E731
  print(f'{_MODEL.value} {_BATCH.value} x {_SEQ.value} {dtype} on {jax.default_backend()}: step {step_s:.3f} s '
        f'under the profiler; {per_step(sum(totals.values())) / 1e3:.3f} s of op events per step')
  for (kind, shape, op_name), ns in totals.most_common(_TOP.value):
    print(f'{per_step(ns):8.1f} ms  {kind[:26]:26s} {shape:20s} {op_name}')


if __name__ == '__main__':
  app.run(main)
