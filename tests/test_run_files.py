"""What the tools read back from a workdir and where they write: a metrics.jsonl or config.json
that is not what a run wrote, a checkpoint that does not restore, an output folder that is a
file, empty or cannot be created, benchmark counts out of range, a summary of LeNet-5 with
other than ten classes. Each is one line (a warning, or an error), never a traceback. No model
is compiled here."""

import contextlib
import io
import json
import os

import numpy as np
import pytest

from cnn_jax import benchmark, defaults, reporting, visualize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENET_CONFIG = os.path.join(REPO, "configs", "lenet.py")

RECORDS = [
    {"step": 1, "split": "train", "loss": 2.3, "accuracy": 0.1},
    {"step": 1, "split": "eval", "loss": 2.2, "accuracy": 0.2},
]


def _recorded(model: str) -> str:
    """The config.json of a run of `model` (its resolved config)."""
    return json.dumps(defaults.get_default_config(model).to_dict())


def _workdir(tmp_path, config=None, metrics=RECORDS, tail=""):
    """A run's folder as visualize reads it (vgg: curves only, no checkpoint needed)."""
    config = _recorded("vgg") if config is None else config
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(config)
    lines = "".join(json.dumps(r) + "\n" for r in metrics)
    (workdir / "metrics.jsonl").write_text(lines + tail)
    return workdir


def _exit_status_and_stderr(main, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, err.getvalue()


def test_lines_that_are_not_records_are_skipped_with_one_warning(tmp_path, capsys):
    workdir = _workdir(tmp_path, tail='[1, 2]\n{"step": 2, "split": "tr')  # a hand edit, a cut
    out = tmp_path / "pictures"
    written = visualize.write_pictures(str(workdir), str(out))
    assert written == [str(out / "curves.png")] and os.path.getsize(written[0]) > 0
    assert capsys.readouterr().err == (
        f"warning: {workdir}/metrics.jsonl: skipped 2 lines (3, 4), which are not metrics "
        "records (a write cut short, or an edit)\n"
    )
    assert reporting.last_record(str(workdir), "eval") == RECORDS[1]


def test_a_run_resumed_after_a_cut_write_keeps_its_next_record_whole(tmp_path, capsys):
    workdir = _workdir(tmp_path, metrics=RECORDS[:1], tail='{"step": 2, "split": "tr')
    reporter = reporting.Reporter(str(workdir), total_steps=3, start_step=2, progress_bar=False)
    reporter.write(3, "eval", {"accuracy": 0.5})
    reporter.close()
    records = reporting.read_metrics(str(workdir))
    assert records == [RECORDS[0], {"step": 3, "split": "eval", "accuracy": 0.5}]
    assert capsys.readouterr().err == (  # only the cut line is lost
        f"warning: {workdir}/metrics.jsonl: skipped line 2, which is not a metrics record (a "
        "write cut short, or an edit)\n"
    )


@pytest.mark.parametrize(
    "config, reason",
    [
        ("{not json", "Expecting property name enclosed in double quotes"),
        ("[]", "not a run's config: no 'model' group"),
        ('{"model": "vgg"}', "not a run's config: no 'model' group"),  # a flat, older config
        ('{"model": {}}', "not a run's config: no 'model.name' field"),
    ],
)
def test_a_config_json_that_is_not_a_runs_config_is_one_line(tmp_path, config, reason):
    workdir = _workdir(tmp_path, config=config)
    status, err = _exit_status_and_stderr(visualize.main, ["visualize", f"--workdir={workdir}"])
    assert status == 2
    assert err.startswith(f"error: {workdir}/config.json is unreadable ({reason}")
    assert len(err.splitlines()) == 1


def test_unusable_visualize_folders_are_one_line(tmp_path):
    workdir = _workdir(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    run = f"--workdir={workdir}"
    cases = [
        ([f"--workdir={a_file}"], f"--workdir={a_file} is a file, not a directory"),
        ([run, f"--out={a_file}"], f"--out={a_file} is a file, not a directory"),
        ([run, "--out="], "--out= is empty: give the directory to write to"),
        # as a read-only parent would
        ([run, f"--out={a_file}/sub"], f"--out={a_file}/sub cannot be created: Not a directory"),
    ]
    for argv, expected in cases:
        status_and_err = _exit_status_and_stderr(visualize.main, ["visualize", *argv])
        assert status_and_err == (2, f"error: {expected}\n"), argv


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--steps=0", "0 is not a positive integer"),
        ("--steps=-3", "-3 is not a positive integer"),
        ("--warmup=-1", "-1 is not a non-negative integer"),
        ("--input_steps=-1", "-1 is not a non-negative integer"),
        ("--rounds=0", "0 is not a positive integer"),
        ("--peak_tflops=inf", "must be a finite number >= 0"),
        ("--peak_tflops=-1.5", "must be a finite number >= 0"),
    ],
)
def test_benchmark_counts_out_of_range_are_one_line(flag, expected):
    argv = ["benchmark", f"--config={LENET_CONFIG}:modern", flag]
    assert _exit_status_and_stderr(benchmark.main, argv) == (2, f"error: flag {flag}: {expected}\n")


