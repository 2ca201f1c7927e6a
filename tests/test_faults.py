"""Fault tests (issue 7): kills at the worst moments, SIGTERM, Ctrl-C, corrupt checkpoints,
config drift, NaN, a full disk, a busy or unusable workdir, a garbled metrics.jsonl and bad
input.

One tiny run (LeNet-5 modern on synthetic 1-channel 32x32 data, batch 8, 20 steps,
checkpoints every 5, evaluations every 8 steps driving the plateau policy) is trained
straight in-process as the reference. The same command then runs as `python -m cnn_jax.main`
subprocesses that are SIGKILLed mid-save and just before a save's commit, SIGTERMed and
interrupted; the final parameters must equal the reference bit for bit. Faults are injected
by running this file as a script (see `_inject_fault` at the bottom): the package itself
carries no test hooks except config.debug_inject_nan_at_step.
"""

import contextlib
import errno
import io
import itertools
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest

# A checkpoint that fails to restore leaves Orbax's other read coroutines unawaited; their
# garbage collection is reported as an unraisable exception, which is expected here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENET_CONFIG = os.path.join(REPO, "configs", "lenet.py")
VGG_CONFIG = os.path.join(REPO, "configs", "vgg.py")


def _load_config_file(path, arg=None):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# 64 examples / batch 8 = 8 steps per epoch: evaluations at 8, 16, 20; checkpoints at 5, 10,
# 15, 20. The plateau policy with patience 1 lowers the learning rate after evaluations, so a
# resume must carry the eval-time decisions too.
OVERRIDES = {
    "dataset": "synthetic",
    "synthetic_channels": 1,
    "synthetic_train_size": 64,
    "synthetic_eval_size": 16,
    "batch_size": 8,
    "num_train_steps": 20,
    "checkpoint_every_steps": 5,
    "log_every_steps": 5,
    "eval_every_epochs": 1.0,
    "lr_schedule": "plateau",
    "plateau_patience": 1,
    "keep_checkpoints": 3,
    "progress_bar": False,
}


def _field(name: str) -> str:
    """The config field a short name stands for here: the flat names of defaults.RENAMED
    (batch_size -> input.batch_size), which keep the cases below short."""
    from cnn_jax import defaults

    return defaults.RENAMED.get(name, name)


def _argv(workdir, **changes):
    flags = {**OVERRIDES, **changes}
    return [f"--config={LENET_CONFIG}:modern", f"--workdir={workdir}"] + [
        f"--config.{_field(k)}={v}" for k, v in flags.items()
    ]


def _config(**changes):
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from configs import lenet

    config = lenet.get_config("modern")
    for k, v in {**OVERRIDES, **changes}.items():
        group, field = _field(k).split(".")
        config[group][field] = v
    return config


