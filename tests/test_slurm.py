"""SLURM jobs (launch/slurm.sh): two tasks on this host, started with the variables srun
gives a step's tasks, find each other through JAX's own SLURM detection and give the
one-process losses; and which SLURM environments cnn_jax runs as one process."""

import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys

import multiprocess_worker as worker
import numpy as np
import pytest

from cnn_jax import cli, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "slurm.sh")

# Stands in for srun on this one host: SLURM_NTASKS copies of the command, each with the
# variables srun and slurmstepd give a task of a step (Slurm's src/common/env.c,
# env_array_for_step), and all of them ended when one fails (--kill-on-bad-exit).
FAKE_SRUN = r"""#!/usr/bin/env bash
while [[ "${1:-}" == -* ]]; do shift; done
export SLURM_STEP_ID=0 SLURM_STEP_NODELIST="$SLURM_JOB_NODELIST" SLURM_STEP_NUM_NODES=1 \
  SLURM_STEP_NUM_TASKS="$SLURM_NTASKS" SLURM_NODEID=0
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=("$!")
done
status=0
for ((k = 0; k < SLURM_NTASKS; k++)); do
  code=0
  wait -n || code=$?
  if [[ $code != 0 && $status == 0 ]]; then status=$code; kill "${pids[@]}" 2>/dev/null || true; fi
done
exit "$status"
"""

# Launchers' variables that would give the processes a job other than the simulated one.
_LAUNCHER_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "JAX_", "OMPI_", "PMIX_", "TPU_", "CNN_JAX_")


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    # A proxy can stall the coordinator's gRPC connections (jax.distributed.initialize's
    # docstring); XLA_FLAGS carries the test session's 8 devices.
    return {k: v for k, v in env.items() if "_proxy" not in k.lower() and k != "XLA_FLAGS"}


def _job_id_with_a_free_port() -> str:
    """A SLURM_JOB_ID whose coordinator port (JAX: 61440 + id % 4096) is free now."""
    for port in random.sample(range(61440, 65536), 200):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return str(1000 * 4096 + port - 61440)
    pytest.skip("no free port in JAX's SLURM range 61440-65535")


def test_two_slurm_tasks_form_one_mesh_with_the_losses_of_one(tmp_path):
    """launch/slurm.sh, as a two-task batch job on this host: each task has 4 CPU devices,
    and nothing but the SLURM variables tells JAX the coordinator, the job's size or the
    task's rank. Their 4x2 mesh spans both processes and gives the one-process 4x2 losses."""
    srun = tmp_path / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    env = _clean_env()
    env.update({
        # What sbatch gives the batch script of `--nodes=1 --ntasks-per-node=2`.
        "SLURM_JOB_ID": _job_id_with_a_free_port(), "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_NTASKS": "2",
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
        "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": REPO, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
    })  # fmt: skip
    command = [SCRIPT, sys.executable, os.path.join(REPO, "tests", "multiprocess_worker.py")]
    job = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = job.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # the tasks too, not only the script
        out, err = job.communicate()
        pytest.fail(f"the job did not finish: {err[-3000:]}")
    assert job.returncode == 0, err[-3000:]
    result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert (result["processes"], result["devices"]) == (2, 8)
    assert result["mesh"] == {"data": 4, "model": 2}

    trainer = train.build_trainer(worker.config(mesh_model=2))  # this process's 8 devices: 4x2
    _, reference = worker.run_steps(trainer, worker.initial_state(trainer))
    for key in ("loss", "grad_norm"):
        got, want = ([m[key] for m in ms] for ms in (result["metrics"], reference))
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=key)


# --- Which environments join a job ----------------------------------------------------------------

_TASK = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16",
         "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_STEP_NUM_TASKS": "16",
         "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}  # fmt: skip
_ALLOCATION = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16"}


def _set_only(monkeypatch, env: dict) -> None:
    for name in list(os.environ):
        if name.startswith(_LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    "env, joins",
    [
        (_TASK, True),  # a task of launch/slurm.sh's srun step
        ({**_TASK, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}, False),  # one task
        ({**_ALLOCATION, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, False),  # batch script
        (_ALLOCATION, False),  # an salloc shell
        ({**_TASK, "SLURM_STEP_NUM_TASKS": "1"}, False),  # salloc's interactive step
        ({"SLURM_JOB_ID": "4242"}, False),  # ssh into a node of the job
    ],
)
def test_only_tasks_of_a_multi_task_step_join_a_job(monkeypatch, env, joins):
    """Outside an srun step SLURM_NTASKS counts the allocation's tasks, not running
    processes: calling jax.distributed.initialize there would fail (no step node list, so
    no coordinator) or wait for tasks that never start."""
    _set_only(monkeypatch, env)
    assert cli._launched_as_multi_process() is joins


def test_a_step_that_kept_the_allocations_task_count_states_its_own(monkeypatch):
    """srun --preserve-env -n 4 in a 16-task allocation leaves SLURM_NTASKS=16, which JAX
    would wait for; the step's own count goes to jax.distributed.initialize instead."""
    _set_only(monkeypatch, _TASK)
    assert cli._process_args() == {}  # JAX reads SLURM_NTASKS itself
    _set_only(monkeypatch, {**_TASK, "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1"})
    assert cli._process_args() == {"num_processes": 4}


@pytest.mark.parametrize(
    "args, env, message",
    [
        ([], {"SLURM_JOB_ID": "4242"}, "error: no command"),
        (["python", "-m", "cnn_jax.main"], {}, "error: not inside a SLURM job"),
    ],
)
def test_slurm_script_mistakes_are_one_line(args, env, message):
    env = {**_clean_env(), **env}
    done = subprocess.run([SCRIPT, *args], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1
