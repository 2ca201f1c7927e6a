#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: every host of the slice runs the same command
# (`gcloud compute tpus tpu-vm ssh --worker=all`), and the processes join through
# jax.distributed, which reads the slice's layout from the VM metadata (worker 0 is the
# coordinator, port 8482; jax/_src/clusters/cloud_tpu_cluster.py).
#
#   launch/tpu_vm.sh create                      # the TPU VM slice
#   launch/tpu_vm.sh install                     # this checkout + jax[tpu] on every host
#   launch/tpu_vm.sh train --config=configs/alexnet.py --workdir=gs://BUCKET/alexnet \
#       --config.data.data_dir=gs://BUCKET/tensorflow_datasets   # the same command on every host
#   launch/tpu_vm.sh ssh 'python -c "import jax; print(jax.device_count())"'
#   launch/tpu_vm.sh delete
#
# Settings (environment): TPU_NAME (cnn-jax), ZONE (us-central2-b), ACCELERATOR (v4-16: 2 hosts
# x 4 chips), VERSION (the TPU software version for ACCELERATOR's generation, from
# https://cloud.google.com/tpu/docs/runtimes: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
# v5e/v5litepod v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base), PROJECT (gcloud's
# default), CREATE_FLAGS (more `tpu-vm create` flags, e.g. --spot), PYTHON (python3.11).
#
# The images are Ubuntu 22.04, whose python3 is 3.10; cnn_jax and jax >= 0.10 need 3.11 or
# newer, so `install` makes a virtual environment (~/cnn_jax_venv) from PYTHON, installing
# that from Ubuntu's archive when the image lacks it, and `train` and `ssh` run in it.
#
# The workdir must be storage every host sees: a gs:// bucket (Orbax writes checkpoints there
# from every host, process 0 writes metrics). The dataset must be readable on every host
# (--config.data.data_dir=gs://... for a prepared TFDS copy). A v4-16 slice has 8 TensorCore
# devices, so configs/alexnet.py runs a 4x2 mesh: 4-way data parallel, the towers on pairs.
# Only checked on paper against Google's documentation (docs/multihost.md says which pages).
set -euo pipefail

TPU_NAME="${TPU_NAME:-cnn-jax}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-16}"
case "$ACCELERATOR" in
  v6e-*) default_version=v2-alpha-tpuv6e ;;
  v5p-*) default_version=v2-alpha-tpuv5 ;;
  v5litepod-* | v5e-*) default_version=v2-alpha-tpuv5-lite ;;
  *) default_version=tpu-ubuntu2204-base ;;
esac
VERSION="${VERSION:-$default_version}"
PYTHON="${PYTHON:-python3.11}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi
read -r -a EXTRA_CREATE_FLAGS <<<"${CREATE_FLAGS:-}"
REMOTE_DIR="cnn_jax"
VENV="cnn_jax_venv"  # in the remote home directory, where ssh commands start
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all --command="$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$VERSION" "${EXTRA_CREATE_FLAGS[@]}"
    ;;
  install)
    # The working tree as it is here (tracked and untracked files, no venv or runs; files
    # deleted here but still tracked are left out, which tar would otherwise stop at).
    archive="$(mktemp -d -t cnn_jax.XXXXXX)/cnn_jax.tar.gz"
    (cd "$HERE" && git ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done \
      | tar --null -T - -czf "$archive")
    gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":cnn_jax.tar.gz --zone="$ZONE" \
      "${PROJECT_FLAG[@]}" --worker=all
    on_all_hosts "set -e
      command -v $PYTHON >/dev/null || { sudo apt-get update -qq \
        && sudo apt-get install -y -qq $PYTHON $PYTHON-venv; }
      rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf cnn_jax.tar.gz -C $REMOTE_DIR
      $PYTHON -m venv $VENV
      $VENV/bin/python -m pip install -q --upgrade pip
      $VENV/bin/python -m pip install -q -e ./$REMOTE_DIR 'jax[tpu]'"
    rm -rf "$(dirname "$archive")"
    ;;
  train)
    shift
    # Quote every argument for the remote shell.
    args=$(printf ' %q' "$@")
    on_all_hosts "cd $REMOTE_DIR && CNN_JAX_MULTIPROCESS=1 ~/$VENV/bin/python -m cnn_jax.main$args"
    ;;
  ssh)
    if [[ $# -lt 2 ]]; then
      echo "error: no command; usage: $0 ssh 'COMMAND' (run on every host, in the venv)" >&2
      exit 2
    fi
    on_all_hosts "PATH=~/$VENV/bin:\$PATH; $2"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --quiet
    ;;
  *)
    echo "error: usage: $0 create | install | train ARGS... | ssh COMMAND | delete (see the header)" >&2
    exit 2
    ;;
esac