def _subprocess(workdir, fault="", **changes):
    """`python -m cnn_jax.main` (through this file when a fault is injected), with Ctrl-C's
    signal as a terminal gives it: a suite started in the background (`pytest &` in a
    script) has SIGINT ignored, its children would inherit that, and cnn_jax then leaves
    Ctrl-C alone as it should (cli.run), which the Ctrl-C tests here are not about."""
    entry = [os.path.abspath(__file__), fault] if fault else ["-m", "cnn_jax.main"]
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, *entry, *_argv(workdir, **changes)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        preexec_fn=_default_sigint,
    )  # fmt: skip


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_main(argv):
    """main in-process: (exit status, stdout, stderr), as a shell would see them."""
    from absl import flags

    from cnn_jax import cli
    from cnn_jax import main as entry

    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)  # the last parse's per-field override flags
    argv = ["cnn_jax.main", *argv]
    saved_argv, sys.argv = sys.argv, argv  # config_flags reads its overrides from sys.argv
    out, err = io.StringIO(), io.StringIO()
    status = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            entry.main(cli.parse_flags(argv))
    except SystemExit as e:
        status = e.code
    finally:
        sys.argv = saved_argv
    return status, out.getvalue(), err.getvalue()


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _assert_same_state(a, b):
    for part in ("params", "batch_stats", "opt_state", "step"):
        got, want = jax.device_get(getattr(a, part)), jax.device_get(getattr(b, part))
        jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One persistent compilation cache for this module's in-process runs and subprocesses:
    the same tiny program then compiles once instead of once per run (compiling is most of
    these tests' time). Restored afterwards, so other modules see no change."""
    from jax.experimental.compilation_cache import compilation_cache

    path = str(tmp_path_factory.mktemp("jax_cache"))
    settings = {
        "jax_enable_compilation_cache": True,
        "jax_compilation_cache_dir": path,
        "jax_persistent_cache_min_compile_time_secs": 0.0,
    }
    saved = {name: getattr(jax.config, name) for name in settings}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in settings.items():
            jax.config.update(name, value)
            patch.setenv(name.upper(), str(value))  # for the subprocesses
        patch.setenv("CNN_JAX_COMPILATION_CACHE", path)  # what cnn_jax.cli turns on
        compilation_cache.reset_cache()
        yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its workdir and final state."""
    from cnn_jax import train

    workdir = str(tmp_path_factory.mktemp("straight"))
    return workdir, train.train_and_evaluate(_config(), workdir)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The same run killed twice mid-save and stopped by SIGTERM, in subprocesses. Returns the
    workdir, each run's CompletedProcess, and a copy of the workdir as the runs left it."""
    workdir = str(tmp_path_factory.mktemp("interrupted"))
    runs = {}
    # 1. SIGKILL right after the save of step 10 started: its files are being written.
    runs["mid_save"] = _subprocess(workdir, "kill_after_save_started=10")
    # 2. SIGKILL when every file of step 15 is written but before the rename that commits it.
    runs["before_commit"] = _subprocess(workdir, "kill_before_commit=15")
    tmp_dirs = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]
    runs["stray_after_kill"] = tmp_dirs
    # 3. SIGTERM during step 17: saves step 18 and exits 0.
    runs["sigterm"] = _subprocess(workdir, "sigterm_during_step=17")
    snapshot = os.path.join(os.path.dirname(workdir), "snapshot_at_18")
    shutil.copytree(workdir, snapshot)
    return workdir, runs, snapshot


def test_kills_and_sigterm_then_rerun_give_the_uninterrupted_result(reference, interrupted):
    from cnn_jax import train

    workdir, runs, _ = interrupted
    assert runs["mid_save"].returncode == -signal.SIGKILL, runs["mid_save"].stderr[-2000:]
    assert runs["before_commit"].returncode == -signal.SIGKILL, runs["before_commit"].stderr
    assert "15.orbax-checkpoint-tmp" in runs["stray_after_kill"]  # really killed mid-save
    sigterm = runs["sigterm"]
    assert sigterm.returncode == 0, sigterm.stderr[-3000:]
    assert "Stopped by SIGTERM at step 18 of 20" in sigterm.stdout
    assert "Traceback" not in sigterm.stderr
    # Both killed saves left the earlier checkpoints restorable, stray tmp dirs are gone.
    assert _steps(workdir) == [10, 15, 18]
    assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]

    final = train.train_and_evaluate(_config(), workdir)
    assert int(final.step) == 20
    _assert_same_state(final, reference[1])


def _array_files(workdir, step):
    d = os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d")
    return sorted((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)


def test_corrupt_newest_checkpoints_are_skipped_and_named(reference, interrupted, capsys):
    """A truncated array file in step 18 and a missing one in step 15: the run says so,
    resumes from step 10 and still ends bit-identical to the uninterrupted run."""
    from cnn_jax import train

    workdir = os.path.join(os.path.dirname(interrupted[0]), "corrupt")
    shutil.copytree(interrupted[2], workdir)
    biggest = _array_files(workdir, 18)[-1]
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 3)
    os.remove(_array_files(workdir, 15)[-1])

    final = train.train_and_evaluate(_config(), workdir)
    err = capsys.readouterr().err
    assert f"checkpoint step 18 in {workdir}/checkpoints does not restore" in err
    assert f"checkpoint step 15 in {workdir}/checkpoints does not restore" in err
    assert "resuming from step 10" in err
    assert sorted(os.listdir(os.path.join(workdir, "corrupt_checkpoints"))) == ["15", "18"]
    _assert_same_state(final, reference[1])


