"""Where a config becomes arguments: the one module that reads its fields.

Each group goes to its owner (cnn_jax/defaults.py lists them): `model` to cnn_jax.models,
`data` to datasets.Source, `input` to preprocess.Preprocessing and the pipeline, `optim` to
cnn_jax.optim, `loss` to cnn_jax.losses, `eval` to cnn_jax.evaluate, `mesh` to
cnn_jax.parallel, `run` to the loop. Every owner checks its own arguments as it is built, so
`build` is also the check of a whole config, done before anything compiles; cnn_jax.validation
adds the checks that span owners.

    resolved = resolve(config, num_devices, process_count)   # a copy; the user's is unchanged
    experiment = build(resolved)                             # every part, checked
"""

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from cnn_jax import evaluate, finetune, losses, models, optim, parallel, paths, sdlm, validation
from cnn_jax.data import datasets, pipeline, preprocess
from cnn_jax.errors import UserError
from cnn_jax.models import ops as model_ops
from cnn_jax.weights import metadata as weights_metadata

# Config fields (group, field) that name a directory. A shell leaves `~` alone in
# `--config.data.data_dir=~/x` (after `=`, mid-word), so the run expands it itself.
PATH_FIELDS = (
    ("data", "data_dir"),
    ("data", "manual_dir"),
    ("model", "warm_start_from"),
    ("run", "init_from"),
)
# The model field that is not the network's: the checkpoint a new run starts from (VGG, Sec. 3.1).
WARM_START_FIELD = "warm_start_from"


def source(config) -> datasets.Source:
    return datasets.Source(**config.data, image_size=config.input.image_size)


def preprocessing(config) -> preprocess.Preprocessing:
    i = config.input
    return preprocess.Preprocessing(
        name=i.preprocess,
        image_size=i.image_size,
        lenet_distortions=i.lenet_distortions,
        pca_lighting_std=i.pca_lighting_std,
        train_scale_min=i.train_scale_min,
        train_scale_max=i.train_scale_max,
        mean_rgb=tuple(i.mean_rgb),
    )


def model(config):
    """The network of a resolved config (its class count and precision filled in)."""
    name = config.model.name
    classes_from = source(config).classes_flag
    models.check_input(name, config.input.image_size, config.data.num_classes, classes_from)
    fields = {k: v for k, v in config.model.items() if k not in ("name", WARM_START_FIELD)}
    return models.build_model(
        name,
        num_classes=config.data.num_classes,
        dtype=jnp.bfloat16 if config.run.half_precision else jnp.float32,
        model_axis=config.mesh.model,
        **fields,
    )


def evaluators(config, model_module, loss) -> tuple[evaluate.Evaluator, ...]:
    """The config's evaluators, unbound (cnn_jax.train binds them to the mesh)."""
    prep = preprocessing(config)
    return tuple(
        evaluate.EVALUATORS[name](
            model=model_module,
            loss=loss,
            prep=prep,
            top5=config.data.num_classes > 5,
            scales=tuple(config.eval.scales),
            shape_step=config.eval.shape_step,
        )
        for name in evaluate.names(config.eval.evaluators)
    )


def resolve(
    config, num_devices: int, process_count: int = 1, workdir: str | None = None
) -> ml_collections.ConfigDict:
    """A copy of config with what depends on the machine and the data filled in: `~` in
    paths expanded, an automatic model axis chosen (mesh.model=0), run.half_precision where
    unset, data.num_classes the dataset's own, input.mean_rgb where unset that of the weights
    the run's checkpoints hold (`workdir`'s) or start from (run.init_from), if they record
    one. config.json records this copy."""
    c = config.copy_and_resolve_references()
    for group, field in PATH_FIELDS:  # a group without the field (warm_start_from) is skipped
        if c[group].get(field):
            c[group][field] = os.path.expanduser(c[group][field])
    if c.mesh.model == parallel.AUTO_MODEL_AXIS:
        towers = max(models.spec(c.model.name).model_axis_sizes)
        c.mesh.model = parallel.auto_model_axis(
            towers,
            num_devices=num_devices,
            batch_size=c.input.batch_size,
            mesh_data=c.mesh.data,
            process_count=process_count,
        )
    if c.run.half_precision is None:
        # bfloat16 where the backend's kernels run it faster than float32 (GPU, TPU); not on
        # CPU, with or without AVX512_BF16 (ops.bfloat16_is_faster, docs/performance.md).
        c.run.half_precision = model_ops.bfloat16_is_faster(jax.default_backend())
    c.data.num_classes = source(c).classes
    _recorded_mean_rgb(c, workdir)
    return c


