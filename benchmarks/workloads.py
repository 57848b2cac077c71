"""What the benchmarks time: model shapes, jtune's and PyTorch's train and eval steps, analytic FLOPs, peaks.

Shapes are the real models' (random weights): encoders train a 2-class sequence classifier, decoders a causal
LM on every token. jtune runs the jitted steps `jtune.train` uses (`jtune.step.compile_steps`); PyTorch runs the
`transformers` model of the same shape with `torch.optim.AdamW`, global-norm clipping and the same batch.

Model FLOPs (what MFU counts) are the matmul FLOPs of the model, counted analytically as in the PaLM paper's
appendix B: per token, 2 FLOPs per weight of every dense layer (attention projections, MLP, the LM head or the
classifier) plus 4 * S * H * K per layer for the attention scores and their weighted sum (S the sequence length,
H * K the width of the heads; causal masks are not discounted); a train step costs 3x the forward pass (the
backward pass 2x), an eval step 1x. Embedding lookups, norms, softmax and the optimizer update are not counted.
They are the FLOPs the task needs: a classifier reads the last layer at the first position only, so that layer's
queries, attention and MLP count for one token (keys and values for all), as jtune computes them; PyTorch computes
that layer at every position, work that its MFU does not count.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from jtune import config as config_lib
from jtune import executables, host_memory, optim, sharding
from jtune import state as state_lib
from jtune import step as step_lib
from jtune import tasks
from jtune.models import bert, decoder


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str  # 'bert', 'gpt2' or 'llama'
  layers: int
  hidden: int
  heads: int
  kv_heads: int
  mlp: int
  vocab: int
  max_positions: int


SHAPES = {
    'minilm': Shape('bert', 6, 384, 12, 12, 1536, 30522, 512),
    'bert-base': Shape('bert', 12, 768, 12, 12, 3072, 30522, 512),
    'gpt2': Shape('gpt2', 12, 768, 12, 12, 3072, 50257, 1024),
    'llama-135m': Shape('llama', 30, 576, 9, 3, 1536, 49152, 8192),  # SmolLM2-135M's shape
}
OPTIM = config_lib.OptimConfig(name='adamw', learning_rate=2e-5, schedule='linear', warmup_ratio=0.1,
                               weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0)
NUM_LABELS = 2


def model_flops(shape: Shape, batch: int, seq: int, train: bool) -> float:
  """Matmul FLOPs of one step (see the module docstring)."""
  D, H, G, F = shape.hidden, shape.heads, shape.kv_heads, shape.mlp
  K = D // H
  attention = 2 * D * H * K + 2 * D * G * K  # query and output, key and value
  mlp = (3 if shape.kind == 'llama' else 2) * D * F
  per_token = shape.layers * (2 * (attention + mlp) + 4 * seq * H * K)
  if shape.kind == 'bert':
    # The classifier reads the first position: the last layer's keys and values need every token, the rest of
    # it (what jtune computes, where PyTorch computes every position), the pooler and the classifier the first.
    per_token -= (2 * (2 * D * H * K + mlp) + 4 * seq * H * K) * (1 - 1 / seq)
    per_token += 2 * (D * D + D * NUM_LABELS) / seq
  else:
    per_token += 2 * D * shape.vocab  # the LM head
  return per_token * batch * seq * (3 if train else 1)


def batch_arrays(shape: Shape, batch: int, seq: int) -> dict[str, np.ndarray]:
  """A full batch of random tokens with the columns of the model's task."""
  if seq > shape.max_positions:  # else jtune's position gather would clamp silently
    raise ValueError(f'sequence length {seq}: expected at most the shape\'s {shape.max_positions} positions')
  rng = np.random.default_rng(0)
  ids = rng.integers(1, shape.vocab, (batch, seq)).astype(np.int32)
  out = {'input_ids': ids, 'weights': np.ones(batch, np.float32)}
  if shape.kind == 'bert':
    out.update(attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids),
               labels=rng.integers(0, NUM_LABELS, batch).astype(np.int32))
  else:
    out.update(positions=np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy(),
               segment_ids=np.ones_like(ids), targets=np.roll(ids, -1, axis=1))
  return out