def test_no_restorable_checkpoint_stops_instead_of_starting_over(interrupted, tmp_path):
    workdir = str(tmp_path / "all_bad")
    shutil.copytree(interrupted[2], workdir)
    for step in (10, 15, 18):
        for path in _array_files(workdir, step):
            os.remove(path)
    status, _, err = run_main(_argv(workdir))
    assert status == 1
    assert err.splitlines()[-1].startswith(
        f"error: no checkpoint in {workdir}/checkpoints restores (tried steps 18, 15, 10; "
    )
    assert _steps(workdir) == [10, 15, 18]  # nothing moved or deleted


def test_config_drift_is_refused_and_safe_changes_are_allowed(reference):
    workdir = reference[0]
    status, _, err = run_main(_argv(workdir, model="lenet5", batch_size=16))
    assert status == 2
    assert err == (
        f"error: --workdir={workdir} holds checkpoints of a different run: model.name (saved "
        "'lenet5_modern', now 'lenet5'); input.batch_size (saved 8, now 16). Use a new --workdir, "
        "or the saved values to resume\n"
    )
    status, out, err = run_main(
        _argv(workdir, log_every_steps=2, eval_every_epochs=3.0, checkpoint_every_steps=7)
    )
    assert status == 0, err
    assert "Training already finished at step 20" in out


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from cnn_jax import checkpoint, train

    workdir = str(tmp_path / "nan")
    status, _, err = run_main(_argv(workdir, debug_inject_nan_at_step=12))
    assert status == 1
    assert err.splitlines()[-1] == (
        "error: training diverged at step 12: the loss is nan; nothing after it was saved, the "
        "last checkpoint (step 10) is intact and a rerun resumes from it (lower "
        "--config.optim.learning_rate if it happens again)"
    )
    assert _steps(workdir) == [5, 10]  # the save at 15 was refused
    trainer = train.build_trainer(_config())
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
    state = ckpt.restore_newest(trainer.init_state())
    ckpt.close()
    assert int(state.step) == 10
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


def test_full_disk_is_one_line(tmp_path, monkeypatch):
    from cnn_jax import checkpoint, cli
    from cnn_jax.errors import RunFailure

    # Before a save: not enough free space for a checkpoint.
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpts"), keep=2)
    no_space = shutil._ntuple_diskusage(total=1, used=1, free=0)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: no_space)
    with pytest.raises(RunFailure, match=r"^disk full: could not write the checkpoint of step 3"):
        ckpt.save(3, {"w": np.ones(1000, np.float32)})
    monkeypatch.undo()

    # During a background write: TensorStore's error carries the OS error code.
    def failing_save(*args, **kwargs):
        raise ValueError("RESOURCE_EXHAUSTED: Error writing ...: No space left on device "
                         "[os_error_code='28']")  # fmt: skip

    monkeypatch.setattr(ckpt._manager, "save", failing_save)
    with pytest.raises(RunFailure, match=r"intact: free space and rerun the same command"):
        ckpt.save(4, {"w": np.ones(3, np.float32)})
    ckpt.close()

    # Any other write (metrics.jsonl, TensorBoard): one line from the CLI, exit status 1.
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    assert exit_info.value.code == 1
    assert err.getvalue() == "error: disk full: [Errno 28] No space left on device\n"


def test_ctrl_c_saves_the_step_and_a_rerun_gives_the_uninterrupted_result(reference, tmp_path):
    from cnn_jax import train

    workdir = str(tmp_path / "ctrl_c")
    proc = _subprocess(workdir, "sigint_during_step=12")
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == (
        "interrupted (Ctrl-C) at step 13 of 20; its checkpoint is saved: rerun the same "
        "command to continue"
    )
    assert "Traceback" not in proc.stderr
    assert _steps(workdir) == [5, 10, 13]
    final = train.train_and_evaluate(_config(), workdir)
    _assert_same_state(final, reference[1])


