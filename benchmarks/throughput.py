"""Throughput of jtune's train and eval steps beside Hugging Face PyTorch, MFU, compile time, memory, scaling.

  python -m benchmarks.throughput                                   # MiniLM-L6 and BERT-base, batch 16 x 128
  python -m benchmarks.throughput --models=minilm,bert-base,gpt2,llama-135m --seq_lens=128,512 --batch_sizes=8,16
  python -m benchmarks.throughput --models=minilm --frameworks=jtune --scaling_devices=1,2,4,8 --out=/tmp/scale

For every model x sequence length x batch size and framework, a fresh process builds the step, waits out
`--warmup` steps, then times `--repeats` runs of `--steps` steps each (every step waited for), and reports the
median step time with its spread (min, 10th and 90th percentile, max over all timed steps), samples/s, tokens/s,
model FLOPs per step (benchmarks/workloads.py says how they are counted) and MFU: achieved FLOP/s over the peak
this script measures on the same machine with a large matmul in the same dtype (JAX's and torch's matmul; MFU is
against JAX's). jtune rows also give the first compile (lowering + compiling the train step, with empty caches,
through jtune.executables as `jtune.train` compiles it), the same in a second process that finds the compiled step
kept (a load: no tracing, lowering or compiling), and memory: the device's peak (jtune: the first device's, its
share of a batch split over all devices), or the process's peak RSS where the framework ran on the host (marked
"RSS" in the table on an accelerator machine), and beside it for jtune XLA's per-device analysis of the train
step (arguments, temporaries and outputs not aliased to donated arguments). float32 on a CPU, bfloat16 on an
accelerator (`--dtype` to choose).

With `--scaling_devices`, jtune's train step is also timed for every mesh preset of configs/common.py at each
(fake, on a CPU) device count, and at each sequence length on one device: how step time and per-device memory
grow. Results go to OUT.json, OUT.md and OUT.png.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
from typing import Callable

from absl import app, flags

from benchmarks import workloads
from jtune import config as config_lib

_MODELS = flags.DEFINE_list('models', ['minilm', 'bert-base'], f'From {", ".join(workloads.SHAPES)}.')
_SEQ_LENS = flags.DEFINE_list('seq_lens', ['128'], 'Sequence lengths.')
_BATCHES = flags.DEFINE_list('batch_sizes', ['16'], 'Global batch sizes.')
_FRAMEWORKS = flags.DEFINE_list('frameworks', ['jtune', 'torch'], 'jtune and/or torch.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per repeat.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Timed repeats.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps first.')
_DTYPE = flags.DEFINE_enum('dtype', 'auto', ['auto', 'float32', 'bfloat16'],
                           'auto: float32 on a CPU, bfloat16 on an accelerator.')
_MATMUL = flags.DEFINE_integer('matmul_size', 0, 'Side of the peak matmul (0: 2048 on a CPU, 8192 elsewhere).')
_SCAN = flags.DEFINE_bool('scan_layers', False, "jtune with model.scan_layers: one layer's program, in a loop.")
_RNG = flags.DEFINE_enum('dropout_rng', 'auto', list(config_lib.DROPOUT_RNGS),
                         "jtune's train.dropout_rng (auto: unsafe_rbg on a CPU, threefry2x32 elsewhere).")
_REMAT = flags.DEFINE_enum('remat', 'none', ['none', 'full'],
                           "'full': both recompute each layer in the backward pass (jtune's model.remat=full, "
                           "transformers' gradient_checkpointing_enable()): the memory against the time.")
_SCALING = flags.DEFINE_list('scaling_devices', [], 'Device counts for the scaling curve (empty: none).')
_OUT = flags.DEFINE_string('out', 'benchmarks/results/throughput', 'Output path without extension.')
_CHILD = flags.DEFINE_string('child', '', 'Internal: peak | run | compile, in this process.')
_MESH = flags.DEFINE_list('mesh', ['-1', '1', '1'], 'Internal: (data, fsdp, tensor) of a jtune child.')


def _percentile(xs: list[float], q: float) -> float:
  xs = sorted(xs)
  return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _time(step, warmup: int, repeats: int, steps: int) -> dict:
  for _ in range(warmup):
    step()
  times = workloads.step_times(step, repeats * steps)
  return {'median_s': statistics.median(times), 'min_s': min(times), 'p10_s': _percentile(times, 0.1),
          'p90_s': _percentile(times, 0.9), 'max_s': max(times), 'n': len(times)}


def _child_peak(dtype: str, size: int) -> dict:
  """JAX's matmul peak and the device; with --frameworks=torch alone, torch's peak (dtype and size resolved),
  in a process of its own: JAX's idle thread pools would slow torch's product as they slow its steps."""
  if _FRAMEWORKS.value == ['torch']:
    return {'torch_peak_flops': workloads.torch_matmul_peak(dtype, size)}
  import jax  # pylint: disable=g-import-not-at-top
  row = {'platform': jax.devices()[0].platform, 'device_kind': jax.devices()[0].device_kind,
         'devices': jax.device_count(), 'jax_version': jax.__version__}
  size = size or (2048 if row['platform'] == 'cpu' else 8192)
  dtype = workloads.resolve_dtype(dtype, row['platform'])
  row.update(dtype=dtype, matmul_size=size, jax_peak_flops=workloads.jax_matmul_peak(dtype, size))
  return row


def _child_run(framework: str, model: str, seq: int, batch: int, dtype: str) -> dict:
  shape = workloads.SHAPES[model]
  row: dict = {}
  if framework == 'jtune':
    import jax  # pylint: disable=g-import-not-at-top
    steps = workloads.jtune_steps(shape, batch, seq, dtype, tuple(int(x) for x in _MESH.value), _SCAN.value,
                                  dropout_rng=_RNG.value, executables_dir=workloads.executables_dir(),
                                  remat=_REMAT.value)
    train, evaluate = workloads.jtune_timers(steps)
    row.update(compile_s=steps.compile_s, devices=jax.device_count(),
               **{k.replace('_bytes', '_mib'): v / 2**20 for k, v in steps.memory.items()})
  else:
    train, evaluate = workloads.torch_timers(shape, batch, seq, dtype, remat=_REMAT.value != 'none')
  row['train'] = _time(train, _WARMUP.value, _REPEATS.value, _STEPS.value)
  row['eval'] = _time(evaluate, _WARMUP.value, _REPEATS.value, _STEPS.value)
  row['peak_rss_mib'] = workloads.peak_rss_bytes() / 2**20
  if framework == 'jtune':  # after the steps: the peak of the run, not of the set-up
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      row['device_peak_mib'] = stats['peak_bytes_in_use'] / 2**20
  if framework == 'torch':
    import torch  # pylint: disable=g-import-not-at-top
    if torch.cuda.is_available():
      row['device_peak_mib'] = torch.cuda.max_memory_allocated() / 2**20
  return row


def _child_compile(model: str, seq: int, batch: int, dtype: str) -> dict:
  steps = workloads.jtune_steps(workloads.SHAPES[model], batch, seq, dtype, scan_layers=_SCAN.value,
                                dropout_rng=_RNG.value, executables_dir=workloads.executables_dir(),
                                remat=_REMAT.value)
  return {'compile_s': steps.compile_s}


def _spawn(args: list[str], env_extra: dict[str, str] | None = None) -> dict:
  cmd = [sys.executable, '-m', 'benchmarks.throughput', *args, f'--steps={_STEPS.value}',
         f'--repeats={_REPEATS.value}', f'--warmup={_WARMUP.value}', f'--scan_layers={str(_SCAN.value).lower()}',
         f'--dropout_rng={_RNG.value}', f'--remat={_REMAT.value}']
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, **(env_extra or {})})
  if proc.returncode != 0:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _cache_env(cache: str) -> dict[str, str]:
  """A persistent compilation cache that also keeps quick compiles (JAX keeps only those over 1 s by default)."""
  return {'JAX_COMPILATION_CACHE_DIR': cache, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


def _derive(row: dict, peak: dict) -> dict:
  shape = workloads.SHAPES[row['model']]
  for mode in ('train', 'eval'):
    t = row[mode]['median_s']
    flops = workloads.model_flops(shape, row['batch'], row['seq'], mode == 'train')
    row[mode].update(samples_per_s=row['batch'] / t, tokens_per_s=row['batch'] * row['seq'] / t,
                     model_flops=flops, achieved_flops=flops / t,
                     mfu=flops / t / peak['jax_peak_flops'] / row.get('devices', 1))
  return row


def measure(on_row: Callable[[dict], None] | None = None) -> dict:
  """Every configuration, each framework in its own process; the scaling curve when asked for. A configuration
  whose process fails is listed under 'failed' and the others still run; `on_row` sees the result so far after
  each row (so that a run cut short still leaves its figures)."""
  dtype = _DTYPE.value
  peak = _spawn(['--child=peak', f'--dtype={dtype}', f'--matmul_size={_MATMUL.value}', '--frameworks=jtune'])
  dtype = peak['dtype']
  if 'torch' in _FRAMEWORKS.value:
    peak.update(_spawn(['--child=peak', f'--dtype={dtype}', f'--matmul_size={peak["matmul_size"]}',
                        '--frameworks=torch']))
  rows, failed = [], []
  for model in _MODELS.value:
    for seq in map(int, _SEQ_LENS.value):
      for batch in map(int, _BATCHES.value):
        by_framework = {}
        for framework in _FRAMEWORKS.value:
          args = [f'--models={model}', f'--seq_lens={seq}', f'--batch_sizes={batch}', f'--dtype={dtype}']
          where = dict(framework=framework, model=model, seq=seq, batch=batch, dtype=dtype, remat=_REMAT.value)
          try:
            with tempfile.TemporaryDirectory() as cache:
              row = _spawn(['--child=run', *args, f'--frameworks={framework}'], _cache_env(cache))
              if framework == 'jtune':  # a second run of the same config, which finds the compiled step cached
                row['compile_s_cached'] = _spawn(['--child=compile', *args, '--frameworks=jtune'],
                                               _cache_env(cache))['compile_s']
          except RuntimeError as e:  # one configuration that fails (out of memory, say) leaves the others
            failed.append({**where, 'error': str(e)[-2000:]})
            print(f'FAILED {where}: {failed[-1]["error"]}', flush=True)
            continue
          row.update(where)
          by_framework[framework] = _derive(row, peak)
          print(json.dumps(row), flush=True)
          rows.append(row)
          if on_row:
            on_row({'peak': peak, 'rows': rows, 'failed': failed, 'scaling': []})
        if {'jtune', 'torch'} <= set(by_framework):
          ratio = by_framework['torch']['train']['median_s'] / by_framework['jtune']['train']['median_s']
          by_framework['jtune']['train_speedup_vs_torch'] = ratio
          ratio = by_framework['torch']['eval']['median_s'] / by_framework['jtune']['eval']['median_s']
          by_framework['jtune']['eval_speedup_vs_torch'] = ratio
          if on_row:  # the files again, now with the ratios
            on_row({'peak': peak, 'rows': rows, 'failed': failed, 'scaling': []})
  return {'peak': peak, 'rows': rows, 'failed': failed, 'scaling': scaling(dtype) if _SCALING.value else []}


def scaling(dtype: str) -> list[dict]:
  """jtune's train step of the first model, batch and sequence length: per preset at each device count, and per
  sequence length on one device."""
  from configs import common  # pylint: disable=g-import-not-at-top
  model, batch, seq0 = _MODELS.value[0], int(_BATCHES.value[0]), int(_SEQ_LENS.value[0])
  points = [(preset, int(n), seq0) for n in _SCALING.value for preset in common.MESH_PRESETS]
  points += [('dp', 1, int(s)) for s in _SEQ_LENS.value if int(s) != seq0 or '1' not in _SCALING.value]
  out = []
  for preset, devices, seq in points:
    mesh = list(common.MESH_PRESETS[preset])
    if preset == 'fsdp_tp' and devices < 2:
      continue
    env = {'XLA_FLAGS': f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={devices}'}
    row = _spawn(['--child=run', f'--models={model}', f'--seq_lens={seq}', f'--batch_sizes={batch}',
                  f'--dtype={dtype}', '--frameworks=jtune', f'--mesh={",".join(map(str, mesh))}'], env)
    point = {'preset': preset, 'devices': devices, 'seq': seq, 'model': model, 'batch': batch,
             'step_s': row['train']['median_s'], 'step_s_p10_p90': [row['train']['p10_s'], row['train']['p90_s']],
             'per_device_mib': workloads.xla_mib(row)}
    print(json.dumps(point), flush=True)
    out.append(point)
  return out


def markdown(result: dict) -> str:
  peak = result['peak']
  lines = [f"Device: {peak['device_kind']} ({peak['platform']}, {peak['devices']} device(s)), {peak['dtype']}; "
           f"matmul peak {peak['matmul_size']}^3: JAX {peak['jax_peak_flops'] / 1e9:.1f} GFLOP/s"
           + (f", torch {peak['torch_peak_flops'] / 1e9:.1f} GFLOP/s" if 'torch_peak_flops' in peak else ''), '',
           '| model | batch x seq | framework | train step s (p10-p90) | samples/s | tokens/s | MFU | eval step s '
           '| eval MFU | compile s (cached) | peak memory MiB (XLA) | jtune / PyTorch (train, eval) |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in result['rows']:
    t, e = r['train'], r['eval']
    compile_s = f"{r['compile_s']:.1f} ({r['compile_s_cached']:.1f})" if 'compile_s' in r else ''
    memory = workloads.memory_cell(r, peak['platform'])
    speedup = (f"{r['train_speedup_vs_torch']:.2f}x, {r['eval_speedup_vs_torch']:.2f}x"
               if 'train_speedup_vs_torch' in r else '')
    remat = f" (remat {r['remat']})" if r.get('remat', 'none') != 'none' else ''
    lines.append(f"| {r['model']}{remat} | {r['batch']} x {r['seq']} | {r['framework']} | {t['median_s']:.3f} "
                 f"({t['p10_s']:.3f}-{t['p90_s']:.3f}) | {t['samples_per_s']:.2f} | {t['tokens_per_s']:.0f} | "
                 f"{100 * t['mfu']:.1f}% | {e['median_s']:.3f} | {100 * e['mfu']:.1f}% | {compile_s} | "
                 f"{memory} | {speedup} |")
  for f in result.get('failed', []):
    lines.append(f"| {f['model']} | {f['batch']} x {f['seq']} | {f['framework']} | failed: "
                 f"{f['error'].strip().splitlines()[-1][:120]} |||||||||")
  if result['scaling']:
    lines += ['', '| preset | devices | seq | step s (p10-p90) | per-device MiB |', '|---|---|---|---|---|']
    for p in result['scaling']:
      lines.append(f"| {p['preset']} | {p['devices']} | {p['seq']} | {p['step_s']:.3f} "
                   f"({p['step_s_p10_p90'][0]:.3f}-{p['step_s_p10_p90'][1]:.3f}) | {p['per_device_mib']:.1f} |")
  return '\n'.join(lines) + '\n'


def plot(result: dict, path: pathlib.Path) -> None:
  """Train samples/s per configuration and framework; with a scaling curve, step time and memory beside it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = 3 if result['scaling'] else 1
  fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
  ax = axes[0][0]
  configs = list(dict.fromkeys((r['model'], r['batch'], r['seq']) for r in result['rows']))
  frameworks = list(dict.fromkeys(r['framework'] for r in result['rows']))
  width = 0.8 / len(frameworks)
  for i, framework in enumerate(frameworks):
    values = [next((r['train']['samples_per_s'] for r in result['rows']
                    if (r['model'], r['batch'], r['seq']) == c and r['framework'] == framework), 0) for c in configs]
    ax.bar([j + i * width for j in range(len(configs))], values, width, label=framework)
  ax.set_xticks([j + width * (len(frameworks) - 1) / 2 for j in range(len(configs))])
  ax.set_xticklabels([f'{m}\n{b}x{s}' for m, b, s in configs], fontsize=8)
  ax.set_ylabel('train samples/s')
  ax.set_title(f"{result['peak']['device_kind']}, {result['peak']['dtype']}")
  ax.legend()
  if result['scaling']:
    for ax, key, label in ((axes[0][1], 'step_s', 'train step s'), (axes[0][2], 'per_device_mib', 'MiB/device')):
      for preset in dict.fromkeys(p['preset'] for p in result['scaling']):
        pts = sorted((p['devices'], p[key]) for p in result['scaling']
                     if p['preset'] == preset and p['seq'] == int(_SEQ_LENS.value[0]))
        ax.plot([d for d, _ in pts], [v for _, v in pts], marker='o', label=preset)
      by_seq = sorted((p['seq'], p[key]) for p in result['scaling'] if p['preset'] == 'dp' and p['devices'] == 1)
      if len(by_seq) > 1:
        twin = ax.twiny()
        twin.plot([s for s, _ in by_seq], [v for _, v in by_seq], 'k--', marker='x', label='seq (1 device)')
        twin.set_xlabel('sequence length (dashed, 1 device)')
      ax.set_xlabel('devices')
      ax.set_ylabel(label)
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv):
  del argv
  if _CHILD.value:
    model, seq, batch = _MODELS.value[0], int(_SEQ_LENS.value[0]), int(_BATCHES.value[0])
    row = {'peak': lambda: _child_peak(_DTYPE.value, _MATMUL.value),
           'run': lambda: _child_run(_FRAMEWORKS.value[0], model, seq, batch, _DTYPE.value),
           'compile': lambda: _child_compile(model, seq, batch, _DTYPE.value)}[_CHILD.value]()
    print(json.dumps(row))
    return
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)

  def write(result: dict) -> None:
    out.with_suffix('.json').write_text(json.dumps(result, indent=1))
    out.with_suffix('.md').write_text(markdown(result))

  result = measure(on_row=write)
  write(result)
  plot(result, out.with_suffix('.png'))
  print(markdown(result))


if __name__ == '__main__':
  app.run(main)
