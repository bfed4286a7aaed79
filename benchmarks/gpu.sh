#!/usr/bin/env bash
# GPU figures in one command, for a lent GPU machine (one H100; JAX, flax, optax, orbax there, no network).
#
#   OUT=/output/dir bash benchmarks/gpu.sh        (from the repo root, with .device_wheels/ carried along)
#
# 1. Installs the wheels in .device_wheels/ (ml-collections, clu, grain, array-record, portpicker, faiss-cpu:
#    what mlcd_jax.train and mlcd_jax.cluster import beyond that image; fetched by the `pip download` line
#    below) into $SITE, unless both already import; mlcd_jax itself comes from the checkout through PYTHONPATH.
# 2. Prints nvidia-smi, the package versions and JAX's devices.
# 3. benchmarks/train_step.py: ViT-L/14 + k = 1M MLCD head, full train step, MFU, head share.
# 4. benchmarks/vit.py: B/16 and L/14 forward and forward+backward.
# 5. benchmarks/embed.py: the clustering job's embed stage on WebDataset tars of 448-px JPEGs, L/14 and
#    B/16 teachers (host decode on all cores overlapping the GPU), against host-only and teacher-only rates.
# 6. benchmarks/kmeans_device.py: a k-means Lloyd iteration and the top-8 assignment against 1M x 768
#    centroids in JAX (faiss-gpu has no wheel here): the GEMM-bound stages' per-device rates.
# Each step runs under `timeout` and leaves NAME.log (+ NAME.json) in $OUT. STEPS="embed vit" runs only
# those steps (default: all).
#
# QUICK=1: the same steps at the benchmarks' --quick sizes with XLA attention, a CPU rehearsal
# (tests/test_benchmarks_gpu.py). The wheels were fetched for the image's CPython 3.12 with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .device_wheels grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 clu==0.0.12 portpicker==1.6.0 \
#     faiss-cpu==1.15.1
set -uo pipefail
: "${OUT:?set OUT to the output folder}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.device_wheels}
SITE=${SITE:-/tmp/mlcd_site}
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}

if [[ ${QUICK:-0} == 1 ]]; then
  attention=xla train_step_s=900 vit_s=300 embed_s=300 kmeans_s=120
  kmeans_args=(--quick)
  train_step_args=(--quick)
  vit_args=(--quick)
  embed_teachers=(quick)
else
  attention=cudnn train_step_s=200 vit_s=75 embed_s=200 kmeans_s=120
  kmeans_args=()
  train_step_args=(--model L/14 --k 1000000 --batch-per-device 64 --iters 10)
  vit_args=(--models B/16 L/14 --batch 64 --iters 5)
  embed_teachers=(L/14 B/16)
fi
STEPS=${STEPS:-train_step vit embed kmeans}
wanted() { [[ " $STEPS " == *" $1 "* ]]; }

# step NAME SECONDS COMMAND...: COMMAND under `timeout`, its output shown and kept in $OUT/NAME.log.
step() {
  local name=$1 seconds=$2 start=$SECONDS
  shift 2
  echo "=== $name (timeout ${seconds} s): $*"
  timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  return "$rc"
}

setup() {
  if ! "$PY" -c "import mlcd_jax.train, mlcd_jax.cluster.stages" 2>/dev/null; then
    echo "installing into $SITE: $(cd "$WHEELS" && echo *.whl)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl || return 1
  fi
  nvidia-smi || echo "(no nvidia-smi)"
  "$PY" - <<'EOF'
import importlib.metadata as md

import jax

import mlcd_jax.cluster.stages  # noqa: F401  (fails here, not mid-benchmark, if a package is missing)
import mlcd_jax.train  # noqa: F401

for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "clu", "ml-collections", "faiss-cpu"):
    print(f"{name} {md.version(name)}")
print("devices:", jax.devices())
EOF
}

setup 2>&1 | tee "$OUT/setup.log"
[[ ${PIPESTATUS[0]} == 0 ]] || { echo "setup failed: see $OUT/setup.log"; exit 1; }
peak=$("$PY" -c "from mlcd_jax.metrics import device_peak_flops as p; v = p(); print(v / 1e12 if v else '')")
status=0
if wanted train_step; then
  step train_step "$train_step_s" "$PY" benchmarks/train_step.py "${train_step_args[@]}" --bf16 \
    --attention "$attention" --json "$OUT/train_step.json" || status=1
fi
if wanted vit; then
  step vit "$vit_s" "$PY" benchmarks/vit.py "${vit_args[@]}" --bf16 --attention "$attention" \
    ${peak:+--peak-tflops "$peak"} --json "$OUT/vit.json" || status=1
fi
if wanted embed; then
  for teacher in "${embed_teachers[@]}"; do
    name=embed_${teacher//\//_}
    if [[ $teacher == quick ]]; then args=(--quick); else args=(--teacher "$teacher"); fi
    step "$name" "$embed_s" "$PY" benchmarks/embed.py "${args[@]}" --json "$OUT/$name.json" || status=1
  done
fi
if wanted kmeans; then
  step kmeans "$kmeans_s" "$PY" benchmarks/kmeans_device.py "${kmeans_args[@]}" --json "$OUT/kmeans.json" || status=1
fi
exit "$status"