def test_a_second_ctrl_c_while_saving_stops_at_once_and_loses_nothing(reference, tmp_path):
    from cnn_jax import checkpoint, train

    workdir = str(tmp_path / "ctrl_c_twice")
    proc = _subprocess(workdir, "sigint_again_while_saving=12")
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [checkpoint.AGAIN]
    assert _steps(workdir)[:2] == [5, 10]  # and 13 only if its save was done: never half
    final = train.train_and_evaluate(_config(), workdir)
    _assert_same_state(final, reference[1])


def test_ctrl_c_before_training_is_one_line(tmp_path):
    workdir = str(tmp_path / "early")
    proc = _subprocess(workdir, "sigint_before_training=0")
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == ["interrupted before training started; nothing was saved"]
    assert _steps(workdir) == []


def test_a_failure_is_the_last_line_after_the_progress_bar(tmp_path):
    proc = _subprocess(str(tmp_path / "bar"), progress_bar=True, num_train_steps=2,
                       log_every_steps=2, debug_inject_nan_at_step=1)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "%|" in proc.stderr  # the bar was drawn
    lines = proc.stderr.splitlines()  # tqdm's carriage returns split lines too
    assert lines[-1] == (
        "error: training diverged at step 1: the loss is nan; nothing after it was saved, no "
        "checkpoint was saved (lower --config.optim.learning_rate if it happens again)"
    )
    assert [line for line in lines if "error:" in line] == [lines[-1]]


def test_recovery_from_a_corrupt_checkpoint_prints_only_its_warnings(interrupted, tmp_path):
    """A real process, where Orbax's abandoned reads of the corrupt checkpoint would print
    their tracebacks; the fault keeps every read that succeeds pending when one fails."""
    workdir = str(tmp_path / "corrupt_quietly")
    shutil.copytree(interrupted[2], workdir)
    biggest = _array_files(workdir, 18)[-1]
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 3)
    proc = _subprocess(workdir, "slow_reads=1", num_train_steps=16)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 3, proc.stderr[:5000]
    assert lines[0].startswith(f"warning: checkpoint step 18 in {workdir}/checkpoints does not")
    assert lines[1:] == [
        f"warning: moved the checkpoint of step 18 to {workdir}/corrupt_checkpoints/18",
        "warning: resuming from step 15, the newest checkpoint that restores",
    ]


def test_a_garbage_line_in_metrics_is_skipped_with_one_warning(reference, tmp_path):
    workdir = str(tmp_path / "garbage")
    shutil.copytree(reference[0], workdir)
    metrics = os.path.join(workdir, "metrics.jsonl")
    with open(metrics) as f:
        good = len(f.readlines())
    with open(metrics, "a") as f:
        f.write('an edit\n{"step": 21, "split": "ev')  # and a last line cut short
    status, out, err = run_main(_argv(workdir))
    assert status == 0, err
    assert "Training already finished at step 20 in" in out
    assert '; last eval: {"step": 20, "split": "eval"' in out
    assert err == (
        f"warning: {metrics}: skipped 2 lines ({good + 1}, {good + 2}), which are not metrics "
        "records (a write cut short, or an edit)\n"
    )


# --- The workdir: locked while a run uses it, checked before anything compiles ----------------

_HOLD_LOCK = """
import sys, time
from cnn_jax import paths
paths.acquire_lock(sys.argv[1])
print("locked", flush=True)
time.sleep(300)
"""


def test_a_busy_workdir_is_refused_and_freed_when_its_holder_is_killed(tmp_path):
    from cnn_jax import paths

    workdir = str(tmp_path / "busy")
    os.makedirs(workdir)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, workdir], cwd=REPO, stdout=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": REPO},
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        status, _, err = run_main(_argv(workdir))
        assert status == 2
        assert err == (
            f"error: --workdir={workdir} is in use by another run (pid {holder.pid}): wait for "
            "it to finish, or use another --workdir\n"
        )
        assert os.listdir(workdir) == [".lock"]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    os.close(paths.acquire_lock(workdir))  # the kernel let go of a killed holder's lock