def resolve_dtype(dtype: str, platform: str) -> str:
  """A `--dtype` flag's value on `platform` (a JAX backend name): 'auto' is float32 on a CPU, bfloat16 elsewhere."""
  return dtype if dtype != 'auto' else ('float32' if platform == 'cpu' else 'bfloat16')


def bert_config(shape: Shape, dtype: Any = jnp.float32, scan_layers: bool = False,
                attention_dropout: float | None = None, remat: str = 'none') -> bert.BertConfig:
  """The BERT-family config of `shape` with transformers' dropouts, a classifier of NUM_LABELS classes."""
  return bert.BertConfig(
      vocab_size=shape.vocab, hidden_size=shape.hidden, num_layers=shape.layers, num_heads=shape.heads,
      intermediate_size=shape.mlp, max_position_embeddings=shape.max_positions, type_vocab_size=2,
      layer_norm_eps=1e-12, initializer_range=0.02, hidden_dropout=0.1,
      attention_dropout=0.1 if attention_dropout is None else attention_dropout, classifier_dropout=0.1,
      num_labels=NUM_LABELS, dtype=dtype, scan_layers=scan_layers, remat=remat)


def jtune_model(shape: Shape, dtype: Any, scan_layers: bool = False, attention_dropout: float | None = None,
                remat: str = 'none'):
  """The model of `shape`, its task and inputs; attention_dropout None: the shape's default (transformers');
  remat: model.remat."""
  if shape.kind == 'bert':
    cfg = bert_config(shape, dtype, scan_layers, attention_dropout, remat)
    return bert.build(cfg), tasks.TASKS['classification'], state_lib.ENCODER_INPUTS
  gpt2 = shape.kind == 'gpt2'
  # transformers' defaults, which the PyTorch side runs: GPT-2 0.1 everywhere, Llama none
  dropouts = {k: 0.1 if gpt2 else 0.0 for k in ('embedding_dropout', 'attention_dropout', 'hidden_dropout')}
  if attention_dropout is not None:
    dropouts['attention_dropout'] = attention_dropout
  cfg = decoder.DecoderConfig(
      vocab_size=shape.vocab, hidden_size=shape.hidden, num_layers=shape.layers, num_heads=shape.heads,
      num_kv_heads=shape.kv_heads, head_dim=shape.hidden // shape.heads, intermediate_size=shape.mlp,
      max_position_embeddings=shape.max_positions, norm='layer' if gpt2 else 'rms',
      positions='learned' if gpt2 else 'rope', mlp='gelu_new' if gpt2 else 'swiglu', attention_bias=gpt2,
      output_bias=gpt2, tie_embeddings=True, dtype=dtype, scan_layers=scan_layers, remat=remat, **dropouts)
  return decoder.build(cfg), tasks.TASKS['causal_lm'], ('input_ids', 'positions', 'segment_ids')


@dataclasses.dataclass
class JtuneSteps:
  """Compiled train and eval steps of one shape on a mesh, their state and batch, and what compiling cost."""
  train: Callable
  evaluate: Callable
  state: Any
  batch: dict[str, jax.Array]
  compile_s: float
  memory: dict[str, int]


@dataclasses.dataclass
class JtuneParts:
  """What compiling one shape's steps starts from: the mesh and rules, the jitted steps and the sharded state."""
  mesh: Any
  rules: Any
  train_fn: Callable
  eval_fn: Callable
  state: Any


def jtune_parts(shape: Shape, seq: int, dtype: Any, mesh_sizes: tuple[int, int, int] = (-1, 1, 1),
                scan_layers: bool = False, dropout_rng: str = 'auto', attention_dropout: float | None = None,
                remat: str = 'none') -> JtuneParts:
  """The sharded state and the jitted (not yet compiled) train and eval steps of `shape`, as `jtune.train` makes
  them (dropout_rng: config.train.dropout_rng; attention_dropout: the model's, if not the shape's default;
  remat: model.remat)."""
  return model_parts(*jtune_model(shape, dtype, scan_layers, attention_dropout, remat), seq, mesh_sizes,
                     dropout_rng)


