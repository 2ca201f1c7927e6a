#!/usr/bin/env bash
# The CPU table of docs/performance.md in one run: each model and mode against the PyTorch
# reference (benchmarks/torch_reference.py), 3 alternated rounds each, float32, synthetic
# batches. Needs PyTorch (pip install -e '.[torch]'); run it on an otherwise idle machine.
#
#   benchmarks/cpu_table.sh [OUT_DIR]      # default /tmp/cpu_table; prints the Markdown rows
#
# Each row's JSON line is kept in OUT_DIR/<row>.json; benchmarks/cpu_table.py formats them.
set -euo pipefail
out=${1:-/tmp/cpu_table}
mkdir -p "$out"
py=${PYTHON:-python}
here=$(cd "$(dirname "$0")" && pwd)
common=(--input_steps=0 --rounds=3)
row() {
  local name=$1; shift
  echo "== $name: $*" >&2
  "$py" "$here/torch_reference.py" "$@" "${common[@]}" | tail -n 1 > "$out/$name.json"
}
row lenet5 --config=configs/lenet.py --config.input.batch_size=128 --steps=60 --warmup=5
row alexnet_one_device --config=configs/alexnet.py --config.data.name=synthetic \
    --config.input.batch_size=32 --config.mesh.model=1 --steps=9 --warmup=1
row alexnet_towers_two_devices --config=configs/alexnet.py --config.data.name=synthetic \
    --config.input.batch_size=32 --config.mesh.model=2 --config.mesh.cpu_devices=2 --steps=9 --warmup=1
row vgg_a --config=configs/vgg.py:A --config.data.name=synthetic --config.input.batch_size=16 \
    --steps=6 --warmup=1
row vgg_d --config=configs/vgg.py:D --config.data.name=synthetic --config.input.batch_size=8 \
    --steps=6 --warmup=1
"$py" "$here/cpu_table.py" "$out"
