"""WORKDIR/imported_weights.json: what an imported checkpoint came from and what was folded.

    read(path) -> dict | None        path: a workdir, its checkpoints/ folder, or a step in it
    mean_rgb(path) -> tuple | None   the mean RGB runs on those weights must subtract

The record says where the weights came from (source, file, sha256), what the network is,
and the input convention folded into conv1_1 (channel order, the std divided out) together
with the one part that cannot be folded exactly, the mean RGB (docs/weights.md). Runs on the
workdir (eval, resume) and runs that start from it (run.init_from) take `mean_rgb` from here
when --config.input.mean_rgb is not set (cnn_jax.experiment.resolve). The file stays when
training goes on in the workdir: the later checkpoints still see inputs with that mean.

A workdir without the record (a run fine-tuned from imported weights, or one given its own
mean) has its mean in the config.json its run wrote (input.mean_rgb, resolved), which
`recorded_mean_rgb` reads in its place: the mean belongs to the checkpoints, whichever run
made them.
"""

import json
import os

from cnn_jax import checkpoint
from cnn_jax.errors import UserError
from cnn_jax.paths import CHECKPOINTS_DIR, CONFIG_FILE, IMPORTED_WEIGHTS_FILE


def workdir_of(path: str) -> str:
    """The workdir of `path`: itself, or the workdir above a checkpoints/ folder or a step
    folder inside one."""
    path = os.path.abspath(os.path.expanduser(path))
    for candidate in (path, os.path.dirname(path)):
        if os.path.basename(candidate) == CHECKPOINTS_DIR:
            return os.path.dirname(candidate)
    return path


def file_of(path: str) -> str:
    return os.path.join(workdir_of(path), IMPORTED_WEIGHTS_FILE)


def read(path: str) -> dict | None:
    """The import record of the workdir at or above `path`, or None if it was not imported."""
    target = file_of(path)
    if not os.path.isfile(target):
        return None
    try:
        with open(target) as f:
            record = json.load(f)
        if not isinstance(record, dict):
            raise ValueError(f"a JSON {type(record).__name__}, not an object")
    except (OSError, ValueError) as e:
        raise UserError(
            f"{target} is unreadable ({e}); it records the mean RGB the imported weights "
            "need: restore it (python -m cnn_jax.weights import writes it again)"
        ) from e
    return record


def mean_rgb(path: str) -> tuple[float, float, float] | None:
    """The mean RGB (0..255) the weights at or above `path` expect, or None where they
    record none (recorded_mean_rgb)."""
    recorded = recorded_mean_rgb(path)
    return None if recorded is None else recorded[0]


def recorded_mean_rgb(path: str) -> tuple[tuple[float, float, float], str] | None:
    """(mean RGB, the file that records it) for the checkpoints at or above `path`: the
    import record's, or else the input.mean_rgb of the config.json of the run that made
    them (a run on imported weights, which took theirs, or one given its own); None where
    neither names one (the paper's mean)."""
    workdir = workdir_of(path)
    record, where = read(path), file_of(path)
    if record is not None:
        mean = record.get("mean_rgb")
    else:
        where = os.path.join(workdir, CONFIG_FILE)
        saved = checkpoint.saved_config(workdir) or {}
        mean = (saved.get("input") or {}).get("mean_rgb") or None
        if mean is None:
            return None
    if not (isinstance(mean, list | tuple) and len(mean) == 3):
        raise UserError(f"{where}: mean_rgb is {mean!r}, not three numbers")
    return tuple(float(v) for v in mean), where


def write(workdir: str, record: dict) -> str:
    """Write the record atomically (a kill mid-write leaves none or the old one)."""
    target = os.path.join(workdir, IMPORTED_WEIGHTS_FILE)
    with open(target + ".tmp", "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(target + ".tmp", target)
    return target
