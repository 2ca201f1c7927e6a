"""Orbax checkpoints of the whole TrainState in WORKDIR/checkpoints, and what a resume needs.

The state holds everything a resumed run needs (parameters, optimiser state with the
plateau factor, step, RNG key); the data position is a function of the step
(cnn_jax.data.pipeline), so a checkpoint is one pytree and nothing else. A run saves and
restores through Checkpointer; everything else that reads a checkpoint (VGG's warm start,
cnn_jax.visualize) reads part of one, without writing, through read_newest.

What a run can rely on:
- A save is atomic: Orbax writes STEP.orbax-checkpoint-tmp and renames it to STEP only when
  every file is written, and deletes old checkpoints (keep-N) only after that. A crash at any
  moment leaves the earlier checkpoints whole; stray tmp directories are removed at start-up.
- A checkpoint that does not restore (a truncated or missing array file) is reported by step,
  moved to WORKDIR/corrupt_checkpoints/, and the next older one is tried. If none restores the
  run stops (RunFailure naming the steps): a workdir with checkpoints never restarts from scratch.
- A full disk stops the run with one line (RunFailure) instead of a background-thread traceback.
- SIGTERM (a preemption notice) asks the loop to save the current step and stop (StopSignal);
  so does Ctrl-C once training runs.
"""

import contextlib
import errno
import functools
import gc
import inspect
import json
import logging
import os
import shutil
import signal
import sys
import threading
import traceback
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from cnn_jax import errors
from cnn_jax.errors import RunFailure, UserError
from cnn_jax.paths import CHECKPOINTS_DIR, CONFIG_FILE, CORRUPT_DIR


def _remove_unfinished_saves(directory: str) -> None:
    """Delete the leftovers of saves killed before their rename; they are never restored.

    Done here, synchronously, rather than by Orbax's cleanup_tmp_directories option, whose
    background thread can outlive a run that stops early and print a shutdown traceback.
    """
    if jax.process_index() == 0 and os.path.isdir(directory):
        for name in os.listdir(directory):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("cnn_jax_remove_unfinished_saves")


