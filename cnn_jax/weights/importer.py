"""A converted file written as a cnn_jax workdir: the trainer's own checkpoint, at step 0.

    facts = import_weights("torchvision", "vgg16-397923af.pth", "runs/vgg16_tv")

The workdir is what a training run leaves, so that `cnn_jax.main` evaluates it
(--config.eval.only=True), resumes training from it, and another run starts from it
(--config.run.init_from=WORKDIR), with the config of the same network (configs/vgg.py:D, and
--config.model.batch_norm=True for a `_bn` file):

- checkpoints/0: the whole TrainState, saved by the Checkpointer the trainer uses. Step 0,
  the imported parameters (and batch-norm statistics), a fresh optimiser state (zero
  momentum) for the config's optimiser, and the config seed's RNG key. Step 0 because no step
  of cnn_jax's training has run: a resumed run trains its whole schedule on top of them.
- config.json: only the fields the weights fix (the model's name, variant, batch_norm and
  width_divisor, data.num_classes, input.preprocess=vgg with its input.mean_rgb, and
  optim.name, which fixes the optimiser state's layout). The resume check
  (validation.check_resume_config) compares the fields the saved record has, so any dataset,
  image size or schedule evaluates or resumes, while another network, class count or
  optimiser is one error line. A resumed run writes its own full config.json over it.
- imported_weights.json: where the weights came from and what was folded
  (cnn_jax.weights.metadata), with the mean RGB runs on them take.

The records are written before the checkpoint, whose save is atomic: an import killed
midway leaves no checkpoint, and the same command then starts over.
"""

import hashlib
import os

import jax
import ml_collections
import numpy as np

from cnn_jax import checkpoint, defaults, paths, train
from cnn_jax import experiment as experiment_lib
from cnn_jax.errors import UserError
from cnn_jax.models import vgg
from cnn_jax.weights import keras, layout, metadata, torchvision

SOURCES = {"torchvision": torchvision.load, "keras": keras.load}
STEP = 0
# The config.json fields an imported checkpoint fixes (see the module doc).
RECORDED_FIELDS = {
    "model": ("name", "variant", "batch_norm", "width_divisor"),
    "data": ("num_classes",),
    "input": ("preprocess", "mean_rgb"),
    "optim": ("name",),
}


def convert(source: str, path: str, *, reader: str = "auto"):
    """(variables, Facts, Imported) of a source's file; UserError naming the layer or key
    for a file that is not that source's VGG."""
    if source not in SOURCES:
        raise UserError(f"--from={source!r} is not one of: {', '.join(SOURCES)}")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise UserError(
            f"--file={path} does not exist"
            if not os.path.exists(path)
            else f"--file={path} is not a file"
        )
    imported = SOURCES[source](path, reader=reader)
    flag = f"--file={path}"
    facts = layout.identify(imported, flag)
    return layout.to_variables(imported, facts, flag), facts, imported


def run_config(
    facts: layout.Facts, convention: dict, config=None, flag: str = "--file"
) -> ml_collections.ConfigDict:
    """The config the checkpoint is made for: `config` (the user's --config), checked against
    the file, or else the vgg defaults with the file's network; the file's mean RGB and class
    count filled in."""
    if config is None:
        c = defaults.get_default_config("vgg")
        c.model.variant, c.model.batch_norm = facts.variant, facts.batch_norm
        c.model.width_divisor = facts.width_divisor
        c.input.preprocess = "vgg"
    else:
        c = config.copy_and_resolve_references()
        _check_config(facts, c, flag)
    if not tuple(c.input.mean_rgb):
        c.input.mean_rgb = tuple(convention["mean_rgb"])
    c = experiment_lib.with_synthetic_data(c)  # only the model and optimiser are built
    c.data.num_classes, c.data.synthetic_channels = facts.num_classes, 3
    return c


