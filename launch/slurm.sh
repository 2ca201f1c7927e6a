#!/usr/bin/env bash
#SBATCH --job-name=cnn_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=slurm-%x-%j.out
#
# Train on SLURM GPU nodes: one task per GPU, every task running the same command under srun.
# The tasks find each other through jax.distributed.initialize() with no arguments, which
# cnn_jax/cli.py calls in every task of a step with more than one task; JAX reads the rest
# from the variables srun gives each task (jax/_src/clusters/slurm_cluster.py):
#
#   SLURM_JOB_ID         the coordinator's port: 61440 + SLURM_JOB_ID % 4096
#                        (JAX_COORDINATOR_PORT replaces it, for a port already taken)
#   SLURM_STEP_NODELIST  the coordinator's host: the first node of the step (JAX misreads
#                        names with two bracket ranges, rack[1-2]-n[01-04]; for those, add
#                        export JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames \
#                          "$SLURM_JOB_NODELIST" | head -n 1):61440"  before srun below)
#   SLURM_NTASKS         the number of processes
#   SLURM_PROCID         this process's id (task 0, on the first node, runs the coordinator)
#   SLURM_LOCALID        the GPU this process drives: the SLURM_LOCALID-th of those it sees
#
# Submit from the checkout, with its virtual environment active (sbatch passes the
# environment on; the venv, the checkout and the workdir must be on a filesystem every node
# sees). Everything after the script's name is the command each task runs:
#
#   sbatch launch/slurm.sh python -m cnn_jax.main --config=configs/alexnet.py \
#       --workdir=/shared/runs/alexnet --config.data.manual_dir=/shared/imagenet
#
# Other sizes: sbatch's own flags override the lines above, e.g. one node of 4 GPUs:
#   sbatch --nodes=1 --ntasks-per-node=4 --gpus-per-node=4 launch/slurm.sh python -m ...
# Keep --ntasks-per-node equal to the GPUs per node.
#
# Why --gpus-per-node and not --gpus-per-task=1: JAX gives task SLURM_LOCALID the
# SLURM_LOCALID-th GPU it can see, so every task must see all of its node's GPUs; with
# --gpus-per-task=1 each task sees one GPU (ordinal 0) and tasks 1.. find no device of their
# ordinal. (Where a site insists on --gpus-per-task=1, export JAX_LOCAL_DEVICE_IDS=0 as well.)
#
# The workdir must be a filesystem all nodes see: every process writes its part of each
# Orbax checkpoint there, and process 0 the logs. --signal=TERM@300 sends the tasks SIGTERM
# five minutes before the time limit: they save the step they are at and exit 0, and
# submitting the same command again continues from that checkpoint.
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "error: no command; usage: sbatch $0 python -m cnn_jax.main --config=... --workdir=..." >&2
  exit 2
fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "error: not inside a SLURM job; submit it: sbatch $0 $*" >&2
  exit 2
fi

# launch/processes.sh's count and rank, left in the submitting shell, would override SLURM's
# and give every task the same rank. (JAX_COORDINATOR_ADDRESS stays: it is the way to name
# the coordinator where JAX cannot parse the node list; docs/multihost.md.)
unset JAX_NUM_PROCESSES JAX_PROCESS_ID

# One failed task ends the step at once, not at the others' next collective (JAX's
# heartbeat timeout).
exec srun --kill-on-bad-exit=1 "$@"