def _checkpoint_without_arrays(directory):
    """A checkpoint (step 1) of a small parameter tree whose array data files are gone."""
    from cnn_jax import checkpoint

    rng = np.random.default_rng(0)  # random: arrays that compress well may be stored inline
    conv1_1 = {
        "kernel": rng.normal(size=(3, 3, 3, 64)).astype(np.float32),
        "bias": rng.normal(size=64).astype(np.float32),
    }
    tree = {"params": {"features": {"conv1_1": conv1_1}}}
    ckpt = checkpoint.Checkpointer(str(directory), keep=1, async_save=False)
    ckpt.save(1, tree)
    ckpt.close()
    for root, _, files in os.walk(directory / "1"):
        if os.path.basename(root) == "d":  # OCDBT's data files
            for name in files:
                os.remove(os.path.join(root, name))
    return tree


def test_a_warm_start_checkpoint_that_does_not_restore_is_one_line(tmp_path):
    import jax

    from cnn_jax import finetune
    from cnn_jax.errors import RunFailure

    directory = tmp_path / "vgg_a" / "checkpoints"
    like = jax.tree.map(jax.numpy.asarray, _checkpoint_without_arrays(directory))
    with pytest.raises(RunFailure) as failure:
        finetune.load_layers(str(tmp_path / "vgg_a"), like)
    message = str(failure.value)
    assert message.startswith(
        f"--config.model.warm_start_from={tmp_path / 'vgg_a'}: the checkpoint of step 1 in "
        f"{directory} does not restore: "
    )
    assert len(message.splitlines()) == 1


def test_visualize_of_a_checkpoint_that_does_not_restore_is_one_line(tmp_path):
    workdir = _workdir(tmp_path, config=_recorded("lenet5_modern"))
    _checkpoint_without_arrays(workdir / "checkpoints")
    argv = ["visualize", f"--workdir={workdir}", f"--out={tmp_path / 'pictures'}"]
    status, err = _exit_status_and_stderr(visualize.main, argv)
    assert status == 1
    assert err.startswith(
        f"error: --workdir={workdir}: the checkpoint of step 1 in "
        f"{workdir}/checkpoints does not restore: "
    )
    assert len(err.splitlines()) == 1


def test_visualize_of_a_run_without_a_checkpoint_is_one_line(tmp_path):
    workdir = _workdir(tmp_path, config=_recorded("lenet5"))
    status, err = _exit_status_and_stderr(visualize.main, ["visualize", f"--workdir={workdir}"])
    assert (status, err) == (2, f"error: --workdir={workdir} has no checkpoints/\n")
    (workdir / "checkpoints").mkdir()
    status, err = _exit_status_and_stderr(visualize.main, ["visualize", f"--workdir={workdir}"])
    assert (status, err) == (
        2,
        f"error: --workdir={workdir}: no checkpoint in {workdir}/checkpoints\n",
    )


def test_visualize_flag_mistakes_are_one_line():
    assert _exit_status_and_stderr(visualize.main, ["visualize"]) == (
        2,
        "error: --workdir=DIR is required: the run's directory\n",
    )
    assert _exit_status_and_stderr(visualize.main, ["visualize", "--workdir=w", "--outt=x"]) == (
        2,
        "error: Unknown command line flag 'outt'. Did you mean: out ?\n",
    )
    assert _exit_status_and_stderr(visualize.main, ["visualize", "--workdir=w", "extra"]) == (
        2,
        "error: unexpected arguments: extra\n",
    )


def test_summary_of_lenet5_with_other_than_ten_classes_is_one_line():
    from cnn_jax import summary

    argv = [
        "summary",
        f"--config={LENET_CONFIG}",
        "--config.data.name=synthetic",
        "--config.data.num_classes=3",
    ]
    status, err = _exit_status_and_stderr(summary.main, argv)
    assert status == 2
    assert err.startswith("error: --config.data.num_classes=3: LeNet-5's RBF output has one fixed ")
    assert len(err.splitlines()) == 1