def model_parts(model: Any, task: Any, inputs: tuple[str, ...], seq: int,
                mesh_sizes: tuple[int, int, int] = (-1, 1, 1), dropout_rng: str = 'auto') -> JtuneParts:
  """jtune_parts for a given Flax `model`, its jtune.tasks `task` and the batch columns it takes."""
  rules = config_lib.parse_rules(common.RULES)
  mesh = sharding.make_mesh(config_lib.MeshConfig(*mesh_sizes, rules=rules))
  lr = optim.schedule(OPTIM, 1000)
  tx = optim.optimizer(OPTIM, lr)
  state, shardings = state_lib.init(model, tx, mesh, rules, seed=0, seq_len=seq, inputs=inputs)
  train_fn, eval_fn = step_lib.compile_steps(model, tx, lr, mesh, shardings, task=task, inputs=inputs,
                                             dropout_rng=dropout_rng)
  return JtuneParts(mesh, rules, train_fn, eval_fn, state)


def executables_dir() -> str:
  """Where the train step's executable is kept (jtune.executables, as `jtune.train` keeps it): beside the
  process's persistent cache (JAX_COMPILATION_CACHE_DIR); '' (plain compiles) in a process started without one."""
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR', '')
  return os.path.join(cache, 'executables') if cache else ''


def jtune_steps(shape: Shape, batch: int, seq: int, dtype: str = 'float32',
                mesh_sizes: tuple[int, int, int] = (-1, 1, 1), scan_layers: bool = False,
                keep_host_memory: bool = True, dropout_rng: str = 'auto',
                executables_dir: str = '', attention_dropout: float | None = None, remat: str = 'none'
                ) -> JtuneSteps:
  """Builds the sharded state and compiles both steps ahead of time (compile_s: lowering + compiling the train
  step; memory: XLA's per-device analysis of it, with the state donated). scan_layers: model.scan_layers;
  keep_host_memory: on the CPU, jtune.host_memory's malloc settings, as `jtune.train` applies them;
  executables_dir: the train step through jtune.executables in that folder, as `jtune.train` compiles it;
  attention_dropout: the model's, where not the shape's default (0.1 for BERT and GPT-2, 0 for the Llama);
  remat: model.remat (with 'full' and unrolled layers, on a CPU, the steps compile with XLA's memory-optimised
  scheduler)."""
  if keep_host_memory:
    host_memory.keep_freed_memory()  # takes hold for threads that have not allocated yet: call this first
  parts = jtune_parts(shape, seq, jnp.dtype(dtype), mesh_sizes, scan_layers, dropout_rng, attention_dropout,
                      remat)
  arrays = sharding.global_batch(batch_arrays(shape, batch, seq), parts.mesh)
  jax.block_until_ready((parts.state, arrays))  # the state's initialisation runs asynchronously: not in the clock
  with sharding.activate(parts.mesh, parts.rules):
    start = time.perf_counter()
    if executables_dir:
      description = repr((shape, seq, dtype, mesh_sizes, scan_layers, dropout_rng)
                         + ((attention_dropout,) if attention_dropout is not None else ())
                         + ((remat,) if remat != 'none' else ()))
      train = executables.load_or_compile(parts.train_fn, (parts.state, arrays), executables_dir, description)
    else:
      train = parts.train_fn.lower(parts.state, arrays).compile()
    compile_s = time.perf_counter() - start
    evaluate = parts.eval_fn.lower(parts.state.params, arrays).compile()
  analysis = train.memory_analysis()
  memory = {'argument_bytes': analysis.argument_size_in_bytes, 'output_bytes': analysis.output_size_in_bytes,
            'alias_bytes': analysis.alias_size_in_bytes, 'temp_bytes': analysis.temp_size_in_bytes}
  return JtuneSteps(train, evaluate, parts.state, arrays, compile_s, memory)


