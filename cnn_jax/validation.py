"""Every check of a user's config that can be made before anything compiles.

Each failure is a UserError with one line that names the field, the bad value and what is
allowed; main prints it and exits 2.
"""

import inspect
import itertools
import json
import math
import os

from cnn_jax import losses, models, parallel, paths
from cnn_jax.data import datasets, image_folder, preprocess
from cnn_jax.errors import UserError
from cnn_jax.models import vgg

CHOICES = {
    "optimizer": ("sgd", "adam"),
    "lr_schedule": ("constant", "step", "cosine", "plateau"),
    "spmd": ("shard_map", "pmap"),
    "eval_mode": ("center", "ten_crop", "dense"),
}


def _choice(config, field: str, allowed) -> None:
    value = config[field]
    if value not in allowed:
        raise UserError(f"--config.{field}={value!r} is not one of: {', '.join(map(str, allowed))}")


def _positive(config, *fields: str) -> None:
    for field in fields:
        if not config[field] > 0:
            raise UserError(f"--config.{field}={config[field]} must be > 0")


def check_model(config) -> None:
    """The model and its input size (also all that `python -m cnn_jax.summary` needs)."""
    models.build_model(config)  # unknown model / VGG letter
    _positive(config, "image_size")
    fixed = models.FIXED_IMAGE_SIZE.get(config.model)
    if fixed is not None and config.image_size != fixed:
        raise UserError(f"--config.image_size={config.image_size}: {config.model} takes {fixed}")
    smallest = models.MIN_IMAGE_SIZE.get(config.model, 1)
    if config.image_size < smallest:
        raise UserError(
            f"--config.image_size={config.image_size} is too small for {config.model}: "
            f"it needs at least {smallest}"
        )


def check_cpu_devices(config) -> None:
    if config.cpu_devices < 0:
        raise UserError(
            f"--config.cpu_devices={config.cpu_devices} must be >= 0 (0: one per CPU core)"
        )


def check_config(config, num_devices: int, process_count: int = 1) -> None:
    check_model(config)
    check_cpu_devices(config)
    datasets.dataset_spec(config)  # unknown dataset
    _choice(config, "loss", tuple(losses.LOSSES))
    _choice(config, "preprocess", tuple(preprocess.PREPROCESSORS))
    for field, allowed in CHOICES.items():
        _choice(config, field, allowed)
    _check_numbers(config)
    _check_augmentation_and_eval(config)

    data, _ = parallel.mesh_shape(config, num_devices)
    _check_model_axis(config, process_count)
    if data % process_count:
        raise UserError(
            f"the mesh's data axis ({data}) is not a multiple of the {process_count} processes: "
            "each process reads its own examples, so it must hold whole data shards (lower "
            "--config.mesh_model)"
        )
    if config.batch_size % data:
        raise UserError(
            f"--config.batch_size={config.batch_size} is not divisible by the mesh's data axis "
            f"({data} devices)"
        )
    if config.batch_size % process_count:
        raise UserError(
            f"--config.batch_size={config.batch_size} is not divisible by the "
            f"{process_count} processes"
        )
    if config.data_dir:
        paths.existing_directory(config.data_dir, "--config.data_dir")
    if config.manual_dir and os.path.isfile(config.manual_dir):  # a missing one: data/ says
        raise UserError(f"--config.manual_dir={config.manual_dir} is a file, not a directory")
    _check_image_folder_has_images(config)
    if config.warm_start_from and config.model != "vgg":
        raise UserError(
            f"--config.warm_start_from is VGG's warm start from a trained A (Sec. 3.1): it "
            f"needs --config.model=vgg, not {config.model!r}"
        )
    if config.warm_start_from:
        paths.existing_directory(config.warm_start_from, "--config.warm_start_from")


