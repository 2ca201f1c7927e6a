"""The exception types for failures a user can act on. cnn_jax.cli prints their message as one
line (`error: ...`) on stderr and exits with their `exit_status`, never with a traceback."""

import errno


class UserError(Exception):
    """A bad config value, missing data, or a mesh that does not fit: the user can fix it.
    Raised before anything compiles; exit status 2 (a usage error)."""

    exit_status = 2


class RunFailure(UserError):
    """The run started but cannot go on: training diverged (NaN/Inf), the disk is full, no
    checkpoint in the workdir restores. Exit status 1; what was saved before stays usable."""

    exit_status = 1


# Where a write fails for lack of space: Python's OSError, or TensorStore (Orbax's array
# writer), which reports it as a ValueError whose text carries the OS error code.
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded",
                   f"os_error_code='{errno.ENOSPC}'")  # fmt: skip


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