def jtune_timers(steps: JtuneSteps) -> tuple[Callable[[], None], Callable[[], None]]:
  """(one train step, one eval step), each waiting for its result."""
  holder = [steps.state]

  def train():
    holder[0], metrics = steps.train(holder[0], steps.batch)
    jax.block_until_ready(metrics['loss'])

  def evaluate():
    jax.block_until_ready(steps.evaluate(holder[0].params, steps.batch))
  return train, evaluate


def batch_timers(model: Any, task: Any, inputs: tuple[str, ...], batch: dict[str, np.ndarray], seq: int
                 ) -> tuple[Callable[[], None], Callable[[], None], float]:
  """(train step, eval step, the first step's loss) of `model` on `batch`, as jtune.train makes them
  (model_parts), on one device: what the A/B scripts of one change (mlm_head_ab, lm_head_ab) time."""
  parts = model_parts(model, task, inputs, seq)
  arrays = sharding.global_batch(batch, parts.mesh)
  state, metrics = parts.train_fn(parts.state, arrays)
  steps = JtuneSteps(parts.train_fn, parts.eval_fn, state, arrays, compile_s=0.0, memory={})
  return *jtune_timers(steps), float(metrics['loss'])


def step_times(step: Callable[[], None], n: int) -> list[float]:
  """Seconds of each of `n` calls of `step` (a timer above: each call waits for its result)."""
  times = []
  for _ in range(n):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def alternate(steps: dict[str, tuple[Callable[[], None], ...]], rounds: int) -> dict[str, tuple[list[float], ...]]:
  """Seconds of each variant's steps (a timer above for each), the variants taking turns `rounds` times, one
  step of each timer per turn, so that the machine's drift falls on all alike; prints each timer's median."""
  times = {name: tuple([] for _ in timers) for name, timers in steps.items()}
  for _ in range(rounds):
    for name, timers in steps.items():
      for timer, ts in zip(timers, times[name]):
        ts += step_times(timer, 1)
  for name, (train_ts, *rest) in times.items():
    print(f'{name}: train step median {statistics.median(train_ts):.3f} s ({", ".join(f"{t:.3f}" for t in train_ts)})'
          + ''.join(f'; eval step median {statistics.median(ts):.3f} s' for ts in rest))
  return times


def mirrored(variants: list[str], copies: int) -> list[str]:
  """The order to start `copies` processes of each variant in: A B, B A, A B, ... Processes started later ran
  5-15% faster on this machine whatever they ran (benchmarks/README.md), so A B A B would favour B."""
  return [v for copy in range(copies) for v in (variants if copy % 2 == 0 else variants[::-1])]


def peak_rss_bytes() -> int:
  """This process's peak resident memory (getrusage; Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes() -> int:
  """The kernel's estimate of memory available to a new process (/proc/meminfo MemAvailable)."""
  with open('/proc/meminfo') as f:
    for line in f:
      if line.startswith('MemAvailable:'):
        return int(line.split()[1]) * 1024
  raise OSError('/proc/meminfo has no MemAvailable line')


def room_for_the_rest(peaks: list[int], available: int, started: int, total: int) -> None:
  """Raises SystemExit, one line, unless `available` bytes hold the `total - started` processes still to start,
  each as large as the largest of `peaks` (those already started, which keep their memory), with a tenth to spare."""
  each = max(peaks, default=0) * 1.1
  if available < each * (total - started):
    raise SystemExit(f'processes {started + 1}-{total} would need about {each * (total - started) / 2**30:.1f} GiB '
                     f'({total - started} x {each / 2**30:.1f} GiB, the largest so far) with '
                     f'{available / 2**30:.1f} GiB available: expected fewer --copies or variants, '
                     'or --nokeep_host_memory')


