"""Orbax checkpoints of the whole TrainState in WORKDIR/checkpoints, and what a resume needs.

The state holds everything a resumed run needs (parameters, optimiser state with the
plateau factor, step, RNG key); the data position is a function of the step
(cnn_jax.data.pipeline), so a checkpoint is one pytree and nothing else.

What a run can rely on:
- A save is atomic: Orbax writes STEP.orbax-checkpoint-tmp and renames it to STEP only when
  every file is written, and deletes old checkpoints (keep-N) only after that. A crash at any
  moment leaves the earlier checkpoints whole; stray tmp directories are removed at start-up.
- A checkpoint that does not restore (a truncated or missing array file) is reported by step,
  moved to WORKDIR/corrupt_checkpoints/, and the next older one is tried. If none restores the
  run stops (RunFailure naming the steps): a workdir with checkpoints never restarts from scratch.
- A full disk stops the run with one line (RunFailure) instead of a background-thread traceback.
- SIGTERM (a preemption notice) asks the loop to save the current step and stop (StopSignal).
"""

import contextlib
import errno
import json
import os
import shutil
import signal
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cnn_jax import errors
from cnn_jax.errors import RunFailure

CONFIG_FILE = "config.json"  # the resolved config of the latest run in a workdir
CORRUPT_DIR = "corrupt_checkpoints"  # unrestorable checkpoints are moved here, not deleted


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
            return None, _innermost_message(e)
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
                errno.ENOSPC, f"No space left on device: {free / 2**20:.1f} MiB free in "
                f"{self.directory}, a checkpoint needs about {needed / 2**20:.1f} MiB"
            )  # fmt: skip

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


class StopSignal:
    """Tells the loop when to checkpoint the current step and stop: on SIGTERM, the notice a
    cloud VM gets before preemption.

    One process: a SIGTERM handler sets a flag that `requested` reads after each step.
    Several processes: JAX's preemption service (started by jax.distributed.initialize)
    catches SIGTERM on whichever host gets it and agrees with all hosts on one step to stop
    at; `requested` asks it, so every process saves that same step. No Python handler is
    installed there (it would replace the service's own).
    """

    def __init__(self):
        self._received = False
        self._previous = None
        self._multi_process = jax.process_count() > 1

    def __enter__(self):
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._received = True

    def requested(self, step: int) -> bool:
        """Called once per step with the number of steps done, on every process."""
        if self._multi_process:
            return ocp.multihost.reached_preemption(step)
        return self._received


def write_config(config, workdir: str) -> None:
    """WORKDIR/config.json, written atomically (a kill mid-write leaves the old one)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)


def saved_config(workdir: str) -> dict | None:
    """The config.json a previous run left in workdir, or None."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RunFailure(
            f"{path} is unreadable ({e}); it records the config the checkpoints were made "
            "with: restore it, or delete it to resume without the config check"
        ) from e


def _on_every_process(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _innermost_message(error: BaseException) -> str:
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
