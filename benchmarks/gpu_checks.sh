#!/usr/bin/env bash
# The accelerator checks of issue 13, as one prepared script: the sweep, MNIST and curvature
# benchmarks at accelerator sizes and `gdlr run` of every configs/*_gpu.yaml (shrunk to fit),
# every number written to one file. Meant to finish in under 8 minutes on one H200.
#
#   benchmarks/gpu_checks.sh MNIST_DIR [OUT_FILE]      # default OUT_FILE: gpu_checks.txt
#   GPU_CHECKS_TINY=1 benchmarks/gpu_checks.sh ...     # tiny sizes: tries the script on a CPU
#
# MNIST_DIR is a folder of MNIST IDX files (the machine with the accelerator has only the
# repository: copy the data beside it). Each step has its own time limit; a step that fails
# or runs out of time is recorded with its exit status and the script goes on. Run from the
# repository root with the project's Python environment active (python and gdlr on PATH).
set -u -o pipefail

if [ $# -lt 1 ] || [ ! -d "$1" ]; then
  echo "usage: benchmarks/gpu_checks.sh MNIST_DIR [OUT_FILE]  (MNIST_DIR: a folder of IDX files)" >&2
  exit 2
fi
MNIST_DIR=$(cd "$1" && pwd)
OUT=${2:-gpu_checks.txt}
RUNS=$(mktemp -d "${TMPDIR:-/tmp}/gdlr-gpu-checks.XXXXXX")
: > "$OUT"

if [ "${GPU_CHECKS_TINY:-0}" = 1 ]; then  # a CPU try of the script: seconds per step
  SWEEP_ARGS="--side 64 --steps 100 --repeats 2 --step-blocks 1,4 --pairs"
  MNIST_ARGS="--examples 64 --n-init 4 --steps 20 --repeats 2"
  CURV_ARGS="--depth 1 --width 8 --lanczos-iterations 20 --power-iterations 50 --repeats 1"
  MNIST_SET="--set data.max_examples=64 --set training.n_init=2 --set training.steps=20 --set model.depths=[1] --set training.etas=[0.1,1.0] --set training.record_every=10 --set engine.check_every=10 --set engine.etas_per_chunk=2"
  BOUNDARY_SET="--set data.max_examples=64 --set zoom.levels=2 --set zoom.resolution=33 --set zoom.steps=20"
  CRITICAL_SET="--set data.max_examples=64 --set model.depths=[1] --set model.width=8 --set search.n_init=35 --set search.steps=20 --set search.etas_per_round=2 --set search.max_rounds=1 --set engine.check_every=10"
  LIMIT=300 LIMIT_SWEEP=300
else  # accelerator sizes, shrunk from the paper-scale configs to fit the 8 minutes
  SWEEP_ARGS="--side 2048 --steps 1000 --repeats 3 --step-blocks 1,2,4,8 --pairs"
  MNIST_ARGS="--examples 0 --n-init 256 --steps 500 --repeats 3"
  CURV_ARGS="--depth 4 --width 256 --repeats 3"
  MNIST_SET="--set training.n_init=20 --set training.steps=1000 --set model.depths=[1,4,16] --set training.record_every=100"
  BOUNDARY_SET="--set zoom.levels=2 --set zoom.resolution=257 --set zoom.steps=1000"
  CRITICAL_SET="--set search.n_init=40 --set search.steps=1000 --set model.depths=[1,16] --set search.etas_per_round=4 --set search.max_rounds=2"
  LIMIT=60 LIMIT_SWEEP=90  # 90 + 2 x 60 + 60 per config: under 8 minutes with 4 configs
fi

step() {  # step NAME LIMIT_S COMMAND...: runs COMMAND, its output and timing into $OUT
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*" >> "$OUT"
  local start=$SECONDS
  timeout "$limit" "$@" >> "$OUT" 2>&1
  local rc=$?
  echo "=== $name: exit status $rc, $((SECONDS - start)) s" >> "$OUT"
  echo "$name: exit status $rc, $((SECONDS - start)) s"
}

{
  echo "gpu_checks.sh on $(hostname) at $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: none"
  python -c "import jax; print('jax', jax.__version__, jax.devices())"
} >> "$OUT" 2>&1

step sweep "$LIMIT_SWEEP" python benchmarks/bench_sweep.py $SWEEP_ARGS
step mnist "$LIMIT" python benchmarks/bench_mnist.py --data-dir "$MNIST_DIR" $MNIST_ARGS
step curvature "$LIMIT" python benchmarks/bench_curvature.py --data-dir "$MNIST_DIR" $CURV_ARGS
for config in configs/*_gpu.yaml; do
  name=$(basename "$config" .yaml)
  case $name in
    fractal_boundary_*) overrides=$BOUNDARY_SET ;;
    critical_step_size_*) overrides=$CRITICAL_SET ;;
    *) overrides=$MNIST_SET ;;
  esac
  step "gdlr run $name" "$LIMIT" gdlr run "$config" --data-dir "$MNIST_DIR" --out "$RUNS/$name" --no-progress $overrides
  if [ -f "$RUNS/$name/summary.json" ]; then
    { echo "--- $name/summary.json"; cat "$RUNS/$name/summary.json"; echo; } >> "$OUT"
  fi
done
echo "all numbers: $OUT (run folders: $RUNS)"
