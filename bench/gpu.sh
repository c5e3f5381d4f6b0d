#!/usr/bin/env bash
# One command for the GPU benchmark (installs nothing): bash bench/gpu.sh [--only SECTION] [--json FILE] ...
# Runs bench/gpu_bench.py with the repository on PYTHONPATH. On the lent device machine, $OUT (if set)
# receives the JSON of every number, the log and the optimized HLO of the decode / value / TD programs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
export TOKENIZERS_PARALLELISM=false
# JAX takes its share of the GPU only after the HF child process has exited (gpu_bench.py runs HF first);
# the TD section needs most of an 80 GB card for a 7B-shaped value model.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}"
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-true}"
# A rerun on the same (warm) machine reuses compiled programs.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/vimar_jax_xla_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}"
args=("$@")
if [[ -n "${OUT:-}" && " $* " != *" --json "* ]]; then
  args+=(--json "$OUT/gpu_bench.json")
fi
if [[ -n "${OUT:-}" && " $* " != *" --dump-hlo "* ]]; then
  args+=(--dump-hlo "$OUT")
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>/dev/null || true
if [[ -n "${OUT:-}" ]]; then
  python3 "$here/gpu_bench.py" "${args[@]}" 2>&1 | tee "$OUT/gpu_bench.log"
  exit "${PIPESTATUS[0]}"
fi
exec python3 "$here/gpu_bench.py" "${args[@]}"