def _check_numbers(config) -> None:
    """Every number in its range; a float also finite (`1e999` parses as inf)."""
    for field, value in config.items():
        if any(isinstance(v, float) and not math.isfinite(v) for v in _values(value)):
            raise UserError(f"--config.{field}={value} must be a finite number")
    _positive(config, "batch_size", "image_size", "learning_rate", "log_every_steps",
              "checkpoint_every_steps", "keep_checkpoints", "eval_every_epochs", "step_factor",
              "lenet_map_j")  # fmt: skip
    if config.num_train_steps <= 0:
        _positive(config, "num_epochs")
    if config.dataset == "synthetic":
        _positive(config, "synthetic_train_size", "synthetic_eval_size", "synthetic_channels")
        check_num_classes(config)
    for field in ("dropout_rate", "momentum"):
        if not 0.0 <= config[field] < 1.0:
            raise UserError(f"--config.{field}={config[field]} must be in [0, 1)")
    for field, least in (("weight_decay", 0), ("warmup_epochs", 0), ("plateau_min_delta", 0),
                         ("plateau_max_drops", 0), ("plateau_patience", 1),
                         ("shuffle_buffer", 0)):  # fmt: skip
        if not config[field] >= least:
            raise UserError(f"--config.{field}={config[field]} must be >= {least}")
    epochs = tuple(config.step_epochs)
    if any(e < 0 for e in epochs) or any(a >= b for a, b in itertools.pairwise(epochs)):
        raise UserError(
            f"--config.step_epochs={epochs} must be non-negative and increasing (the epochs "
            "at which the learning rate is multiplied by step_factor)"
        )
    if not -(2**63) <= config.seed < 2**63:  # jax.random.key takes a 64-bit integer
        raise UserError(f"--config.seed={config.seed} must fit in 64 bits (|seed| < 2**63)")


def _values(value) -> tuple:
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def check_num_classes(config) -> None:
    """The class count the model gets: at least 2, and LeNet-5's ten digits for its RBF head.
    Called again once a dataset's own count is known (an image folder's class folders)."""
    count = config.num_classes
    where = {
        "synthetic": f"--config.num_classes={count}",
        "image_folder": f"--config.manual_dir={config.manual_dir} holds {count} class folder(s)",
    }.get(config.dataset, f"--config.dataset={config.dataset} has {count} classes")
    if count < 2:
        raise UserError(
            f"{where}: a classifier needs at least 2 classes (with 1, every prediction is "
            "right whatever the model learns)"
        )
    if config.model == "lenet5" and count != 10:
        raise UserError(
            f"{where}: LeNet-5's RBF output has one fixed prototype per digit, so it takes "
            "exactly 10 classes; --config=configs/lenet.py:modern (a softmax head) takes any "
            "number"
        )


def _check_model_axis(config, process_count: int) -> None:
    """A model axis > 1 splits a model's towers over devices: only models with towers (and
    only as many as they have) can be split; the pmap path runs in one process."""
    allowed = models.MODEL_AXIS_SIZES.get(config.model, (1,))
    if config.mesh_model not in allowed:
        with_towers = ", ".join(f"{m} ({'/'.join(map(str, s))})"
                                for m, s in models.MODEL_AXIS_SIZES.items())  # fmt: skip
        raise UserError(
            f"--config.mesh_model={config.mesh_model}: {config.model} cannot be split over "
            f"the model axis; it takes {' or '.join(map(str, allowed))} "
            f"(models with towers: {with_towers})"
        )
    if config.spmd == "pmap" and process_count > 1:
        raise UserError(
            f"--config.spmd=pmap runs in one process ({process_count} were started); "
            "multi-process runs use spmd=shard_map"
        )