@pytest.mark.parametrize("eval_only", [False, True])
def test_the_lock_is_held_for_the_whole_run_and_released_after(tmp_path, monkeypatch, eval_only):
    from cnn_jax import paths, train
    from cnn_jax.errors import UserError

    workdir = str(tmp_path / "w")
    seen = []

    def try_the_lock(trainer, ckpt, where):
        try:
            os.close(paths.acquire_lock(where))
            seen.append("free")
        except UserError as e:
            seen.append(str(e))

    monkeypatch.setattr(train, "_train", try_the_lock)  # the run's body, without compiling
    monkeypatch.setattr(train, "_evaluate_checkpoint", try_the_lock)
    status, _, err = run_main(_argv(workdir, eval_only=eval_only))
    assert status == 0, err
    assert seen == [
        f"--workdir={workdir} is in use by another run (pid {os.getpid()}): wait for it to "
        "finish, or use another --workdir"
    ]
    os.close(paths.acquire_lock(workdir))  # released when the run returned


@contextlib.contextmanager
def _no_compiles():
    compiles = []

    def on_event(event, secs, **kwargs):
        # Tracing (jax.eval_shape of a model, for its layers' shapes) is not compiling.
        if "compile" in event and "jaxpr_trace" not in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        yield
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert not compiles