def _recorded_mean_rgb(c, workdir: str | None) -> None:
    """input.mean_rgb, where the user left it empty, from the checkpoints the run resumes or
    evaluates (its workdir's) or else starts from (run.init_from): imported weights expect
    their source's mean (cnn_jax.weights.metadata), and one line says which was taken."""
    spec = preprocess.PREPROCESSORS.get(c.input.preprocess)
    if tuple(c.input.mean_rgb) or spec is None or "mean_rgb" not in spec.params:
        return
    for path in (workdir, c.run.get("init_from", "")):
        recorded = weights_metadata.recorded_mean_rgb(path) if path else None
        if recorded is not None:
            c.input.mean_rgb, where = recorded
            if jax.process_index() == 0:
                print(
                    f"input: mean RGB {', '.join(f'{v:g}' for v in c.input.mean_rgb)} from "
                    f"{where}, the weights' own (--config.input.mean_rgb=(R,G,B) overrides)"
                )
            return


def with_synthetic_data(config) -> ml_collections.ConfigDict:
    """A copy of config that reads synthetic examples of its dataset's shape and classes in
    place of the dataset itself (which may be ImageNet, not prepared on this machine)."""
    config = config.copy_and_resolve_references()
    data, spec = config.data, datasets.DATASETS.get(config.data.name)
    if spec is None:  # an unknown name: Source reports it when the run is built
        return config
    if data.name != "synthetic":
        data.synthetic_channels = spec.channels
        data.num_classes = spec.num_classes or data.num_classes
        data.name = "synthetic"
    data.synthetic_train_size = max(data.synthetic_train_size, config.input.batch_size)
    return config


def mesh_notice(name: str, model_axis: int, num_devices: int) -> str | None:
    """The line a run prints about the model axis of a model with towers."""
    towers = max(models.spec(name).model_axis_sizes)
    if towers == 1:
        return None
    if model_axis == towers:
        return (
            f"mesh: {name}'s {towers} towers on separate devices, the paper's split "
            f"(data={num_devices // towers} x model={towers})"
        )
    return (
        f"mesh: {name}'s {towers} towers together on each of the {num_devices} "
        f"device(s) (data={num_devices} x model=1); a device per tower needs a multiple of "
        f"{towers} devices that splits the batch evenly (--config.mesh.model={towers} insists)"
    )


@dataclasses.dataclass(frozen=True)
class Loop:
    """How the training loop runs (the run group, and how often the eval group evaluates)."""

    seed: int
    total_steps: int
    steps_per_epoch: int
    log_every_steps: int
    eval_every_steps: int
    checkpoint_every_steps: int
    keep_checkpoints: int
    progress_bar: bool
    eval_only: bool
    # The trained weights a new run starts from (run.init_from, or VGG's warm start).
    init_from: finetune.InitFrom | None = None


def _check_run(run, every_epochs: float) -> None:
    """The run group's fields (and how often to evaluate): the loop's own checks."""
    for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if not run[field] > 0:
            raise UserError(f"--config.run.{field}={run[field]} must be > 0")
    if not -(2**63) <= run.seed < 2**63:  # jax.random.key takes a 64-bit integer
        raise UserError(f"--config.run.seed={run.seed} must fit in 64 bits (|seed| < 2**63)")
    if run.num_train_steps <= 0 and not run.num_epochs > 0:
        raise UserError(f"--config.run.num_epochs={run.num_epochs} must be > 0")
    if not every_epochs > 0:
        raise UserError(f"--config.eval.every_epochs={every_epochs} must be > 0")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Every part of a run, built and checked; cnn_jax.train compiles and runs them."""

    config: ml_collections.ConfigDict  # the resolved copy (config.json)
    model: object
    model_name: str
    loss: Callable
    optimizer: optim.Optimizer
    evaluators: tuple
    source: datasets.Source
    prep: preprocess.Preprocessing
    batch_size: int
    cache: bool
    shuffle_buffer: int
    input_shape: tuple[int, ...]
    mesh_shape: tuple[int, int]
    spmd: str
    loop: Loop
    nan_at_step: int  # fault testing (run.debug_inject_nan_at_step)
    trainable: finetune.Trainable | None = None  # optim.trainable; None: every layer trains

    def train_batches(self, start_step: int):
        return pipeline.train_dataset(
            self.source,
            self.prep,
            batch_size=self.batch_size,
            seed=self.loop.seed,
            cache=self.cache,
            shuffle_buffer=self.shuffle_buffer,
            start_step=start_step,
        )

    def eval_batches(self, views: dict):
        return pipeline.eval_dataset(
            self.source, self.prep, views, batch_size=self.batch_size, cache=self.cache
        )


def _total_steps(run, steps_per_epoch: int) -> int:
    if run.num_train_steps > 0:
        return run.num_train_steps
    return max(1, int(run.num_epochs * steps_per_epoch))


def _sdlm_arguments(config, net, batch_size: int) -> dict:
    """SDLM's own arguments: its curvature estimate reads the model and the loss."""
    if config.optim.name != "sdlm":
        return {}
    curvature = sdlm.make_curvature(
        net, config.model.name, config.loss.name, config.loss.lenet_map_j
    )
    return {"batch_size": batch_size, "curvature": curvature}


