"""JAX's persistent compilation cache (cnn_jax.cli.enable_compilation_cache): where it is, how
it is turned off, what a bad value does, and that the same command run again (resuming)
compiles nothing.

The runs are real processes (this file is their entry point, as in test_faults.py), because
JAX opens its cache once per process: each run counts JAX's own monitoring events for the
cache and leaves them in a file. No timing assertions: the machine is shared.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from cnn_jax import cli, defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENET_CONFIG = os.path.join(REPO, "configs", "lenet.py")

# jax.monitoring events (jax/_src/compiler.py, compilation_cache.py): a compile that looked in
# the cache, one that found its executable there, one that compiled and wrote it.
REQUESTS = "/jax/compilation_cache/compile_requests_use_cache"
HITS = "/jax/compilation_cache/cache_hits"
MISSES = "/jax/compilation_cache/cache_misses"
EVENTS_FILE = "CNN_JAX_TEST_CACHE_EVENTS"  # where a run writes its counts
# A duration event of every compilation, whether XLA compiled it or the cache gave it.
COMPILED = "/jax/core/compile/backend_compile_duration"
TRAIN_STEP_COMPILED = f"{COMPILED} jit(train_step)"


@pytest.fixture
def no_cache_settings(monkeypatch):
    """Neither the variable nor JAX's own setting: the default directory decides."""
    import jax

    monkeypatch.delenv(cli.COMPILATION_CACHE_ENV, raising=False)
    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield monkeypatch
    jax.config.update("jax_compilation_cache_dir", saved)


def test_the_default_is_the_users_cache_directory(tmp_path, no_cache_settings):
    no_cache_settings.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli.compilation_cache_dir("") == str(tmp_path / "xdg" / "cnn_jax" / "jax")
    assert os.path.isdir(tmp_path / "xdg" / "cnn_jax" / "jax")
    no_cache_settings.delenv("XDG_CACHE_HOME")
    no_cache_settings.setenv("HOME", str(tmp_path / "home"))
    assert cli.compilation_cache_dir("") == str(tmp_path / "home" / ".cache" / "cnn_jax" / "jax")
    assert defaults.get_default_config().run.compilation_cache_dir == ""


def test_the_field_wins_over_the_variable_and_off_turns_it_off(tmp_path, no_cache_settings):
    no_cache_settings.setenv(cli.COMPILATION_CACHE_ENV, str(tmp_path / "from_env"))
    assert cli.compilation_cache_dir("") == str(tmp_path / "from_env")
    assert cli.compilation_cache_dir(str(tmp_path / "field")) == str(tmp_path / "field")
    no_cache_settings.chdir(tmp_path)
    assert cli.compilation_cache_dir("relative") == str(tmp_path / "relative")  # made absolute
    assert cli.compilation_cache_dir("off") is None
    no_cache_settings.setenv(cli.COMPILATION_CACHE_ENV, "off")
    assert cli.compilation_cache_dir("") is None
    assert cli.compilation_cache_dir(str(tmp_path / "field")) == str(tmp_path / "field")


def test_a_bad_value_is_one_error_line_and_exit_2(tmp_path, capsys, no_cache_settings):
    """Checked in cli.run before anything compiles; nothing of JAX's settings changes."""
    import jax

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    before = jax.config.jax_compilation_cache_dir
    for value in (str(a_file), "gs://bucket/cache"):
        config = defaults.get_default_config()
        config.run.compilation_cache_dir = value
        with pytest.raises(SystemExit) as exit_:
            cli.run(lambda: None, config)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert (
            err.startswith("error: --config.run.compilation_cache_dir=") and err.count("\n") == 1
        ), err
    no_cache_settings.setenv(cli.COMPILATION_CACHE_ENV, str(a_file))
    with pytest.raises(SystemExit) as exit_:
        cli.run(lambda: None)
    assert exit_.value.code == 2
    assert (
        capsys.readouterr().err
        == f"error: {cli.COMPILATION_CACHE_ENV}={a_file} is not a directory\n"
    )
    assert jax.config.jax_compilation_cache_dir == before


def test_an_unwritable_directory_is_one_warning_and_no_cache(tmp_path, capsys, no_cache_settings):
    blocked = tmp_path / "a_file"
    blocked.write_text("")  # a directory under a file can never be made, even by root
    assert cli.compilation_cache_dir(str(blocked / "cache")) is None
    err = capsys.readouterr().err
    assert err.startswith("warning: compiling without a cache: cannot write to ")
    assert err.count("\n") == 1, err


