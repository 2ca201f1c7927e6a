"""What a user sees: every entry point prints only cnn_jax's own lines, on any CPU, and the
design card's AlexNet command runs on whatever devices the machine has.

TensorFlow prints two oneDNN start-up lines on stderr on CPUs where it turns its oneDNN ops
on by default (AVX-512, AMX) and not on others (AVX2). These tests force the condition with
TF_ENABLE_ONEDNN_OPTS=1, so they check the same thing on every machine, and run real
processes without the 8 emulated devices of conftest.py (no XLA_FLAGS), as a user's shell
would start them.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

# What cnn_jax itself prints on stdout during a run (train.py, experiment.resolve,
# data.datasets); anything else came from a library.
OWN_STDOUT = (
    "mesh: ", "data: ", "step ", "first step after ", "Resuming ", "Training already finished",
)  # fmt: skip


def _run(*args, cwd=REPO):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")
    }
    env |= {"TF_ENABLE_ONEDNN_OPTS": "1", "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_a_mistake_is_one_line_from_every_entry_point(tmp_path):
    lenet = f"--config={CONFIGS}/lenet.py"
    commands = {
        "main": ["cnn_jax.main", lenet, "--config.model.name=lenet7", f"--workdir={tmp_path}/w"],
        "summary": ["cnn_jax.summary", lenet, "--config.model.name=lenet7"],
        "benchmark": ["cnn_jax.benchmark", lenet, "--config.model.name=lenet7"],
        "visualize": ["cnn_jax.visualize", f"--workdir={tmp_path}/missing"],
    }
    for name, command in commands.items():
        proc = _run(*command)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert len(proc.stderr.splitlines()) == 1, (name, proc.stderr[-2000:])
        assert proc.stderr.startswith("error: "), (name, proc.stderr[-2000:])
        assert proc.stdout == "", (name, proc.stdout[-2000:])


def _alexnet_command(workdir, *extra):
    """The design card's command, on synthetic data and at a sixteenth of the width."""
    return [
        "cnn_jax.main", f"--config={CONFIGS}/alexnet.py", f"--workdir={workdir}",
        "--config.data.name=synthetic", "--config.input.batch_size=8",
        "--config.run.num_train_steps=2", "--config.model.width_divisor=16",
        "--config.input.image_size=64", "--config.data.num_classes=10",
        "--config.data.synthetic_train_size=16", "--config.data.synthetic_eval_size=8",
        "--config.run.progress_bar=False", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "extra, mesh_line",
    [
        # A laptop or one GPU: configs/alexnet.py's CPU default is one XLA device.
        ((), "mesh: alexnet's 2 towers together on each of the 1 device(s) (data=1 x model=1)"),
        # The cores as two XLA devices: a tower on each, the paper's split.
        (("--config.mesh.cpu_devices=2",), "mesh: alexnet's 2 towers on separate devices"),
    ],
)
def test_the_design_card_command_runs_on_this_machine_and_prints_only_its_own_lines(
    tmp_path, extra, mesh_line
):
    workdir = tmp_path / "alexnet"
    proc = _run(*_alexnet_command(workdir, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(mesh_line), lines
    assert all(line.startswith(OWN_STDOUT) for line in lines), lines
    with open(workdir / "config.json") as f:  # the mesh that ran is the one recorded
        assert json.load(f)["mesh"]["model"] == (2 if extra else 1)
    # Its pictures, from another entry point, as quietly.
    pictures = _run("cnn_jax.visualize", f"--workdir={workdir}", f"--out={tmp_path}/png")
    assert pictures.returncode == 0 and pictures.stderr == "", pictures.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "png")) == ["alexnet_conv1.png", "curves.png"]
