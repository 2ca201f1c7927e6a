#!/usr/bin/env bash
# Training throughput of AlexNet and VGG-16 on one GPU, in bfloat16 and float32, at two batch
# sizes, with model FLOP utilisation; then the JPEG input pipeline's rate on the same host.
# Runs of `python -m cnn_jax.benchmark`, then one table.
#
#   launch/gpu_benchmark.sh                 # about 6-8 minutes on one H100/H200
#   STEPS=50 BATCHES="128" launch/gpu_benchmark.sh
#
# Every model run trains on a fixed synthetic batch already on the GPU (the model's speed
# alone) with the same compiled step as cnn_jax.main; compile_s is the step's compile time.
# MFU = (XLA's FLOP count of the step x steps/s) / the GPU's dense peak for the compute dtype
# (bf16: 989 TFLOP/s on an H100/H200 SXM; float32 runs as TF32 on tensor cores at XLA's
# default precision: 495). PEAK_TFLOPS overrides the lookup (e.g. an H100 PCIe: 756 bf16).
# The input run decodes and augments a folder of generated ImageNet-sized JPEGs (500x375,
# ~110 KB) with AlexNet's training op on this host's CPU cores (`input_images_per_sec`).
# The JSON of each run is kept in $OUT (default /tmp/cnn_jax_gpu_benchmark).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
STEPS="${STEPS:-30}"
BATCHES="${BATCHES:-128 256}"  # AlexNet's batch is 128 (Sec. 5), VGG's 256 (Sec. 3.1)
OUT="${OUT:-/tmp/cnn_jax_gpu_benchmark}"
JPEGS="${JPEGS:-$OUT/jpegs}"
PEAK=()
if [[ -n "${PEAK_TFLOPS:-}" ]]; then PEAK=(--peak_tflops="$PEAK_TFLOPS"); fi
mkdir -p "$OUT"

# CPU_DRY_RUN=1 runs the whole script on the CPU (with PYTHON= a wrapper that shrinks the
# models, e.g. adding --config.model.width_divisor=16 --config.input.image_size=64): a check of the
# script itself, not a measurement.
"$PYTHON" -c "import jax; d = jax.devices()[0]; print(f'{jax.device_count()} x {d.device_kind}'); \
assert jax.default_backend() == 'gpu' or '${CPU_DRY_RUN:-0}' == '1', \
'no GPU visible to JAX (pip install jax[cuda12])'"

run() {  # name, config file, batch size, half precision (True/False)
  echo "== $1" >&2
  # --config first: its --config.FIELD overrides must follow it. One GPU: AlexNet's two
  # towers run on it together (the mesh is chosen per machine and says so on stderr).
  timeout 300 "$PYTHON" -m cnn_jax.benchmark --config="$2" --config.input.batch_size="$3" \
    --config.run.half_precision="$4" --config.data.name=synthetic \
    --steps="$STEPS" --warmup=5 --input_steps=0 "${PEAK[@]}" > "$OUT/$1.json"
}

names=()
for batch in $BATCHES; do
  for dtype in bf16 f32; do
    half=$([[ $dtype == bf16 ]] && echo True || echo False)
    run "alexnet_${dtype}_b$batch" configs/alexnet.py "$batch" "$half"
    run "vgg16_${dtype}_b$batch" configs/vgg.py:D "$batch" "$half"
    names+=("alexnet_${dtype}_b$batch" "vgg16_${dtype}_b$batch")
  done
done

echo "== input pipeline (AlexNet's training op, $(nproc) CPU cores)" >&2
"$PYTHON" - "$JPEGS" <<'EOF_JPEGS'
import os, sys
import numpy as np
from PIL import Image
root = sys.argv[1]
rng = np.random.default_rng(0)
for split, per_class in (("train", 256), ("val", 8)):
    for label in range(2):
        folder = os.path.join(root, split, f"class{label}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            # Smooth structure plus noise: ~110 KB at quality 90, like an ImageNet photo.
            y, x = np.mgrid[0:375, 0:500] / 40.0
            base = 127 + 60 * np.sin(x + i) * np.cos(y - label)
            pixels = base[..., None] + rng.normal(0, 18, (375, 500, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            image.save(os.path.join(folder, f"{i}.jpg"), quality=90)
EOF_JPEGS
timeout 300 "$PYTHON" -m cnn_jax.benchmark --config=configs/alexnet.py --config.input.batch_size=256 \
  --config.data.name=image_folder --config.data.manual_dir="$JPEGS" --config.data.num_classes=2 \
  --steps=2 --warmup=1 --input_steps=20 > "$OUT/input_alexnet.json"

"$PYTHON" - "$OUT" "${names[@]}" <<'EOF_TABLE'
import json, pathlib, sys

out, names = sys.argv[1], sys.argv[2:]
load = lambda name: json.loads(pathlib.Path(out, f"{name}.json").read_text().splitlines()[-1])
rows = []
for name in names:
    r = load(name)
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    rows.append((name, r["device_kind"], r["batch_size"], f"{r['images_per_sec']:,.0f}",
                 f"{r['step_ms']:.1f}", f"{r['flops_per_image'] / 1e9:.2f}",
                 f"{r['achieved_flops_per_sec'] / 1e12:.1f}", mfu, f"{r['compile_s']:.0f}"))
head = ("run", "device", "batch", "images/s", "step ms", "GFLOP/image", "TFLOP/s", "MFU",
        "compile s")
widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
for row in (head, *rows):
    print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
print(f"input pipeline, AlexNet training op on generated 500x375 JPEGs: "
      f"{load('input_alexnet')['input_images_per_sec']:,.0f} images/s")
EOF_TABLE
