#!/usr/bin/env bash
# Start the processes of one multi-process JAX job on this host; they join through
# jax.distributed (cnn_jax/cli.py reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
# JAX_PROCESS_ID). Every process runs the same command; each reads only its shard of the data,
# process 0 writes the logs, all of them write their part of each checkpoint.
#
# One host, CPU only (what the tests and a laptop can run): 2 processes x 4 emulated devices,
# joined on a loopback coordinator, training AlexNet on a 4x2 mesh:
#
#   launch/processes.sh -n 2 --cpu-devices 4 -- python -m cnn_jax.main \
#       --config=configs/alexnet.py --workdir=/tmp/alexnet_2proc --config.data.name=synthetic \
#       --config.data.num_classes=10 --config.input.batch_size=8 --config.run.num_train_steps=4 \
#       --config.data.synthetic_train_size=64 --config.data.synthetic_eval_size=16
#
# Several GPU hosts (M nodes, one process per GPU; run the same line on every node, with its
# own --node-rank, and node 0's address as the coordinator):
#
#   launch/processes.sh -n 8 --gpu-per-process --nodes 2 --node-rank 0 \
#       --coordinator node0.example:8476 -- python -m cnn_jax.main --config=configs/alexnet.py \
#       --workdir=/shared/runs/alexnet --config.data.manual_dir=/shared/imagenet
#
# or one process per host seeing all its GPUs: -n 1 (without --gpu-per-process). The workdir
# must be a filesystem every host sees (NFS, or gs://... for Orbax).
#
# Options:
#   -n N                processes to start on this host (default 2)
#   --cpu-devices K     run on the CPU with K emulated devices per process (XLA_FLAGS)
#   --gpu-per-process   give process i of this host GPU i alone (CUDA_VISIBLE_DEVICES=i)
#   --nodes M           hosts in the job (default 1); process ids are node_rank * N + i
#   --node-rank R       this host's rank (default 0)
#   --coordinator H:P   process 0's address (default 127.0.0.1 and a free port; with
#                       --nodes > 1 it is required)
#   --log-dir DIR       where processes other than 0 write their output (default: a temp dir)
# Processes other than this host's first print to DIR/process_<id>.log; process 0's output
# is this terminal's. The script exits with the first failing process's status (stopping
# the others), or 0.
set -euo pipefail

n=2 cpu_devices="" gpu_per_process=0 nodes=1 node_rank=0 coordinator="" log_dir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) n="$2"; shift 2 ;;
    --cpu-devices) cpu_devices="$2"; shift 2 ;;
    --gpu-per-process) gpu_per_process=1; shift ;;
    --nodes) nodes="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --coordinator) coordinator="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "error: no command; usage: $0 [-n N] [--cpu-devices K] ... -- python -m cnn_jax.main ..." >&2
  exit 2
fi
if [[ -z "$coordinator" ]]; then
  if [[ "$nodes" -gt 1 ]]; then
    echo "error: --coordinator HOST:PORT (node 0's address) is required with --nodes > 1" >&2
    exit 2
  fi
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  coordinator="127.0.0.1:${port}"
fi
log_dir="${log_dir:-$(mktemp -d -t cnn_jax_processes.XXXXXX)}"
mkdir -p "$log_dir"

export JAX_COORDINATOR_ADDRESS="$coordinator"
export JAX_NUM_PROCESSES=$((nodes * n))
if [[ -n "$cpu_devices" ]]; then
  export JAX_PLATFORMS=cpu
  # Replaces a device count already in XLA_FLAGS (a test environment's 8, say).
  other_flags=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
  export XLA_FLAGS="${other_flags} --xla_force_host_platform_device_count=${cpu_devices}"
fi

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < n; i++)); do
  id=$((node_rank * n + i))
  (
    export JAX_PROCESS_ID="$id"
    if [[ "$gpu_per_process" == 1 ]]; then export CUDA_VISIBLE_DEVICES="$i"; fi
    if [[ "$i" == 0 ]]; then
      exec "$@"
    else
      exec "$@" >"$log_dir/process_${id}.log" 2>&1
    fi
  ) &
  pids+=("$!")
done
if [[ "$n" -gt 1 ]]; then
  echo "processes ${node_rank}*${n}+0..$((n - 1)) of ${JAX_NUM_PROCESSES}, coordinator ${coordinator}; logs of the others in ${log_dir}" >&2
fi

# Whichever process ends first: a failure stops the others (they would otherwise wait for it
# at the next collective until JAX's heartbeat timeout).
status=0
for ((k = 0; k < n; k++)); do
  code=0
  wait -n || code=$?
  if [[ "$code" != 0 && "$status" == 0 ]]; then status=$code; stop_all; fi
done
exit "$status"
