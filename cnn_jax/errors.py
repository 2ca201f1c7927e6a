"""The exception types for failures a user can act on. cnn_jax.cli prints their message as one
line (`error: ...`) on stderr and exits with their `exit_status`, never with a traceback."""

import contextlib
import errno
import os
import sys


class UserError(Exception):
    """A bad config value, missing data, or a mesh that does not fit: the user can fix it.
    Raised before anything compiles; exit status 2 (a usage error)."""

    exit_status = 2


class RunFailure(UserError):
    """The run started but cannot go on: training diverged (NaN/Inf), the disk is full, no
    checkpoint in the workdir restores. Exit status 1; what was saved before stays usable."""

    exit_status = 1


class Interrupted(Exception):
    """Ctrl-C (SIGINT) stopped the run. Its message, one line without "error:" (the user asked
    for it), says what was saved and how to go on; exit status 130, as a shell reports SIGINT."""

    exit_status = 130


def exit_interrupted(message: str, *signal_args) -> None:
    """A SIGINT handler (bind `message` with functools.partial): print `message` and end the
    process now, wherever the main thread is. Used where Ctrl-C has nothing to save (before
    training, or a second Ctrl-C while the first one's save is written). A KeyboardInterrupt
    instead can be lost (raised inside a garbage-collector callback, Python only reports it)
    or end in a crash as the interpreter shuts down around XLA's and tf.data's threads. Nothing
    is left half-written: checkpoints and config.json are written under temporary names and
    renamed, and the kernel releases the workdir's lock."""
    del signal_args
    for stream in (sys.stdout, sys.stderr):  # what was printed so far
        with contextlib.suppress(OSError, RuntimeError, ValueError):  # the main thread may be
            stream.flush()  # inside a write to the same stream (a reentrant call)
    os.write(2, (message + "\n").encode())  # unbuffered: safe whatever stderr was doing
    os._exit(Interrupted.exit_status)


# Where a write fails for lack of space: Python's OSError, or TensorStore (Orbax's array
# writer), which reports it as a ValueError whose text carries the OS error code.
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = (
    "No space left on device",
    "Disk quota exceeded",
    f"os_error_code='{errno.ENOSPC}'",
)


def is_disk_full(error: BaseException) -> bool:
    """True if `error`, or any exception it was raised from, is a full disk or quota."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(error) for text in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False
