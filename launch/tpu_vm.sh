#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: every host of the slice runs the same command
# (`gcloud compute tpus tpu-vm ssh --worker=all`), and the processes join through
# jax.distributed, which reads the slice's layout from the VM metadata.
#
#   launch/tpu_vm.sh create                      # the TPU VM slice
#   launch/tpu_vm.sh install                     # this checkout + jax[tpu] on every host
#   launch/tpu_vm.sh train --config=configs/alexnet.py --workdir=gs://BUCKET/alexnet \
#       --config.manual_dir=/mnt/imagenet        # the same command on every host
#   launch/tpu_vm.sh ssh 'python3 -c "import jax; print(jax.device_count())"'
#   launch/tpu_vm.sh delete
#
# Settings (environment): TPU_NAME (cnn-jax), ZONE (us-central2-b), ACCELERATOR (v4-16: 2 hosts
# x 4 chips), VERSION (tpu-ubuntu2204-base), PROJECT (gcloud's default).
#
# The workdir must be storage every host sees: a gs:// bucket (Orbax writes checkpoints there
# from every host, process 0 writes metrics). The dataset must be readable on every host
# (--config.data_dir=gs://... for a prepared TFDS copy). A v4-16 slice has 8 TensorCore
# devices, so configs/alexnet.py runs a 4x2 mesh: 4-way data parallel, the towers on pairs.
set -euo pipefail

TPU_NAME="${TPU_NAME:-cnn-jax}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-16}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi
REMOTE_DIR="cnn_jax"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all --command="$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$VERSION"
    ;;
  install)
    # The working tree as it is here (tracked and untracked files, no venv or runs).
    archive="$(mktemp -t cnn_jax.XXXXXX).tar.gz"
    (cd "$HERE" && git ls-files --cached --others --exclude-standard -z \
      | xargs -0 tar -czf "$archive")
    gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":cnn_jax.tar.gz --zone="$ZONE" \
      "${PROJECT_FLAG[@]}" --worker=all
    on_all_hosts "rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf cnn_jax.tar.gz -C $REMOTE_DIR \
      && python3 -m pip install --upgrade pip && python3 -m pip install -e ./$REMOTE_DIR 'jax[tpu]'"
    rm -f "$archive"
    ;;
  train)
    shift
    # Quote every argument for the remote shell.
    args=$(printf ' %q' "$@")
    on_all_hosts "cd $REMOTE_DIR && CNN_JAX_MULTIPROCESS=1 python3 -m cnn_jax.main$args"
    ;;
  ssh)
    on_all_hosts "$2"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --quiet
    ;;
  *)
    echo "usage: $0 create | install | train ARGS... | ssh COMMAND | delete (see the header)" >&2
    exit 2
    ;;
esac