def build(config, num_devices: int, process_count: int = 1) -> Experiment:
    """Every part of a resolved config's run, each checked by its owner. Whatever can be
    checked without the data is, before the dataset is opened (and prepared, if it is not
    yet: hours, for ImageNet)."""
    _check_before_data(config, num_devices, process_count)
    src, prep = source(config), preprocessing(config)
    channels = pipeline.input_channels(src, prep)
    net = model(config)
    loss = losses.make_loss(config.loss.name, lenet_map_j=config.loss.lenet_map_j)
    evaluators_ = evaluators(config, net, loss)
    image_shape = (prep.image_size, prep.image_size, channels)
    init_from, trainable = _fine_tuning(config, net, image_shape)  # before the data opens
    batch_size = config.input.batch_size
    steps_per_epoch = pipeline.steps_per_epoch(src, batch_size)  # opens the dataset
    if steps_per_epoch < 1:
        raise UserError(f"--config.input.batch_size={batch_size} is larger than the training split")
    total = _total_steps(config.run, steps_per_epoch)
    loop = Loop(
        seed=config.run.seed,
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        log_every_steps=config.run.log_every_steps,
        eval_every_steps=max(1, round(config.eval.every_epochs * steps_per_epoch)),
        checkpoint_every_steps=config.run.checkpoint_every_steps,
        keep_checkpoints=config.run.keep_checkpoints,
        progress_bar=config.run.progress_bar,
        eval_only=config.eval.only,
        init_from=init_from,
    )
    return Experiment(
        config=config,
        model=net,
        model_name=config.model.name,
        loss=loss,
        optimizer=optim.make_optimizer(
            **{**config.optim, "trainable": trainable.mask if trainable else None},
            steps_per_epoch=steps_per_epoch,
            total_steps=total,
            **_sdlm_arguments(config, net, batch_size),
        ),
        evaluators=evaluators_,
        source=src,
        prep=prep,
        batch_size=batch_size,
        cache=config.input.cache,
        shuffle_buffer=config.input.shuffle_buffer,
        input_shape=(1, prep.image_size, prep.image_size, channels),
        mesh_shape=parallel.mesh_shape(config.mesh.data, config.mesh.model, num_devices),
        spmd=config.mesh.spmd,
        loop=loop,
        nan_at_step=config.run.debug_inject_nan_at_step,
        trainable=trainable,
    )


def _fine_tuning(config, net, image_shape):
    """(init_from, trainable): the trained weights a new run starts from (run.init_from or
    VGG's warm start), checked against the model and the checkpoint's layers, and the layers
    that train (optim.trainable), found in the model; (None, None) for a run from scratch
    that trains everything. Reads no data and compiles nothing."""
    warm_from, init_path = config.model.get(WARM_START_FIELD, ""), config.run.init_from
    rule = optim.parse_trainable(config.optim.trainable)
    if not (warm_from or init_path or rule[0] != "all"):
        return None, None
    variables = finetune.abstract_variables(net, image_shape)
    layers = finetune.model_layers(net, image_shape)
    init_from = None
    if warm_from:
        init_from = finetune.warm_start_selection(warm_from, variables)
    elif init_path:
        init_from = finetune.init_from_selection(init_path, layers)
    if init_from is not None:
        finetune.check(init_from, variables)
    trainable = None
    if rule[0] != "all":
        trainable = finetune.trainable(config.optim.trainable, rule, layers, variables["params"])
    return init_from, trainable


def _check_before_data(config, num_devices: int, process_count: int) -> None:
    """The checks that need neither the data nor a model: numbers, the mesh, the optimiser,
    the input pipeline's shuffling, the loop, the directory of the weights a new run starts
    from (run.init_from, model.warm_start_from)."""
    validation.check_numbers(config)
    validation.check_mesh(
        data=config.mesh.data,
        model=config.mesh.model,
        spmd=config.mesh.spmd,
        batch_size=config.input.batch_size,
        num_devices=num_devices,
        process_count=process_count,
    )
    optim.check_fields(**config.optim)
    pipeline.check_shuffle_buffer(config.input.shuffle_buffer)
    _check_run(config.run, config.eval.every_epochs)
    evaluate.check_names(
        config.eval.evaluators,
        dense_model=models.spec(config.model.name).dense,
        process_count=process_count,
    )
    warm_start_from = config.model.get(WARM_START_FIELD, "")
    if warm_start_from:
        paths.existing_directory(warm_start_from, f"--config.model.{WARM_START_FIELD}")
    if config.run.init_from:
        paths.existing_directory(config.run.init_from, finetune.INIT_FROM_FLAG)
        if warm_start_from:
            raise UserError(
                f"{finetune.INIT_FROM_FLAG} and --config.model.{WARM_START_FIELD} both name "
                "the weights a new run starts from: give one"
            )