def _check_config(facts: layout.Facts, c, flag: str) -> None:
    wanted = {
        "model.name": ("vgg", c.model.name),
        "model.variant": (facts.variant, _letter(c.model.get("variant", ""))),
        "model.batch_norm": (facts.batch_norm, c.model.get("batch_norm")),
        "model.width_divisor": (facts.width_divisor, c.model.get("width_divisor")),
        "input.preprocess": ("vgg", c.input.preprocess),
    }
    for field, (needed, given) in wanted.items():
        if needed != given:
            raise UserError(
                f"{flag} holds {facts.describe()}, but --config.{field}={given}: the file needs "
                f"--config.{field}={needed}"
            )


def _letter(variant: str) -> str:
    try:
        return vgg.resolve_variant(variant)
    except UserError:
        return variant


def import_weights(
    source: str, path: str, workdir: str, *, config=None, reader: str = "auto"
) -> tuple[layout.Facts, str]:
    """Convert `path` and write it into `workdir` (module doc); (Facts, the workdir). A
    workdir that holds checkpoints is refused, before the file is read and again under the
    workdir's lock."""
    _check_no_checkpoints(os.path.expanduser(workdir), [])
    variables, facts, imported = convert(source, path, reader=reader)
    resolved_input = run_config(facts, imported.convention, config, f"--file={path}")
    with paths.locked_workdir(workdir) as workdir:
        ckpt = checkpoint.Checkpointer(
            paths.checkpoints_dir(workdir), keep=resolved_input.run.keep_checkpoints
        )
        try:
            _check_no_checkpoints(workdir, ckpt.all_steps())
            trainer = train.build_trainer(resolved_input)
            state = train_state(trainer, variables)
            metadata.write(workdir, _import_record(source, path, facts, imported, trainer))
            checkpoint.write_config(_config_record(trainer.record), workdir)
            ckpt.save(STEP, state)
            ckpt.wait()
        finally:
            ckpt.close()
    return facts, workdir


def _check_no_checkpoints(workdir: str, steps: list[int]) -> None:
    directory = paths.checkpoints_dir(workdir)
    if not steps and os.path.isdir(directory):
        steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    if steps:
        raise UserError(
            f"--workdir={workdir} already holds checkpoints (steps "
            f"{', '.join(map(str, steps))}): import into a new --workdir"
        )


def train_state(trainer: train.Trainer, variables: dict) -> train.TrainState:
    """The state train.create_train_state makes for `trainer` (step 0, the seed's RNG key,
    the structure and dtypes of its parameters and optimiser state), holding the imported
    variables, with the optimiser state initialised for them.

    Built from the state's shapes: the random initialisation is never compiled or run
    (threefry compiles slowly on a CPU, and its values would be discarded). Every array is on
    this machine's first device: a checkpoint restores onto whatever mesh the run that
    reads it has (Checkpointer.restore takes the target's shardings), and a replicated copy
    per device would only multiply VGG's 528 MB and Orbax's per-replica work while saving.
    """
    like = trainer.abstract_state()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    place = lambda array, a: jax.device_put(np.asarray(array, a.dtype), device)
    params = jax.tree.map(place, variables["params"], like.params)
    batch_stats = jax.tree.map(place, variables["batch_stats"], like.batch_stats)
    opt_state = jax.jit(trainer.tx.init)(params)
    seed = trainer.experiment.loop.seed
    # create_train_state's split: the state keeps the second key.
    rng = jax.jit(lambda: jax.random.split(jax.random.key(seed))[1], out_shardings=device)()
    return train.TrainState(
        step=place(np.zeros([], np.int32), like.step),
        params=params,
        batch_stats=batch_stats or {},
        opt_state=opt_state,
        rng=rng,
    )


def _config_record(record: dict) -> dict:
    return {
        group: {field: record[group][field] for field in fields}
        for group, fields in RECORDED_FIELDS.items()
    }


def _import_record(source, path, facts: layout.Facts, imported, trainer) -> dict:
    return {
        "source": source,
        "file": os.path.abspath(path),
        "sha256": _sha256(path),
        "bytes": os.path.getsize(path),
        "network": facts.describe(),
        "model": {
            "name": "vgg",
            "variant": facts.variant,
            "batch_norm": facts.batch_norm,
            "width_divisor": facts.width_divisor,
            "num_classes": facts.num_classes,
        },
        "step": STEP,
        **imported.convention,
        "mean_rgb": list(trainer.config.input.mean_rgb),
    }


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