def test_unusable_workdirs_are_one_line_before_compiling(tmp_path, monkeypatch):
    from cnn_jax import paths

    a_file = tmp_path / "file"
    a_file.write_text("")
    cases = [
        (str(a_file), f"error: --workdir={a_file} is a file, not a directory"),
        ("", "error: --workdir= is empty: give the directory to write to"),
        # What a read-only parent gives too; root writes through permission bits.
        (f"{a_file}/sub", f"error: --workdir={a_file}/sub cannot be created: Not a directory"),
    ]
    # What a run keeps in a workdir, of the other kind.
    (tmp_path / "file_for_a_folder").mkdir()
    (tmp_path / "file_for_a_folder" / "checkpoints").write_text("")
    (tmp_path / "folder_for_a_file" / "metrics.jsonl").mkdir(parents=True)
    for workdir, name, kind in (
        (tmp_path / "file_for_a_folder", "checkpoints", "a file, not the directory"),
        (tmp_path / "folder_for_a_file", "metrics.jsonl", "a directory, not the file"),
    ):
        cases.append((str(workdir), f"error: --workdir={workdir}: {workdir}/{name} is {kind} "
                      "a run keeps there; move it away"))  # fmt: skip
    if os.geteuid() != 0:
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        cases.append((str(read_only), f"error: --workdir={read_only} is not writable "
                      "(Permission denied)"))  # fmt: skip
    with _no_compiles():
        for workdir, expected in cases:
            assert run_main(_argv(workdir))[::2] == (2, expected + "\n")

        # A read-only mount or an immutable folder, which the permission bits do not show:
        # the probe write fails.
        def no_write(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(paths.tempfile, "NamedTemporaryFile", no_write)
        mounted = tmp_path / "mounted"
        assert run_main(_argv(str(mounted)))[::2] == (
            2, f"error: --workdir={mounted} is not writable (Read-only file system)\n"
        )  # fmt: skip


def test_tilde_in_the_workdir_and_path_fields_is_the_home_directory(tmp_path, monkeypatch):
    from cnn_jax import train

    home = tmp_path / "home"
    (home / "tfds").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # where a folder literally named `~` would appear
    seen = {}

    def record(trainer, ckpt, workdir):
        data = trainer.config.data
        seen.update(workdir=workdir, data_dir=data.data_dir, manual_dir=data.manual_dir)

    monkeypatch.setattr(train, "_train", record)
    status, _, err = run_main(_argv("~/run", data_dir="~/tfds", manual_dir="~/images"))
    assert status == 0, err
    assert seen == {"workdir": str(home / "run"), "data_dir": str(home / "tfds"),
                    "manual_dir": str(home / "images")}  # fmt: skip
    assert (home / "run").is_dir() and not (tmp_path / "~").exists()
    from cnn_jax import experiment

    vgg = _load_config_file(VGG_CONFIG, "A")
    vgg.model.warm_start_from = "~/vgg_a"
    resolved = experiment.resolve(vgg, num_devices=8)
    assert resolved.model.warm_start_from == str(home / "vgg_a")
    assert vgg.model.warm_start_from == "~/vgg_a"  # the user's config is left as it was


# --- Bad input: one line, exit status 2, nothing compiled --------------------------------------


def _bad_inputs(tmp_path):
    empty_folder = tmp_path / "no_images"
    (empty_folder / "train" / "cat").mkdir(parents=True)
    broken_config = tmp_path / "broken.py"
    broken_config.write_text("def get_config(:\n")
    missing = str(tmp_path / "missing")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    two_classes = tmp_path / "two_classes"  # configs/lenet.py's RBF head takes ten
    for split, label in itertools.product(("train", "val"), ("cat", "dog")):
        (two_classes / split / label).mkdir(parents=True)
        PIL.Image.new("RGB", (36, 44)).save(two_classes / split / label / "0.jpg")
    lenet_rbf = (
        "LeNet-5's RBF output has one fixed prototype per digit, so it takes exactly "
        "10 classes; --config=configs/lenet.py:modern (a softmax head) takes any number"
    )
    return [  # (changes, the config file or None, expected stderr line)
        ({"model": "lenet7"}, None, "error: unknown model 'lenet7'; choose one of: "),
        ({"dataset": "mnistt"}, None, "error: unknown dataset 'mnistt'; choose one of: "),
        ({"vgg_variant": "Z", "image_size": 224}, VGG_CONFIG,
         "error: --config.model.variant=Z: unknown VGG configuration 'Z'; choose one of: A, "
         "A-LRN, B, C, D, E"),
        ({"batch_size": 0}, None, "error: --config.input.batch_size=0 must be > 0"),
        ({"image_size": -32}, None, "error: --config.input.image_size=-32 must be > 0"),
        ({"num_train_steps": -1, "num_epochs": 0.0}, None,
         "error: --config.run.num_epochs=0.0 must be > 0"),
        ({"learning_rate": -0.1}, None, "error: --config.optim.learning_rate=-0.1 must be > 0"),
        ({"batch_size": 12}, None,
         "error: --config.input.batch_size=12 is not divisible by the mesh's data axis "
         "(8 devices)"),
        ({"mesh_model": 3}, None,
         "error: mesh data=-1 x model=3 does not fit the 8 available devices "),
        ({"data_dir": missing}, None, f"error: --config.data.data_dir={missing} does not exist"),
        ({"dataset": "image_folder", "manual_dir": str(empty_folder)}, None,
         f"error: --config.data.manual_dir={empty_folder}: no images (.jpg, .jpeg, .png) in "
         f"{empty_folder}/train; expected ROOT/SPLIT/CLASS/*.jpg with a train split"),
        ({}, str(tmp_path / "nope.py"), "error: could not load the config: [Errno 2] "
         f"No such file or directory: '{tmp_path / 'nope.py'}'"),
        ({}, str(broken_config),
         "error: could not load the config: SyntaxError: invalid syntax (broken.py, line 1)"),
        ({"no_such_field": 1}, None,
         "error: --config.no_such_field: no such config field (see cnn_jax/defaults.py, "
         "docs/config.md)"),
        ({"learning_rate": "inf"}, None,
         "error: --config.optim.learning_rate=inf must be a finite number"),
        ({"num_train_steps": -1, "num_epochs": "1e999"}, None,
         "error: --config.run.num_epochs=inf must be a finite number"),
        ({"momentum": "nan"}, None, "error: --config.optim.momentum=nan must be a finite number"),
        ({"momentum": 1.0}, None, "error: --config.optim.momentum=1.0 must be in [0, 1)"),
        ({"weight_decay": -1e-4}, None, "error: --config.optim.weight_decay=-0.0001 must be >= 0"),
        ({"warmup_epochs": -1.0}, None, "error: --config.optim.warmup_epochs=-1.0 must be >= 0"),
        ({"step_factor": 0.0}, None, "error: --config.optim.step_factor=0.0 must be > 0"),
        ({"step_epochs": "(20.0,10.0)"}, None,
         "error: --config.optim.step_epochs=(20.0, 10.0) must be non-negative and increasing"),
        ({"step_epochs": "(-1.0,)"}, None,
         "error: --config.optim.step_epochs=(-1.0,) must be non-negative and increasing"),
        ({"plateau_patience": 0}, None, "error: --config.optim.plateau_patience=0 must be >= 1"),
        ({"plateau_max_drops": -1}, None,
         "error: --config.optim.plateau_max_drops=-1 must be >= 0"),
        ({"plateau_min_delta": -0.1}, None,
         "error: --config.optim.plateau_min_delta=-0.1 must be >= 0"),
        ({"shuffle_buffer": -1}, None, "error: --config.input.shuffle_buffer=-1 must be >= 0"),
        ({"keep_checkpoints": 0}, None, "error: --config.run.keep_checkpoints=0 must be > 0"),
        ({"lenet_map_j": 0.0}, None, "error: --config.loss.lenet_map_j=0.0 must be > 0"),
        ({"seed": 2**63}, None, f"error: --config.run.seed={2**63} must fit in 64 bits"),
        ({"num_classes": 1}, None,
         "error: --config.data.num_classes=1: a classifier needs at least 2 classes"),
        ({"model": "lenet5", "loss": "lenet_map", "num_classes": 3}, None,
         f"error: --config.data.num_classes=3: {lenet_rbf}"),
        ({"dataset": "image_folder", "manual_dir": str(two_classes)}, LENET_CONFIG,
         f"error: --config.data.manual_dir={two_classes} holds 2 class folder(s): {lenet_rbf}"),
        ({}, f"{LENET_CONFIG}:nonsense",
         "error: configs/lenet.py takes modern, sdlm, or nothing for the paper's LeNet-5, not "
         "'nonsense'"),
        ({"data_dir": str(a_file)}, None,
         f"error: --config.data.data_dir={a_file} is a file, not a directory"),
        ({"dataset": "image_folder", "manual_dir": str(a_file)}, None,
         f"error: --config.data.manual_dir={a_file} is a file, not a directory"),
        ({"width_divisor": 16, "warm_start_from": str(a_file), "image_size": 32}, VGG_CONFIG,
         f"error: --config.model.warm_start_from={a_file} is a file, not a directory"),
        ({"dropout_rate": 0.5}, None,
         "error: --config.model.dropout_rate: no such config field"),
        # Checked before the dataset is opened (ImageNet, not prepared here: that error
        # would come first otherwise, after hours of preparing it where it can be).
        ({"dataset": "imagenet2012", "eval_mode": "dense", "image_size": 64}, VGG_CONFIG,
         "error: --config.eval.evaluators=dense needs --config.input.image_size >= 224"),
        ({"dataset": "imagenet2012", "momentum": 2.0}, VGG_CONFIG,
         "error: --config.optim.momentum=2.0 must be in [0, 1)"),
    ]  # fmt: skip


def test_a_field_name_from_before_the_groups_names_its_new_place(tmp_path):
    status, _, err = run_main(
        [f"--config={LENET_CONFIG}", f"--workdir={tmp_path}/w", "--config.learning_rate=0.1"]
    )
    assert (status, err) == (
        2,
        "error: --config.learning_rate is now --config.optim.learning_rate (the config's "
        "fields are grouped; see cnn_jax/defaults.py)\n",
    )
    status, _, err = run_main([f"--config={LENET_CONFIG}", f"--workdir={tmp_path}/w",
                               "--config.model=vgg"])  # fmt: skip
    assert status == 2 and err.startswith("error: --config.model is now --config.model.name")


def test_bad_input_is_one_line_and_exit_2_before_compiling(tmp_path):
    compiles, failures = [], []

    def on_event(event, secs, **kwargs):
        if "compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    for changes, config_file, expected in _bad_inputs(tmp_path):
        argv = _argv(str(tmp_path / "w"), **changes)
        if config_file:
            argv[0] = f"--config={config_file}"
        status, _, err = run_main(argv)
        lines = err.splitlines()
        ok = status == 2 and len(lines) == 1 and lines[0].startswith(expected)
        failures += [] if ok else [(changes, config_file, status, err[-1000:])]
    assert not failures
    assert not compiles
    jax.jit(lambda x: x * 3)(np.float32(1))  # the listener does see a compile
    jax.monitoring.unregister_event_duration_listener(on_event)
    assert compiles


def test_bad_input_from_the_shell(tmp_path):
    """A real process: exactly one line on stderr, exit status 2, no traceback."""
    proc = _subprocess(str(tmp_path / "w"), model="lenet7")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: unknown model 'lenet7'; choose one of: " + proc.stderr.split("of: ")[1].strip()
    ]


