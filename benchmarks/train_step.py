"""jtune's train step against Hugging Face PyTorch, same shapes, same machine, one run.

  python -m benchmarks.train_step                      # MiniLM-L6 and BERT-base shapes, batch 16, seq 128
  python -m benchmarks.train_step --models=minilm --batch_size=32 --seq_len=64 --steps=20

Both sides run the whole training step (forward, backward, AdamW update) of a sequence classifier in float32 on
random weights of the given shape: jtune's jitted `train_step` on all local devices (one CPU device unless XLA is
told otherwise) and `transformers.BertForSequenceClassification` + `torch.optim.AdamW`. The figure is the median
step time after warm-up; each framework runs in a fresh process. Needs the test extra (torch).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags

from configs import common
from jtune import config as config_lib
from jtune import optim, sharding
from jtune import state as state_lib
from jtune import step as step_lib
from jtune.models import bert

SHAPES = {  # name: (layers, hidden, heads, intermediate)
    'minilm': (6, 384, 12, 1536),
    'bert-base': (12, 768, 12, 3072),
}
_MODELS = flags.DEFINE_list('models', ['minilm', 'bert-base'], f'Shapes from {sorted(SHAPES)}.')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Global batch size.')
_SEQ = flags.DEFINE_integer('seq_len', 128, 'Sequence length.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps after warm-up.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps first.')
_FRAMEWORKS = flags.DEFINE_list('frameworks', ['jtune', 'torch'], 'What to time: jtune, torch.')
_CHILD = flags.DEFINE_bool('child', False, 'Internal: time one model and framework in this process.')

OPTIM = config_lib.OptimConfig(name='adamw', learning_rate=2e-5, schedule='linear', warmup_ratio=0.1,
                               weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0)


def _batch(batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {'input_ids': rng.integers(1, vocab, (batch, seq)).astype(np.int32),
          'attention_mask': np.ones((batch, seq), np.int32),
          'token_type_ids': np.zeros((batch, seq), np.int32),
          'labels': rng.integers(0, 2, batch).astype(np.int32),
          'weights': np.ones(batch, np.float32)}


def _median_time(step, warmup: int, steps: int) -> list[float]:
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def time_jtune(shape, batch: int, seq: int, warmup: int, steps: int,
               mesh_sizes: tuple[int, int, int] = (-1, 1, 1), memory: dict | None = None) -> list[float]:
  """Step times of jtune's train step on a (data, fsdp, tensor) mesh; fills `memory` from XLA's analysis."""
  layers, hidden, heads, inter = shape
  cfg = bert.BertConfig(vocab_size=30522, hidden_size=hidden, num_layers=layers, num_heads=heads,
                        intermediate_size=inter, max_position_embeddings=512, type_vocab_size=2,
                        layer_norm_eps=1e-12, initializer_range=0.02, hidden_dropout=0.1,
                        attention_dropout=0.1, classifier_dropout=0.1, num_labels=2, pad_token_id=0)
  rules = config_lib.parse_rules(common.RULES)
  mesh = sharding.make_mesh(config_lib.MeshConfig(*mesh_sizes, rules=rules))
  model = bert.BertForSequenceClassification(cfg)
  lr = optim.schedule(OPTIM, 1000)
  tx = optim.optimizer(OPTIM, lr)
  state, shardings = state_lib.init(model, tx, mesh, rules, seed=0, seq_len=seq)
  train_fn, _ = step_lib.compile_steps(model, tx, lr, mesh, shardings)
  batch_arrays = sharding.global_batch(_batch(batch, seq, cfg.vocab_size), mesh)
  holder = [state]

  def step():
    holder[0], metrics = train_fn(holder[0], batch_arrays)
    jax.block_until_ready(metrics['loss'])

  with sharding.activate(mesh, rules):
    if memory is not None:
      analysis = train_fn.lower(state, batch_arrays).compile().memory_analysis()
      memory.update(argument_bytes=analysis.argument_size_in_bytes, temp_bytes=analysis.temp_size_in_bytes,
                    output_bytes=analysis.output_size_in_bytes, alias_bytes=analysis.alias_size_in_bytes)
    return _median_time(step, warmup, steps)


def time_torch(shape, batch: int, seq: int, warmup: int, steps: int) -> list[float]:
  import torch  # pylint: disable=g-import-not-at-top  (test extra)
  import transformers  # pylint: disable=g-import-not-at-top

  layers, hidden, heads, inter = shape
  hf_cfg = transformers.BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                   intermediate_size=inter, num_labels=2)
  model = transformers.BertForSequenceClassification(hf_cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
  data = {k: torch.from_numpy(v.astype(np.int64)) for k, v in _batch(batch, seq, 30522).items()
          if k != 'weights'}

  def step():
    out = model(**data)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  return _median_time(step, warmup, steps)


def _child_row(name: str, framework: str) -> dict:
  args = (SHAPES[name], _BATCH.value, _SEQ.value, _WARMUP.value, _STEPS.value)
  times = (time_jtune if framework == 'jtune' else time_torch)(*args)
  return {'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times)}


def _run_child(name: str, framework: str) -> dict:
  """Each framework in a fresh process, so neither one's thread pools slow the other."""
  cmd = [sys.executable, '-m', 'benchmarks.train_step', '--child', f'--models={name}',
         f'--frameworks={framework}', f'--batch_size={_BATCH.value}', f'--seq_len={_SEQ.value}',
         f'--steps={_STEPS.value}', f'--warmup={_WARMUP.value}']
  out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(_child_row(_MODELS.value[0], _FRAMEWORKS.value[0])))
    return
  rows = []
  for name in _MODELS.value:
    row = {'model': name, 'batch': _BATCH.value, 'seq': _SEQ.value, 'jax_devices': jax.device_count()}
    for framework in _FRAMEWORKS.value:
      timing = _run_child(name, framework)
      row[f'{framework}_step_s'] = timing['median_s']
      row[f'{framework}_step_s_range'] = [timing['min_s'], timing['max_s']]
      row[f'{framework}_samples_per_s'] = _BATCH.value / timing['median_s']
    if {'jtune', 'torch'} <= set(_FRAMEWORKS.value):
      row['ratio_jtune_over_torch'] = row['jtune_samples_per_s'] / row['torch_samples_per_s']
    print(json.dumps(row), flush=True)
    rows.append(row)
  print('\n| model | batch x seq | jtune samples/s | PyTorch samples/s | jtune / PyTorch |')
  print('|---|---|---|---|---|')
  nan = float('nan')
  for r in rows:
    print(f"| {r['model']} | {r['batch']} x {r['seq']} | {r.get('jtune_samples_per_s', nan):.2f} | "
          f"{r.get('torch_samples_per_s', nan):.2f} | {r.get('ratio_jtune_over_torch', nan):.2f} |")


if __name__ == '__main__':
  app.run(main)