def torch_timers(shape: Shape, batch: int, seq: int, dtype: str = 'float32', remat: bool = False
                 ) -> tuple[Callable[[], None], Callable[[], None]]:
  """(train step, eval step) of the transformers model of `shape` with torch.optim.AdamW; remat: with
  transformers' gradient checkpointing (each layer recomputed in the backward pass)."""
  import torch  # pylint: disable=g-import-not-at-top  (test extra)
  import transformers  # pylint: disable=g-import-not-at-top

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  if shape.kind == 'bert':
    hf = transformers.BertConfig(num_hidden_layers=shape.layers, hidden_size=shape.hidden,
                                 num_attention_heads=shape.heads, intermediate_size=shape.mlp,
                                 vocab_size=shape.vocab, num_labels=NUM_LABELS)
    model = transformers.BertForSequenceClassification(hf)
  elif shape.kind == 'gpt2':
    hf = transformers.GPT2Config(n_layer=shape.layers, n_embd=shape.hidden, n_head=shape.heads,
                                 vocab_size=shape.vocab, n_positions=shape.max_positions)
    model = transformers.GPT2LMHeadModel(hf)
  else:
    hf = transformers.LlamaConfig(num_hidden_layers=shape.layers, hidden_size=shape.hidden,
                                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                                  intermediate_size=shape.mlp, vocab_size=shape.vocab,
                                  max_position_embeddings=shape.max_positions, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(hf)
  model = model.to(device).train()
  if remat:
    model.gradient_checkpointing_enable()
  opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
  arrays = batch_arrays(shape, batch, seq)
  data = {'input_ids': torch.from_numpy(arrays['input_ids'].astype(np.int64)).to(device)}
  if shape.kind == 'bert':
    data.update(attention_mask=torch.from_numpy(arrays['attention_mask']).to(device),
                labels=torch.from_numpy(arrays['labels'].astype(np.int64)).to(device))
  else:
    data['labels'] = data['input_ids']  # transformers shifts them
  autocast = functools.partial(torch.autocast, device_type=device, dtype=torch.bfloat16,
                               enabled=dtype == 'bfloat16')
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)

  def train():
    model.train()  # dropout on, as in jtune's train step
    with autocast():
      loss = model(**data).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()

  def evaluate():
    model.eval()  # dropout off, as in jtune's eval step
    with torch.no_grad(), autocast():
      model(**data)
    sync()
  return train, evaluate


def xla_mib(row: dict) -> float:
  """XLA's analysis of jtune's train step per device, from a throughput.py row (MiB): arguments + temporaries +
  the outputs not aliased to (donated) arguments."""
  return row['argument_mib'] + row['temp_mib'] + row['output_mib'] - row['alias_mib']


def memory_cell(row: dict, platform: str) -> str:
  """throughput.py's memory cell for a row: the device's peak, else the process's peak RSS (marked 'RSS' off a
  CPU machine: PyTorch on a TPU VM's host), and for jtune XLA's analysis (xla_mib) in brackets."""
  if 'device_peak_mib' in row:
    cell = f"{row['device_peak_mib']:,.0f}"
  else:
    cell = f"{row['peak_rss_mib']:,.0f}" + (' RSS' if platform != 'cpu' else '')
  return cell + (f' ({xla_mib(row):,.0f})' if 'temp_mib' in row else '')


def jax_matmul_peak(dtype: str, size: int, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` [size, size] x [size, size] products on one device, in `dtype`."""
  x = jax.random.normal(jax.random.key(0), (size, size), dtype)  # not ones or zeros: they multiply faster
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype))
  jax.block_until_ready(matmul(x, x))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(x, x))
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def torch_matmul_peak(dtype: str, size: int, repeats: int = 5) -> float:
  """The same measurement with torch.matmul."""
  import torch  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  gen = torch.Generator(device).manual_seed(0)
  x = torch.randn((size, size), dtype=getattr(torch, dtype), device=device, generator=gen)
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  torch.matmul(x, x)
  sync()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    torch.matmul(x, x)
    sync()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best
