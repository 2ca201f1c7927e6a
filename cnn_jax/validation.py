"""The checks of a config that span its owners, made before anything compiles.

Each group's own fields are checked by the part that takes them, as cnn_jax.experiment builds
it (a dataset its name and directories, a model its fields and input size, the optimiser its
ranges). What is left here involves several groups at once: numbers anywhere in the config
that are not finite, the mesh against the batch, the devices and the processes, and a resumed
workdir against the config its checkpoints were made with. Each failure is a UserError with
one line that names the field, the bad value and what is allowed; main prints it and exits 2.
"""

import json
import math

from cnn_jax import parallel
from cnn_jax.errors import UserError

SPMD = ("shard_map", "pmap")


def check_numbers(fields, prefix: str = "") -> None:
    """Every float in a config (its fields, groups nested) finite: `1e999` parses as inf."""
    for field, value in fields.items():
        name = f"{prefix}{field}"
        if hasattr(value, "items"):
            check_numbers(value, f"{name}.")
        elif any(isinstance(v, float) and not math.isfinite(v) for v in _values(value)):
            raise UserError(f"--config.{name}={value} must be a finite number")


def _values(value) -> tuple:
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def check_cpu_devices(cpu_devices: int) -> None:
    if cpu_devices < 0:
        raise UserError(
            f"--config.mesh.cpu_devices={cpu_devices} must be >= 0 (0: one per CPU core)"
        )


def check_mesh(
    *,
    data: int,
    model: int,
    spmd: str,
    batch_size: int,
    num_devices: int,
    process_count: int = 1,
) -> None:
    """The mesh (config.mesh, its model axis chosen) against the model, the batch, the
    devices and the processes."""
    if spmd not in SPMD:
        raise UserError(f"--config.mesh.spmd={spmd!r} is not one of: {', '.join(SPMD)}")
    if not batch_size > 0:
        raise UserError(f"--config.input.batch_size={batch_size} must be > 0")
    data, _ = parallel.mesh_shape(data, model, num_devices)
    # Whether model_name can be split over a model axis of `model` devices is its own check
    # (cnn_jax.models.build_model).
    if spmd == "pmap" and process_count > 1:
        raise UserError(
            f"--config.mesh.spmd=pmap runs in one process ({process_count} were started); "
            "multi-process runs use spmd=shard_map"
        )
    if data % process_count:
        raise UserError(
            f"the mesh's data axis ({data}) is not a multiple of the {process_count} processes: "
            "each process reads its own examples, so it must hold whole data shards (lower "
            "--config.mesh.model)"
        )
    if batch_size % data:
        raise UserError(
            f"--config.input.batch_size={batch_size} is not divisible by the mesh's data axis "
            f"({data} devices)"
        )
    if batch_size % process_count:
        raise UserError(
            f"--config.input.batch_size={batch_size} is not divisible by the "
            f"{process_count} processes"
        )


# Fields a checkpoint's meaning depends on: they change parameter or optimiser-state shapes
# (the whole model group, the class count, the optimiser) or which examples step s trains on
# (the data source, image size, preprocessing, batch size). Resuming a workdir whose saved
# config.json differs in any of them is refused; every other field (run length, eval, log and
# checkpoint frequency, progress bar, ...) may change between runs of the same workdir. Fields
# absent from an older config.json are skipped.
RESUME_FIXED_FIELDS = (
    "model",
    "data.name",
    "data.num_classes",
    "data.synthetic_channels",
    "data.synthetic_train_size",
    "data.synthetic_eval_size",
    "input.image_size",
    "input.preprocess",
    "input.batch_size",
    "optim.name",
)


def _fixed_fields(saved: dict, current: dict) -> list[str]:
    """RESUME_FIXED_FIELDS with a group spelled out as its fields (the model's name first),
    but not the model's warm start, which only a new run reads."""
    fields = []
    for field in RESUME_FIXED_FIELDS:
        if "." in field:
            fields.append(field)
            continue
        names = set(_group(saved, field)) | set(_group(current, field))
        names.discard("warm_start_from")
        fields += [f"{field}.{n}" for n in sorted(names, key=lambda n: (n != "name", n))]
    return fields


def _group(tree: dict, name: str) -> dict:
    group = tree.get(name)
    return group if isinstance(group, dict) else {}


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


_ABSENT = object()


def check_resume_config(record: dict, saved: dict, workdir: str) -> None:
    """Refuse to resume `workdir` (whose checkpoints were made with `saved`, its config.json)
    under a config (`record`: its dict) that changes what the checkpoints mean. One line lists
    every difference."""
    current = json.loads(json.dumps(record, default=str))  # as config.json has it
    differing = []
    for field in _fixed_fields(saved, current):
        was, now = _lookup(saved, field), _lookup(current, field)
        if was is not _ABSENT and now is not _ABSENT and was != now:
            differing.append(f"{field} (saved {was!r}, now {now!r})")
    if differing:
        raise UserError(
            f"--workdir={workdir} holds checkpoints of a different run: {'; '.join(differing)}. "
            "Use a new --workdir, or the saved values to resume"
        )
