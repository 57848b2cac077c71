#!/usr/bin/env bash
# Issue 7's accelerator rows in one go, each group of runs capped so that a slow one leaves the others' figures:
#   bash benchmarks/gpu_suite.sh OUT_DIR [SECONDS_PER_GROUP]
# bf16 (--dtype=auto on an accelerator), jtune beside PyTorch, then jtune's BERT-base with model.scan_layers (its
# compile against its step time). Results: OUT_DIR/{seq512,seq128,seq512_scan}.{json,md,png}.
set -u
out=${1:?usage: gpu_suite.sh OUT_DIR [SECONDS_PER_GROUP]}
cap=${2:-240}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c 'import jax, flax, optax, transformers, torch; print("jax", jax.__version__, "flax", flax.__version__,
  "optax", optax.__version__, "transformers", transformers.__version__, "torch", torch.__version__, jax.devices())'
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
timeout "$cap" python3 -m benchmarks.throughput --models=bert-base,gpt2 --seq_lens=512 --batch_sizes=32 \
  --steps=10 --repeats=3 --warmup=3 --out="$out/seq512" 2>&1 | grep -v -E '^(W|I)[0-9]{4} '
timeout "$cap" python3 -m benchmarks.throughput --models=llama-135m,bert-base --seq_lens=128 --batch_sizes=64 \
  --steps=10 --repeats=3 --warmup=3 --out="$out/seq128" 2>&1 | grep -v -E '^(W|I)[0-9]{4} '
timeout "$cap" python3 -m benchmarks.throughput --models=bert-base --seq_lens=512 --batch_sizes=32 --frameworks=jtune \
  --scan_layers --steps=10 --repeats=3 --warmup=3 --out="$out/seq512_scan" 2>&1 | grep -v -E '^(W|I)[0-9]{4} '
