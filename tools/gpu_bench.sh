#!/usr/bin/env bash
# Every GPU measurement BENCHMARKS.md asks for, in one run that a short device lease affords:
# the training cases against the naive reference, gpt2-124m again under GPU XLA flags,
# decoding, then a profiler trace of gpt2-124m's step. Each stage appends its JSON lines as it
# finishes, so a run cut short keeps what it measured; a stage that fails or overruns its limit
# is logged and the next one runs.
#
#   bash tools/gpu_bench.sh OUT_DIR          # on the GPU machine, from the repository root
#   CASES=lm-tiny FLAG_CASES= DECODE_CASES=lm-tiny PROFILE_CASES= STEPS=3 \
#     bash tools/gpu_bench.sh /tmp/out    # the same stages on a CPU
#
# The device machine gets the checkout but not ../shared beside it, and its image lacks
# ml_collections (../shared/DESIGN.md). So, before the call, fill ./bench_kit (git-ignored; name
# it in the device call's carry):
#   pip download --no-deps ml-collections -d bench_kit
#   cp ../shared/bench/naive_reference.py bench_kit/
# The wheels are installed when ml_collections is missing (its PyYAML and absl come with
# transformers and orbax there), and the reference is read from ../shared when it is beside the
# checkout, else from bench_kit.
set -u
out=${1:?usage: tools/gpu_bench.sh OUT_DIR}
mkdir -p "$out"
steps=${STEPS:-20}
limit=${LIMIT:-120}  # seconds per stage
cases=${CASES-gpt2-124m,vit-b16,early-fusion,deep-fusion,llama-1b}
flag_cases=${FLAG_CASES-gpt2-124m}
decode_cases=${DECODE_CASES-gpt2-124m,llama-1b}
profile_cases=${PROFILE_CASES-gpt2-124m}  # traced last: where the step's time goes
# Flags measured against the defaults: cuBLAS instead of Triton for GEMMs, and the latency-hiding
# scheduler (MaxText's GPU settings; unknown flags abort jax, which the log then shows).
gpu_flags=${GPU_FLAGS---xla_gpu_enable_triton_gemm=false --xla_gpu_enable_latency_hiding_scheduler=true}

reference=${REFERENCE:-../shared/bench/naive_reference.py}
[ -f "$reference" ] || reference=bench_kit/naive_reference.py
if ! python -c "import ml_collections" 2>/dev/null; then
  pip install -q --no-deps bench_kit/*.whl >> "$out/log.txt" 2>&1
fi
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1
  python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  date -u
  echo "reference $reference"
} > "$out/environment.txt" 2>&1

stage() {  # output name, then tools/bench.py's arguments
  local name=$1
  shift
  echo "== $name $*" >> "$out/log.txt"
  timeout "$limit" python tools/bench.py "$@" >> "$out/$name.jsonl" 2>> "$out/log.txt" \
    || echo "== $name $*: exit $?" >> "$out/log.txt"
}

for case in ${cases//,/ }; do
  stage train --cases "$case" --steps "$steps" --reference "$reference"
done
for case in ${flag_cases//,/ }; do
  XLA_FLAGS="${XLA_FLAGS:-} $gpu_flags" stage train_flags --cases "$case" --steps "$steps" \
    --reference "$reference"
done
for case in ${decode_cases//,/ }; do
  stage decode --decode --cases "$case" --steps "$steps"
done
for case in ${profile_cases//,/ }; do
  stage profile --cases "$case" --steps 3 --reference "" --profile "$out/profile"
done
echo "done $(date -u)" >> "$out/log.txt"