class Checkpointer:
    """Async, keep-N CheckpointManager; every process takes part in each save."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = directory
        _remove_unfinished_saves(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(directory, options=options, item_names=("state",))
        self._saving_step: int | None = None  # an async save that may still be writing

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state) -> None:
        """Start saving `state` as `step` (written in the background when async)."""
        self.wait()  # Orbax would wait for the previous save anyway; its errors are its own
        with _DiskErrors(self.directory, step):
            self._check_free_space(state)
            self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        self._saving_step = step

    def restore(self, step: int, like):
        """Restore `step` into arrays with the shapes, dtypes and shardings of `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return restored["state"]

    def restore_newest(self, like):
        """The newest checkpoint that restores, or None if the directory holds none.

        Each one that fails (truncated or missing files) is named in a warning and moved to
        WORKDIR/corrupt_checkpoints/ so that later saves of its step can happen. All
        processes agree on the outcome of each attempt.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if steps:  # before the first attempt: some reports come while a failed one unwinds
            hide_abandoned_read_reports()
        tried: list[tuple[int, str]] = []
        for step in steps:
            state, problem = self._try_restore(step, like)
            if _on_every_process(problem is None):
                if tried:
                    self._quarantine([s for s, _ in tried])
                    _warn(f"resuming from step {step}, the newest checkpoint that restores")
                return state
            problem = problem or "it failed on another process"
            _warn(f"checkpoint step {step} in {self.directory} does not restore: {problem}")
            tried.append((step, problem))
        if tried:
            raise RunFailure(
                f"no checkpoint in {self.directory} restores (tried steps "
                f"{', '.join(str(s) for s, _ in tried)}; step {tried[0][0]}: {tried[0][1]}); "
                "move the directory away to start over"
            )
        return None

    def _try_restore(self, step: int, like):
        try:
            state = self.restore(step, like)
        except Exception as e:  # Orbax/TensorStore raise plain Exception/ValueError here
            gc.collect()  # most of its abandoned reads are reported now, not while training
            return None, innermost_message(e)
        if int(state.step) != step:
            return None, f"it holds step {int(state.step)}"
        return state, None

    def _quarantine(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            target_root = os.path.join(os.path.dirname(self.directory), CORRUPT_DIR)
            os.makedirs(target_root, exist_ok=True)
            for step in steps:
                target = os.path.join(target_root, str(step))
                suffix = 1
                while os.path.exists(target):
                    target, suffix = os.path.join(target_root, f"{step}.{suffix}"), suffix + 1
                shutil.move(os.path.join(self.directory, str(step)), target)
                _warn(f"moved the checkpoint of step {step} to {target}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("cnn_jax_checkpoint_quarantine")
        self._manager.reload()

    def _check_free_space(self, state) -> None:
        """Refuse to start a save that cannot fit: a clean message now instead of a failed
        background write later. A checkpoint takes about what the newest one took. All
        processes decide together (one failing alone would leave the others in the save)."""
        free = needed = 0
        if "://" not in self.directory:  # cloud storage: no local notion of free space
            latest = self.latest_step()
            if latest is not None:
                needed = _tree_size(os.path.join(self.directory, str(latest)))
            else:
                needed = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
            free = shutil.disk_usage(self.directory).free
        if not _on_every_process(free >= needed):
            raise OSError(
                errno.ENOSPC,
                f"No space left on device: {free / 2**20:.1f} MiB free in {self.directory}, "
                f"a checkpoint needs about {needed / 2**20:.1f} MiB",
            )

    def wait(self) -> None:
        """Block until the last save is on disk (its errors surface here)."""
        with _DiskErrors(self.directory, self._saving_step):
            self._manager.wait_until_finished()
        self._saving_step = None

    def close(self) -> None:
        with _DiskErrors(self.directory, self._saving_step):
            self._manager.close()


class _DiskErrors:
    """Turns a full disk during a save into one RunFailure line that names the step."""

    def __init__(self, directory: str, step: int | None):
        self._directory, self._step = directory, step

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or not errors.is_disk_full(error):
            return False
        which = "a checkpoint" if self._step is None else f"the checkpoint of step {self._step}"
        reason = getattr(error, "strerror", None) or "No space left on device"
        raise RunFailure(
            f"disk full: could not write {which} to {self._directory} ({reason}); the earlier "
            "checkpoints are intact: free space and rerun the same command to resume"
        ) from error


AGAIN = (
    "interrupted again: stopped at once; the newest checkpoint saved whole is intact, rerun "
    "the same command to resume from it"
)


class StopSignal:
    """Tells the loop when to checkpoint the current step and stop: on SIGTERM, the notice a
    cloud VM gets before preemption, and, once `catch_interrupts` is called, on Ctrl-C.

    One process: a handler sets a flag that `requested` reads after each step; `reason` says
    which signal ("SIGTERM" or "Ctrl-C"). A second Ctrl-C ends the process at once
    (errors.exit_interrupted): a save it cuts short was never renamed into place, so it does
    not count. A SIGINT that was ignored (a background job) stays so.
    Several processes: JAX's preemption service (started by jax.distributed.initialize)
    catches SIGTERM on whichever host gets it and agrees with all hosts on one step to stop
    at; `requested` asks it, so every process saves that same step. No Python handler is
    installed there (it would replace the service's own).
    """

    def __init__(self):
        self.reason: str | None = None
        self._previous: dict[int, object] = {}  # signal -> the handler to restore
        self._multi_process = jax.process_count() > 1

    def _can_handle(self) -> bool:
        return not self._multi_process and threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self._can_handle():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def catch_interrupts(self) -> None:
        """From now on Ctrl-C saves the current step and stops the loop, as SIGTERM does."""
        usable = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        if self._can_handle() and usable and signal.SIGINT not in self._previous:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False

    def _on_signal(self, signum, frame):
        del frame
        if signum == signal.SIGINT:  # a second Ctrl-C ends the process at once
            signal.signal(signal.SIGINT, functools.partial(errors.exit_interrupted, AGAIN))
        self.reason = self.reason or ("Ctrl-C" if signum == signal.SIGINT else "SIGTERM")

    def requested(self, step: int) -> bool:
        """Called once per step with the number of steps done, on every process."""
        if self._multi_process and ocp.multihost.reached_preemption(step):
            self.reason = "SIGTERM"
        return self.reason is not None


def checkpoint_directory(path: str) -> str:
    """A workdir's checkpoints/ folder, or `path` itself if it is one; absolute."""
    inner = os.path.join(path, CHECKPOINTS_DIR)
    return os.path.abspath(inner if os.path.isdir(inner) else path)


def checkpoint_location(path: str) -> tuple[str, int | None]:
    """(checkpoints folder, step) that `path` names: a workdir or its checkpoints/ folder
    (step None: the newest), or one checkpoint's own folder, WORKDIR/checkpoints/STEP."""
    directory = checkpoint_directory(path)
    name = os.path.basename(directory)
    if name.isdigit() and os.path.isdir(os.path.join(directory, "state")):  # Checkpointer's item
        return os.path.dirname(directory), int(name)
    return directory, None


def on_one_device(saved):
    """`select` for read_newest: every array of `saved` onto this machine's first device,
    whatever mesh wrote it (a checkpoint from 8 devices or a TPU slice opens on a laptop)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)


def read_newest(path: str, select, *, flag: str) -> tuple[int, dict]:
    """(step, arrays) read from the newest checkpoint under `path` (a workdir or its
    checkpoints/ folder; or one checkpoint's folder, STEP, for that one: checkpoint_location),
    without writing to it: a run still training there keeps its in-flight saves.

    `select(saved)` gets the saved TrainState as a tree of dicts whose leaves have the arrays'
    `shape` and `dtype`, and returns the part of it to read: a tree of the same nesting with
    jax.ShapeDtypeStruct leaves (dtype and sharding to read into; on_one_device makes them).
    Nothing else is read; an empty selection reads nothing. Errors are one line that begins
    with `flag={path}`: UserError when there is no checkpoint, RunFailure when the newest one
    does not restore (a truncated or missing file). `select` may raise its own UserError.
    """
    directory, step_asked = checkpoint_location(path)
    if not os.path.isdir(directory):
        raise UserError(f"{flag}={path}: no checkpoint in {directory} (no such directory)")
    with _quiet():  # orbax logs a WARNING for each option read_only overrides
        manager = ocp.CheckpointManager(
            directory,
            item_names=("state",),
            # The PyTree handler reads the Checkpointer's StandardSave format, and a part of it.
            item_handlers={"state": ocp.PyTreeCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(read_only=True),
        )
    try:
        step = manager.latest_step() if step_asked is None else step_asked
        if step is None or step not in manager.all_steps():
            which = "no checkpoint" if step_asked is None else f"no checkpoint of step {step}"
            raise UserError(f"{flag}={path}: {which} in {directory}")

        def unreadable(error: Exception) -> RunFailure:
            return RunFailure(
                f"{flag}={path}: the checkpoint of step {step} in {directory} does not "
                f"restore: {innermost_message(error)}"
            )

        try:
            saved = manager.item_metadata(step)["state"].tree
        except Exception as e:  # Orbax: a missing or unreadable metadata file
            raise unreadable(e) from e
        wanted = select(saved)
        if not jax.tree.leaves(wanted):
            return step, {}
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), wanted)
        hide_abandoned_read_reports()  # of a restore that fails: our line says it
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=wanted, restore_args=restore_args, partial_restore=True
                    )
                ),
            )
        except Exception as e:  # Orbax/TensorStore: a truncated or missing array file
            raise unreadable(e) from e
        return step, dict(restored["state"])
    finally:
        manager.close()


@contextlib.contextmanager
def _quiet():
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def write_config(record: dict, workdir: str) -> None:
    """WORKDIR/config.json (`record`: the resolved config's dict), written atomically (a kill
    mid-write leaves the old one)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)


def saved_config(workdir: str) -> dict | None:
    """The config.json a previous run left in workdir, or None."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    except (OSError, ValueError) as e:
        raise RunFailure(
            f"{path} is unreadable ({e}); it records the config the checkpoints were made "
            "with: restore it, or delete it to resume without the config check"
        ) from e
    return saved


_ORBAX_DIR = os.path.dirname(ocp.__file__)
# Orbax's per-array read coroutines (orbax/checkpoint/_src/serialization/serialization.py).
_ORBAX_READ_COROUTINES = ("_read_array_index_and_device_put",)


def hide_abandoned_read_reports() -> None:
    """Keep Orbax's leftovers of a failed restore off stderr, for the rest of the process.

    When one array of a checkpoint fails to read, Orbax gives up on the others while they are
    still reading. Each of those read coroutines, closed unfinished whenever the garbage
    collector gets to it, turns its GeneratorExit into an Exception (an `except BaseException`
    around the read) and Python prints it with its whole TensorStore spec: dozens of lines per
    array, "Exception ignored in: <coroutine ...>". A read that TensorStore finishes after
    that hands its result to Orbax's closed event loop: "RuntimeError: Event loop is closed".
    And asyncio logs the reads that failed too but that nobody awaited any more ("...
    exception was never retrieved", with the same spec). Our own warning already says the
    checkpoint does not restore, so these reports are dropped, recognised by where they come
    from; any other unraisable exception or asyncio error is still printed. Installed once,
    before the first restore, and kept: the reports come from other threads and from the
    collector, at any time after a failure.
    """
    if getattr(sys.unraisablehook, "drops_abandoned_reads", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_abandoned_read(unraisable):
            previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_drop_unretrieved_orbax_errors)
    # A read Orbax had scheduled but not started when it gave up is collected unawaited,
    # possibly only at exit ("sys:1: RuntimeWarning: coroutine ... was never awaited").
    warnings.filterwarnings(
        "ignore",
        message=f"coroutine '({'|'.join(_ORBAX_READ_COROUTINES)})' was never awaited",
        category=RuntimeWarning,
    )


def _drop_unretrieved_orbax_errors(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    unretrieved = "exception was never retrieved" in str(record.msg).split("\n")[0]
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    return not (unretrieved and any(f.filename.startswith(_ORBAX_DIR) for f in frames))


def _is_abandoned_read(unraisable) -> bool:
    error, source = unraisable.exc_value, unraisable.object
    if inspect.iscoroutine(source):
        return source.cr_code.co_filename.startswith(_ORBAX_DIR) and isinstance(
            getattr(error, "__cause__", None), GeneratorExit
        )
    if source is None and isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        frames = traceback.extract_tb(unraisable.exc_traceback)
        return bool(frames) and frames[0].name == "call_soon_threadsafe"
    return False


def _on_every_process(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def innermost_message(error: BaseException) -> str:
    """The root cause's first line, short: Orbax wraps TensorStore's useful message in a
    long one that prints the whole TensorStore spec."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines() or [type(error).__name__]
    text = f"{type(error).__name__}: {lines[0]}"
    return text if len(text) <= 300 else text[:297] + "..."


def _tree_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # deleted while we walk
                total += os.path.getsize(os.path.join(root, name))
    return total


def _warn(text: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {text}", file=sys.stderr, flush=True)