# --- Fault injection when this file runs as a script (the subprocesses above) -----------------


def _inject_fault(fault: str) -> None:
    """Patch the package so that this process dies (or is told to stop) at one moment."""
    name, step = fault.split("=")
    step = int(step)
    from cnn_jax import checkpoint, train

    if name == "kill_after_save_started":
        save = checkpoint.Checkpointer.save

        def save_then_die(self, at, state):
            save(self, at, state)
            if at == step:
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.Checkpointer.save = save_then_die
    elif name == "kill_before_commit":
        from orbax.checkpoint._src.path import atomicity

        finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def die_before_rename(self):
            if self.get_final().name == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
            return await finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = die_before_rename
    elif name == "sigterm_during_step":
        batches = train.Trainer.train_batches

        def signalled_batches(self, start_step):
            for at, batch in enumerate(batches(self, start_step), start_step):
                if at == step:
                    os.kill(os.getpid(), signal.SIGTERM)  # as a VM's preemption notice would
                yield batch

        train.Trainer.train_batches = signalled_batches
    elif name in ("sigint_during_step", "sigint_again_while_saving"):  # Ctrl-C
        batches = train.Trainer.train_batches

        def interrupted_batches(self, start_step):
            for at, batch in enumerate(batches(self, start_step), start_step):
                if at == step:
                    os.kill(os.getpid(), signal.SIGINT)
                yield batch

        train.Trainer.train_batches = interrupted_batches
        if name == "sigint_again_while_saving":  # and once more while that step's save runs
            save = checkpoint.Checkpointer.save

            def save_then_interrupt(self, at, state):
                save(self, at, state)
                if at == step + 1:
                    os.kill(os.getpid(), signal.SIGINT)

            checkpoint.Checkpointer.save = save_then_interrupt
    elif name == "sigint_before_training":  # Ctrl-C while the state is initialised
        init_state = train.Trainer.init_state

        def interrupted_init(self):
            os.kill(os.getpid(), signal.SIGINT)
            return init_state(self)

        train.Trainer.init_state = interrupted_init
    elif name == "slow_reads":  # every read that succeeds is still pending when one fails
        import asyncio

        from orbax.checkpoint._src.serialization import serialization

        read = serialization._read_shard

        async def slow_read(*args, **kwargs):
            shard = await read(*args, **kwargs)
            await asyncio.sleep(step)
            return shard

        serialization._read_shard = slow_read
    else:
        raise ValueError(fault)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    from absl import app

    from cnn_jax import cli
    from cnn_jax import main as entry

    _inject_fault(sys.argv.pop(1))
    app.run(entry.main, flags_parser=cli.parse_flags)
