#!/usr/bin/env bash
# Training throughput of AlexNet and VGG-16 on one GPU, in bfloat16 and float32, with model
# FLOP utilisation: four runs of `python -m cnn_jax.benchmark`, then one table.
#
#   launch/gpu_benchmark.sh                 # about 3-4 minutes on one H100
#   STEPS=50 BATCH_VGG=256 launch/gpu_benchmark.sh
#
# Every run trains on a fixed synthetic batch already on the GPU (the model's speed alone)
# with the same compiled step as cnn_jax.main. MFU = (XLA's FLOP count of the step x steps/s)
# / the GPU's dense peak for the compute dtype (bf16: 989 TFLOP/s on an H100 SXM; float32
# runs as TF32 on tensor cores at XLA's default precision: 495). PEAK_TFLOPS overrides the
# lookup (e.g. an H100 PCIe: 756 bf16). The JSON of each run is kept in $OUT (default
# /tmp/cnn_jax_gpu_benchmark).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
STEPS="${STEPS:-30}"
BATCH_ALEXNET="${BATCH_ALEXNET:-128}"  # AlexNet's batch (Sec. 5)
BATCH_VGG="${BATCH_VGG:-128}"          # half of VGG's 256 (Sec. 3.1) keeps the runs short
OUT="${OUT:-/tmp/cnn_jax_gpu_benchmark}"
PEAK=()
if [[ -n "${PEAK_TFLOPS:-}" ]]; then PEAK=(--peak_tflops="$PEAK_TFLOPS"); fi
mkdir -p "$OUT"

"$PYTHON" -c "import jax; d = jax.devices()[0]; print(f'{jax.device_count()} x {d.device_kind}'); \
assert jax.default_backend() == 'gpu', 'no GPU visible to JAX (pip install jax[cuda12])'"

run() {  # name, config file, batch size, half precision (True/False)
  echo "== $1" >&2
  # --config first: its --config.FIELD overrides must follow it. One GPU: AlexNet's two
  # towers run on it together (mesh_model=1).
  timeout 240 "$PYTHON" -m cnn_jax.benchmark --config="$2" --config.batch_size="$3" \
    --config.half_precision="$4" --config.dataset=synthetic --config.mesh_model=1 \
    --steps="$STEPS" --warmup=5 --input_steps=0 "${PEAK[@]}" > "$OUT/$1.json"
}

for dtype in bf16 f32; do
  half=$([[ $dtype == bf16 ]] && echo True || echo False)
  run "alexnet_$dtype" configs/alexnet.py "$BATCH_ALEXNET" "$half"
  run "vgg16_$dtype" configs/vgg.py:D "$BATCH_VGG" "$half"
done

"$PYTHON" - "$OUT" <<'EOF'
import json, pathlib, sys

rows = []
for name in ("alexnet_bf16", "alexnet_f32", "vgg16_bf16", "vgg16_f32"):
    r = json.loads(pathlib.Path(sys.argv[1], f"{name}.json").read_text().strip().splitlines()[-1])
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    rows.append((name, r["device_kind"], r["batch_size"], f"{r['images_per_sec']:,.0f}",
                 f"{r['step_ms']:.1f}", f"{r['flops_per_image'] / 1e9:.2f}",
                 f"{r['achieved_flops_per_sec'] / 1e12:.1f}", mfu, f"{r['compile_s']:.0f}"))
head = ("run", "device", "batch", "images/s", "step ms", "GFLOP/image", "TFLOP/s", "MFU",
        "compile s")
widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
for row in (head, *rows):
    print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
EOF
