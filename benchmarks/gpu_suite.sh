#!/usr/bin/env bash
# Issue 7's accelerator rows in one go, each group of runs capped so that a slow one leaves the others' figures:
#   bash benchmarks/gpu_suite.sh OUT_DIR [SECONDS_PER_GROUP] [GROUPS]
# GROUPS (default seq512,profile,seq128,scan), in the order given:
#   seq512   BERT-base and GPT-2 small at 32 x 512, jtune beside PyTorch       -> OUT_DIR/seq512.{json,md,png}
#   profile  BERT-base's train step at 32 x 512 profiled, with and without its attention dropout (where the
#            train step's time goes, kernel by kernel)                          -> OUT_DIR/profile{,_noattndrop}.txt
#                                                                                  and the traces under them
#   seq128   the Llama shape and BERT-base at 64 x 128, jtune beside PyTorch    -> OUT_DIR/seq128.*
#   scan     jtune's BERT-base at 32 x 512 with model.scan_layers (its compile against its step time)
#                                                                               -> OUT_DIR/seq512_scan.*
# bf16 (--dtype=auto on an accelerator).
set -u -o pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR [SECONDS_PER_GROUP] [GROUPS]}
cap=${2:-240}
groups=${3:-seq512,profile,seq128,scan}
[[ $cap =~ ^[1-9][0-9]*$ && $cap -ge 2 ]] || { echo "SECONDS_PER_GROUP $cap: expected whole seconds, at least 2" >&2; exit 2; }
for group in ${groups//,/ }; do
  case $group in seq512|profile|seq128|scan) ;; *) echo "group $group: expected seq512, profile, seq128 or scan" >&2; exit 2 ;; esac
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1
quiet() { grep -v -E '^(W|I)[0-9]{4} ' || true; }
said() { local rc=$?; [[ $rc == 0 ]] || echo "== $1 exited with status $rc (124: cut at its time cap)"; }
throughput() {  # OUT_NAME FLAGS...: the group's capped run of benchmarks/throughput.py, 3 repeats of 10 steps
  local name=$1; shift
  timeout "$cap" python3 -m benchmarks.throughput "$@" --steps=10 --repeats=3 --warmup=3 --out="$out/$name" 2>&1 \
    | quiet; said "$group"
}
python3 -c 'import jax, flax, optax, transformers, torch; print("jax", jax.__version__, "flax", flax.__version__,
  "optax", optax.__version__, "transformers", transformers.__version__, "torch", torch.__version__, jax.devices())'
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
for group in ${groups//,/ }; do
  echo "== $group"
  case $group in
    seq512) throughput seq512 --models=bert-base,gpt2 --seq_lens=512 --batch_sizes=32 ;;
    profile) for drop in '' 0; do  # the shape's attention dropout (0.1), then none
               name=profile${drop:+_noattndrop}
               timeout "$((cap / 2))" python3 -m benchmarks.profile_step --model=bert-base --batch=32 --seq=512 \
                 --steps=3 --top=30 ${drop:+--attention_dropout=$drop} --trace_dir="$out/$name" 2>&1 | quiet \
                 | tee "$out/$name.txt"; said "$name"
             done ;;
    seq128) throughput seq128 --models=llama-135m,bert-base --seq_lens=128 --batch_sizes=64 ;;
    scan) throughput seq512_scan --models=bert-base --seq_lens=512 --batch_sizes=32 --frameworks=jtune --scan_layers ;;
  esac
done
