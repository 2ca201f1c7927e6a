"""The directories a run is given: `~` expanded, refused with one line when they cannot be
used, and the workdir locked so that a second run cannot write into it at the same time.

The lock is an OS advisory lock (flock) on WORKDIR/.lock, held by process 0 of a run from
before anything compiles until the run ends. The kernel drops it when its holder exits, however
it exits (kill -9 included), so it never has to be cleaned up by hand. The file itself stays
and holds the last holder's pid and host, which the refusal names.
"""

import contextlib
import errno
import fcntl
import os
import socket
import sys
import tempfile

import jax

from cnn_jax.errors import UserError

# What a run keeps in its workdir; every module names these files through here.
CONFIG_FILE = "config.json"  # the resolved config of the latest run (cnn_jax.checkpoint)
METRICS_FILE = "metrics.jsonl"  # one JSON record per line (cnn_jax.reporting)
EVAL_RESULTS_FILE = "eval_results.json"  # an eval-only run's results (cnn_jax.evaluate)
LOCK_FILE = ".lock"  # held while a run uses the workdir (acquire_lock)
IMPORTED_WEIGHTS_FILE = "imported_weights.json"  # what cnn_jax.weights imported and folded
CHECKPOINTS_DIR = "checkpoints"  # Orbax checkpoints, one folder per step
CORRUPT_DIR = "corrupt_checkpoints"  # checkpoints that did not restore, moved here
TENSORBOARD_DIR = "tensorboard"  # TensorBoard event files
# By kind. An entry of the other kind would fail deep in the run: a file where the
# checkpoints folder goes lets a run train, then hang at its first save.
WORKDIR_DIRECTORIES = (CHECKPOINTS_DIR, CORRUPT_DIR, TENSORBOARD_DIR)
WORKDIR_FILES = (CONFIG_FILE, METRICS_FILE, EVAL_RESULTS_FILE, LOCK_FILE, IMPORTED_WEIGHTS_FILE)


def checkpoints_dir(workdir: str) -> str:
    """WORKDIR/checkpoints, absolute."""
    return os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)


def existing_directory(path: str, flag: str) -> str:
    """`path` with `~` expanded; UserError unless it is a directory (for paths a run reads)."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise UserError(f"{flag}={path} does not exist")
    if not os.path.isdir(path):
        raise UserError(f"{flag}={path} is a file, not a directory")
    return path


def writable_directory(path: str | None, flag: str) -> str:
    """`path` with `~` expanded, created if missing. UserError (one line naming `flag`) when
    it is empty, an existing file, or a directory this process cannot write."""
    if not path or not path.strip():
        raise UserError(f"{flag}= is empty: give the directory to write to")
    path = os.path.expanduser(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag}={path} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a parent is a file (ENOTDIR), read-only, not ours, ...
        raise UserError(f"{flag}={path} cannot be created: {e.strerror or e}") from e
    _check_writable(path, flag)
    return path


def _check_writable(path: str, flag: str) -> None:
    """os.access reads the permission bits, which root ignores; a real write also finds a
    read-only mount, an immutable folder or a full quota before the run has started."""
    problem = None if os.access(path, os.W_OK | os.X_OK) else os.strerror(errno.EACCES)
    if problem is None:
        try:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_") as f:
                f.write(b"0")
                f.flush()
        except OSError as e:
            problem = e.strerror or str(e)
    if problem:
        raise UserError(f"{flag}={path} is not writable ({problem})")


def _check_entries(workdir: str) -> None:
    kinds = [
        (WORKDIR_DIRECTORIES, os.path.isfile, "a file, not the directory"),
        (WORKDIR_FILES, os.path.isdir, "a directory, not the file"),
    ]
    for names, wrong, kind in kinds:
        for name in names:
            path = os.path.join(workdir, name)
            if wrong(path):
                raise UserError(
                    f"--workdir={workdir}: {path} is {kind} a run keeps there; move it away"
                )


def acquire_lock(workdir: str) -> int | None:
    """Take WORKDIR/.lock; returns its file descriptor (closing it releases the lock), or None
    where the filesystem has no locks (then a warning says so). UserError, naming the holder's
    pid, when another process holds it."""
    path = os.path.join(workdir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"--workdir={workdir}: cannot open {path} ({e.strerror or e})") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise UserError(
            f"--workdir={workdir} is in use by another run{holder}: wait for it to finish, "
            "or use another --workdir"
        ) from None
    except OSError as e:  # some network filesystems: ENOLCK, EOPNOTSUPP
        os.close(fd)
        reason = e.strerror or e
        print(
            f"warning: cannot lock {path} ({reason}); make sure no other run uses "
            f"--workdir={workdir}",
            file=sys.stderr,
        )
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


def _holder(fd: int) -> str:
    """' (pid N)' or ' (pid N on host H)' from the lock file, '' if it does not say."""
    try:
        pid, host = os.pread(fd, 256, 0).decode().split()[:2]
    except (OSError, UnicodeDecodeError, ValueError):
        return ""
    return f" (pid {pid})" if host == socket.gethostname() else f" (pid {pid} on host {host})"


@contextlib.contextmanager
def locked_workdir(workdir: str | None):
    """The run's workdir, checked (writable_directory) and locked for the `with` block; only
    process 0 of a multi-process job takes the lock (they all write the same workdir)."""
    workdir = writable_directory(workdir, "--workdir")
    _check_entries(workdir)
    fd = acquire_lock(workdir) if jax.process_index() == 0 else None
    try:
        yield workdir
    finally:
        if fd is not None:
            os.close(fd)
