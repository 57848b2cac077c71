"""A/B of XLA flags on jtune's train step: the variants' steps alternate, so the machine's drift hits them alike.

  python -m benchmarks.xla_flags_ab --model=minilm -- '' '--xla_backend_optimization_level=2'
  python -m benchmarks.xla_flags_ab --model=bert-base --rounds=2 --steps=2 -- '' '--xla_cpu_use_onednn=true'
  python -m benchmarks.xla_flags_ab --mesh=1,-1,1 -- '' '--xla_force_host_platform_device_count=2'  # FSDP, 2 devices

Each variant (an XLA_FLAGS string, '' for XLA's defaults, in which NAME=VALUE words set environment variables
instead, e.g. glibc's MALLOC_ARENA_MAX=1) gets its own process, which compiles the train step of
`--model` (benchmarks/workloads.py, random weights, one device) and waits. Then, for `--rounds` rounds, each
process in turn times `--steps` steps (every step waited for) while the others sit idle. Runs minutes apart on a
shared machine drift by more than most flags change; alternating in one run is what makes two figures comparable.
Each process also carries an offset of its own, and those started later tended to run faster, so `--copies=2`
starts every variant twice in mirrored order (A B B A). Prints each process's compile time and median step time
(with the minimum), then each variant's median over all its steps and the range of its processes' medians.
The processes live side by side, each holding its peak memory (jtune.host_memory keeps what it frees: BERT-base
about 4.5 GiB): before starting each, the script checks that the machine has room for all those still to start,
each as large as the largest so far, and stops them with a one-line error otherwise (fewer `--copies` or variants,
or `--nokeep_host_memory`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

from benchmarks import workloads

_MODEL = flags.DEFINE_enum('model', 'minilm', list(workloads.SHAPES), 'Model shape.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Global batch size.')
_SEQ = flags.DEFINE_integer('seq_len', 128, 'Sequence length.')
_ROUNDS = flags.DEFINE_integer('rounds', 4, 'Rounds; each variant times --steps steps per round.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per variant per round.')
_KEEP = flags.DEFINE_bool('keep_host_memory', True, "jtune.host_memory's malloc settings in every variant "
                          '(--nokeep_host_memory: glibc defaults, to A/B them as MALLOC_* variables).')
_MESH = flags.DEFINE_list('mesh', ['-1', '1', '1'], 'data,fsdp,tensor mesh sizes of every variant (-1: the rest '
                           'of the devices); with 1,-1,1 and --xla_force_host_platform_device_count=2 in one '
                           "variant, the step is FSDP over two host devices.")
_COPIES = flags.DEFINE_integer('copies', 1, 'Processes per variant, started in mirrored order (A B B A ...).')
_CHILD = flags.DEFINE_bool('child', False, 'Internal: compile, then time steps on request from stdin.')


def _child() -> None:
  steps = workloads.jtune_steps(workloads.SHAPES[_MODEL.value], _BATCH.value, _SEQ.value,
                                keep_host_memory=_KEEP.value, mesh_sizes=tuple(int(n) for n in _MESH.value))
  train, _ = workloads.jtune_timers(steps)
  train()
  print(json.dumps({'compile_s': steps.compile_s, 'peak_bytes': workloads.peak_rss_bytes()}), flush=True)
  for line in sys.stdin:
    print(json.dumps(workloads.step_times(train, int(line))), flush=True)


def main(argv: list[str]) -> None:
  if _CHILD.value:
    return _child()
  variants = workloads.mirrored(argv[1:] or [''], _COPIES.value)
  procs, compile_s, peaks = [], [], []
  try:
    for variant in variants:
      workloads.room_for_the_rest(peaks, workloads.available_bytes(), len(procs), len(variants))
      words = variant.split()
      settings = dict(w.split('=', 1) for w in words if not w.startswith('-'))  # NAME=VALUE: an environment variable
      flags_ = ' '.join(w for w in words if w.startswith('-'))
      env = {**os.environ, **settings, 'XLA_FLAGS': f'--xla_force_host_platform_device_count=1 {flags_}'.strip()}
      proc = subprocess.Popen(
          [sys.executable, '-m', 'benchmarks.xla_flags_ab', '--child', f'--model={_MODEL.value}',
           f'--batch={_BATCH.value}', f'--seq_len={_SEQ.value}', f'--keep_host_memory={_KEEP.value}',
           f'--mesh={",".join(_MESH.value)}'],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
      procs.append(proc)
      line = proc.stdout.readline()
      if not line:
        raise SystemExit(f'variant {variant!r} failed to compile (see its error above)')
      reply = json.loads(line)
      compile_s.append(reply['compile_s'])
      peaks.append(reply['peak_bytes'])
  except BaseException:  # the processes started so far hold their memory: stop them with this one
    for proc in procs:
      proc.kill()
    raise
  times = [[] for _ in variants]
  for _ in range(_ROUNDS.value):
    for proc, out in zip(procs, times):
      time.sleep(0.5)  # the last variant's worker threads go idle first
      proc.stdin.write(f'{_STEPS.value}\n')
      proc.stdin.flush()
      out += json.loads(proc.stdout.readline())
  for proc in procs:
    proc.stdin.close()
    proc.wait()
  print(f'{_MODEL.value}, {_BATCH.value} x {_SEQ.value}, {_ROUNDS.value} rounds x {_STEPS.value} steps')
  for variant, c, t in zip(variants, compile_s, times):
    print(f'compile {c:6.2f} s  step {statistics.median(t):.3f} s (min {min(t):.3f})  {variant or "(defaults)"}')
  if _COPIES.value > 1:
    for variant in dict.fromkeys(variants):
      mine = [(c, t) for v, c, t in zip(variants, compile_s, times) if v == variant]
      medians = [statistics.median(t) for _, t in mine]
      print(f'{variant or "(defaults)"}: step {statistics.median([x for _, t in mine for x in t]):.3f} s '
            f'(processes {min(medians):.3f}-{max(medians):.3f}), compile {statistics.median(c for c, _ in mine):.2f} s')


if __name__ == '__main__':
  app.run(main)
