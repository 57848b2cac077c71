"""The mesh presets side by side: step time and compiled per-device memory of jtune's train step.

  python -m benchmarks.presets                  # 8 fake CPU devices unless XLA_FLAGS says otherwise
  python -m benchmarks.presets --presets=dp,fsdp --models=bert-base --batch_size=32 --steps=5

Each preset of configs/common.py runs in a fresh process on the same devices, MiniLM-L6 shapes, random weights,
float32, the same global batch. On fake CPU devices all "devices" share the host's cores, so the figures show
what the collectives and the sharded layouts cost, not a speed-up; on a GPU node or TPU pod run it as is.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

from benchmarks import train_step
from configs import common

_PRESETS = flags.DEFINE_list('presets', list(common.MESH_PRESETS), 'Presets from configs/common.py.')
# --models, --batch_size, --seq_len, --steps, --warmup and --child are benchmarks.train_step's flags.
_MODEL, _BATCH, _SEQ = train_step._MODELS, train_step._BATCH, train_step._SEQ  # pylint: disable=protected-access
_STEPS, _WARMUP, _CHILD = train_step._STEPS, train_step._WARMUP, train_step._CHILD  # pylint: disable=protected-access


def _child() -> dict:
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS are set by the parent)
  preset, model = _PRESETS.value[0], _MODEL.value[0]
  memory: dict = {}
  times = train_step.time_jtune(train_step.SHAPES[model], _BATCH.value, _SEQ.value, _WARMUP.value,
                                _STEPS.value, common.MESH_PRESETS[preset], memory)
  mib = {k.replace('_bytes', '_mib'): round(v / 2**20, 1) for k, v in memory.items()}
  return {'preset': preset, 'mesh': common.MESH_PRESETS[preset], 'devices': jax.device_count(),
          'model': model, 'batch': _BATCH.value, 'seq': _SEQ.value,
          'step_s': round(statistics.median(times), 3), 'step_s_range': [round(min(times), 3),
                                                                        round(max(times), 3)], **mib}


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(_child()))
    return
  env = {**os.environ}
  env.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  for model in _MODEL.value:
    for preset in _PRESETS.value:
      cmd = [sys.executable, '-m', 'benchmarks.presets', '--child', f'--presets={preset}',
             f'--models={model}', f'--batch_size={_BATCH.value}', f'--seq_len={_SEQ.value}',
             f'--steps={_STEPS.value}', f'--warmup={_WARMUP.value}']
      out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
      print(out.strip().splitlines()[-1], flush=True)


if __name__ == '__main__':
  app.run(main)