def _run(workdir, cache, events, fault=""):
    """`python -m cnn_jax.main` through this file, on LeNet-5 modern and synthetic data: 4
    steps an epoch, 6 steps, evaluations at 4 and 6."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a shell's 2 devices
    env |= {"PYTHONPATH": REPO, cli.COMPILATION_CACHE_ENV: str(cache), EVENTS_FILE: str(events)}
    argv = [
        f"--config={LENET_CONFIG}:modern", f"--workdir={workdir}",
        "--config.data.name=synthetic", "--config.data.synthetic_channels=1",
        "--config.data.synthetic_train_size=32", "--config.data.synthetic_eval_size=16",
        "--config.input.batch_size=8", "--config.run.num_train_steps=6",
        "--config.run.log_every_steps=2", "--config.run.progress_bar=False",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), fault, *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr[-3000:]
    assert sum(line.startswith("first step after ") for line in proc.stdout.splitlines()) == 1
    with open(events) as f:
        return proc.stdout, json.load(f)


def _cache_files(cache) -> set[str]:
    return {os.path.join(root, f) for root, _, files in os.walk(cache) for f in files}


def test_a_resumed_run_compiles_nothing(tmp_path):
    cache = tmp_path / "jax_cache"
    # 1. A new run, stopped by SIGTERM during step 4 (after the evaluation at 4): compiles
    #    and writes every program it runs, and saves step 5.
    out, first = _run(tmp_path / "run", cache, tmp_path / "first.json", "sigterm_during_step=4")
    assert "Stopped by SIGTERM at step 5 of 6" in out
    assert first.get(MISSES, 0) > 0 and first.get(HITS, 0) < first.get(REQUESTS, 0)
    written = _cache_files(cache)
    assert written
    # 2. The same command again: it resumes at 5 (restore, train step, evaluation, save) and
    #    loads every program it needs from the cache.
    out, resumed = _run(tmp_path / "run", cache, tmp_path / "resumed.json")
    assert "Resuming from checkpoint at step 5 of 6" in out
    assert resumed.get(REQUESTS, 0) > 0 and resumed.get(HITS) == resumed[REQUESTS], resumed
    assert resumed.get(MISSES, 0) == 0
    assert _cache_files(cache) == written  # nothing new was written
    # Compiled ahead of the first batch (train.Trainer.compile_train_step) for the batches
    # that came: once per run, not again at the first step.
    assert first[TRAIN_STEP_COMPILED] == 1 and resumed[TRAIN_STEP_COMPILED] == 1


def _tiny_trainer():
    """LeNet-5 modern on 32 synthetic digits, batches of 8 (over the tests' 8 devices)."""
    from cnn_jax import train

    config = defaults.get_default_config("lenet5_modern")
    config.data.name, config.data.synthetic_channels = "synthetic", 1
    config.data.synthetic_train_size, config.data.synthetic_eval_size = 32, 16
    config.input.image_size, config.input.preprocess = 32, "lenet"
    config.input.batch_size, config.run.num_train_steps = 8, 6
    return train.build_trainer(config)


def test_the_train_step_compiled_ahead_takes_the_first_batch_as_it_is():
    """train_batch_spec is what the pipeline yields (shapes, dtypes, sharding), so the step
    compiled for it before the first batch exists runs that batch without compiling again."""
    import jax

    trainer = _tiny_trainer()
    state = trainer.init_state()
    trainer.compile_train_step(state)
    batch = next(trainer.train_batches(0))
    got = {k: (v.shape, v.dtype, v.sharding) for k, v in batch.items()}
    want = {k: (v.shape, v.dtype, v.sharding) for k, v in trainer.train_batch_spec().items()}
    assert got == want
    compiled = []

    def listener(name, _, **kwargs):
        if name == COMPILED:
            compiled.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert int(state.step) == 1
    assert "jit(train_step)" not in compiled, compiled


def test_the_early_batches_are_the_steps_own(monkeypatch):
    """train._EarlyBatches (the first batch fetched on a thread while the state is made) gives
    what train_batches gives from the step the run starts at, also when that is not the step
    it expected (its newest checkpoint did not restore); the thread's error is raised where
    the batches are asked for."""
    import numpy as np

    from cnn_jax import train
    from cnn_jax.errors import UserError

    trainer = _tiny_trainer()
    for expected, start in ((2, 2), (5, 1)):
        early = train._EarlyBatches(trainer, expected, total=6)
        got, want = early.batches(start), trainer.train_batches(start)
        for _ in range(5):  # across the epoch boundary (4 steps an epoch)
            a, b = next(got), next(want)
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])

    def no_data(start_step):
        raise UserError(f"no data at step {start_step}")
        yield  # a generator: the error comes with its first batch, on the thread

    monkeypatch.setattr(trainer, "train_batches", no_data)
    early = train._EarlyBatches(trainer, 3, total=6)
    with pytest.raises(UserError, match="no data at step 3"):
        early.batches(3)


def _count_cache_events_then_run_main(fault: str) -> None:
    """A run of cnn_jax.main that writes JAX's cache events to $CNN_JAX_TEST_CACHE_EVENTS when
    it exits; `sigterm_during_step=N` sends SIGTERM while batch N is fetched."""
    import atexit
    import collections
    import runpy

    import jax

    counts = collections.Counter()
    jax.monitoring.register_event_listener(lambda name, **_: counts.update([name]))

    def count_compiled(name, _, fun_name="", **__):
        if name == COMPILED:
            counts.update([f"{name} {fun_name}"])

    jax.monitoring.register_event_duration_secs_listener(count_compiled)

    def write_counts():
        with open(os.environ[EVENTS_FILE], "w") as f:
            json.dump(counts, f)

    atexit.register(write_counts)
    if fault:
        from cnn_jax import train

        step = int(fault.split("=")[1])
        batches = train.Trainer.train_batches

        def signalled_batches(self, start_step):
            for at, batch in enumerate(batches(self, start_step), start_step):
                if at == step:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

        train.Trainer.train_batches = signalled_batches
    runpy.run_module("cnn_jax.main", run_name="__main__")


if __name__ == "__main__":
    fault = sys.argv.pop(1)
    _count_cache_events_then_run_main(fault)