def _check_augmentation_and_eval(config) -> None:
    """The per-paper preprocessing and evaluation modes (cnn_jax.data.preprocess, evaluate)."""
    crop = preprocess.PAPER_CROP
    # Grey and RGB images are converted to the channels the op needs (preprocess.INPUT_CHANNELS);
    # only synthetic data can have other counts.
    have, convertible = datasets.num_channels(config), preprocess.CONVERTIBLE_CHANNELS
    if preprocess.INPUT_CHANNELS[config.preprocess] is not None and have not in convertible:
        raise UserError(
            f"--config.preprocess={config.preprocess} takes images with "
            f"{' or '.join(map(str, convertible))} channels (dataset {config.dataset!r} has "
            f"{have}); use --config.preprocess=scale_to_unit for other counts"
        )
    if config.pca_lighting_std < 0:
        raise UserError(f"--config.pca_lighting_std={config.pca_lighting_std} must be >= 0")
    if config.preprocess == "vgg" and not crop <= config.train_scale_min <= config.train_scale_max:
        raise UserError(
            f"--config.train_scale_min={config.train_scale_min} and --config.train_scale_max="
            f"{config.train_scale_max} must satisfy {crop} <= min <= max (sides at a {crop} crop)"
        )
    multi_view = config.eval_mode in ("ten_crop", "dense")
    if multi_view and config.preprocess not in preprocess.MULTI_VIEW_PREPROCESSORS:
        raise UserError(
            f"--config.eval_mode={config.eval_mode} needs --config.preprocess in: "
            f"{', '.join(preprocess.MULTI_VIEW_PREPROCESSORS)} (not {config.preprocess!r})"
        )
    if config.eval_mode == "dense":
        scales = tuple(config.eval_scales)
        if not scales or min(scales) < crop:
            raise UserError(
                f"--config.eval_scales={scales} must be non-empty, each >= {crop} (VGG Sec. 3.2)"
            )
        call = type(models.build_model(config)).__call__
        if "dense" not in inspect.signature(call).parameters:
            raise UserError(
                f"--config.eval_mode=dense needs a model that runs convolutionally "
                f"(vgg); {config.model} does not"
            )
        if config.image_size < vgg.DENSE_MIN_IMAGE_SIZE:  # FC6's 7x7 window must fit
            raise UserError(
                f"--config.eval_mode=dense needs --config.image_size >= "
                f"{vgg.DENSE_MIN_IMAGE_SIZE} (got {config.image_size}): FC6 slides as a 7x7 "
                "convolution over the last feature map (VGG Sec. 3.2)"
            )


# Fields a checkpoint's meaning depends on: they change parameter or optimiser-state shapes
# (model .. optimizer) or which examples step s trains on (dataset .. batch_size).
# Resuming a workdir whose saved config.json differs in any of them is refused; every other
# field (num_epochs, num_train_steps, eval/log/checkpoint frequency, progress_bar, ...) may
# change between runs of the same workdir. Fields absent from an older config.json are skipped.
RESUME_FIXED_FIELDS = (
    "model", "vgg_variant", "batch_norm", "width_divisor", "num_classes", "optimizer",
    "dataset", "image_size", "synthetic_channels", "synthetic_train_size",
    "synthetic_eval_size", "preprocess", "batch_size",
)  # fmt: skip


def check_resume_config(config, saved: dict, workdir: str) -> None:
    """Refuse to resume `workdir` (whose checkpoints were made with `saved`, its config.json)
    under a config that changes what the checkpoints mean. One line lists every difference."""
    current = config.to_dict()
    differing = []
    for field in RESUME_FIXED_FIELDS:
        if field in saved and field in current:
            now = json.loads(json.dumps(current[field], default=str))  # as config.json has it
            if now != saved[field]:
                differing.append(f"{field} (saved {saved[field]!r}, now {now!r})")
    if differing:
        raise UserError(
            f"--workdir={workdir} holds checkpoints of a different run: {'; '.join(differing)}. "
            "Use a new --workdir, or the saved values to resume"
        )


def _check_image_folder_has_images(config) -> None:
    """image_folder: a train split, and no split folder without images (TFDS's folder builder
    fails deep inside tf.data on an empty one)."""
    root = os.path.expanduser(config.manual_dir)
    if config.dataset != "image_folder" or not os.path.isdir(root):
        return  # a missing root is reported by cnn_jax.data.image_folder

    def images(split):
        walk = os.walk(os.path.join(root, split))
        return sum(f.lower().endswith(image_folder.IMAGE_EXTENSIONS) for *_, fs in walk for f in fs)

    splits = sorted(d for d in os.listdir(root)
                    if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))  # fmt: skip
    empty = [s for s in splits if not images(s)]
    if "train" not in splits or empty:
        where = ", ".join(os.path.join(root, s) for s in empty) or os.path.join(root, "train")
        raise UserError(
            f"--config.manual_dir={root}: no images ({', '.join(image_folder.IMAGE_EXTENSIONS)}) "
            f"in {where}; expected ROOT/SPLIT/CLASS/*.jpg with a train split"
        )
    # Checked here, not when the first evaluation opens the split, so that a wrong name
    # stops the run before it trains.
    if not set(splits) & set(image_folder.EVAL_SPLIT_NAMES):
        raise UserError(
            f"--config.manual_dir={root} has no {' / '.join(image_folder.EVAL_SPLIT_NAMES)} "
            f"split to evaluate on (found: {', '.join(splits)}); expected ROOT/SPLIT/CLASS/*.jpg"
        )
    image_folder.check_eval_classes(root)
