"""Features for linear probes: one layer's activations over a dataset split, written to .npz.

    python -m cnn_jax.features --config=configs/vgg.py:D --workdir=RUN_DIR --layer=fc7 \\
        --output=feats.npz [--split=eval|train] [--config.X=...]

The newest checkpoint of RUN_DIR (a cnn_jax run, or a workdir `cnn_jax.weights import`
wrote) runs in inference mode (no dropout, batch norm's running statistics) over every
example of the split exactly once, each seen as the centre evaluator sees it. The .npz holds
`features` float32 [N, D], `labels` int32 [N], `files` [N] (an image folder's file paths;
elsewhere "SPLIT[i]", the TFDS split and index), `index` int64 [N] (the position in the
split), `layer` and `step`. docs/features.md lists each model's layers.
"""

import dataclasses
import functools
import os
import sys
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from cnn_jax import checkpoint, cli, paths
from cnn_jax.errors import UserError
from cnn_jax.parallel import DATA_AXIS

SPLITS = ("eval", "train")  # the evaluators' split (validation / test) or the training one
COLLECTIONS = ("params", "batch_stats")  # what inference reads from a checkpoint


@dataclasses.dataclass(frozen=True)
class FeatureLayer:
    """Where a layer's features come from: the output of one Flax module of the model
    (captured with `capture_intermediates`; () is the whole model, its class scores) and
    what the model itself applies to that output before the next layer reads it (its ReLU
    or squashing function), then global average pooling for a feature map."""

    module: tuple[str, ...]
    then: Callable[[jax.Array], jax.Array]
    tower_split: bool = False  # AlexNet's towers: each tower device holds its half of the units


def _as_is(y):
    return y


def _spatial_mean(y):
    return jnp.mean(y.astype(jnp.float32), axis=(1, 2))  # [N, H, W, C] -> [N, C]


def _relu_then_mean(y):
    return _spatial_mean(nn.relu(y))


def _vgg_layers(model) -> dict[str, FeatureLayer]:
    """fc6, fc7 after their ReLU (before dropout), fc8; pool5, the last block's max-pooled
    map, and every convolution convB_I after its ReLU (after batch norm's, with batch norm),
    each averaged over its positions."""
    from cnn_jax.models import vgg

    def conv(name):
        if model.batch_norm:  # conv -> batch norm -> ReLU
            return FeatureLayer(("features", f"{name}_bn"), _relu_then_mean)
        return FeatureLayer(("features", name), _spatial_mean)  # the conv applies its ReLU

    return {
        "fc6": FeatureLayer(("classifier", "fc6"), nn.relu),
        "fc7": FeatureLayer(("classifier", "fc7"), nn.relu),
        "fc8": FeatureLayer(("classifier", "fc8"), _as_is),
        "pool5": FeatureLayer(("features",), _spatial_mean),
        **{name: conv(name) for name in vgg.conv_layer_names(model.variant)},
    }


def _alexnet_layers(model) -> dict[str, FeatureLayer]:
    """fc6, fc7 after their ReLU (before dropout), fc8; conv1..conv5 after their ReLU (before
    LRN and pooling) and pool5 (conv5 max-pooled), averaged over positions. Both towers'
    units, tower 1's first, as the paper's network concatenates them."""
    from cnn_jax.models import alexnet

    split = model.tower_axis is not None

    def pool5(y):
        return _spatial_mean(model.pool(y, alexnet.POOL_WINDOW, alexnet.POOL_STRIDE))

    return {
        "fc6": FeatureLayer(("fc6",), nn.relu, split),
        "fc7": FeatureLayer(("fc7",), nn.relu, split),
        "fc8": FeatureLayer(("fc8",), _as_is),
        "pool5": FeatureLayer(("conv5",), pool5, split),
        **{f"conv{i}": FeatureLayer((f"conv{i}",), _spatial_mean, split) for i in range(1, 6)},
    }


def _lenet_layers(model) -> dict[str, FeatureLayer]:
    """F6's 84 units after the squashing function (what the RBF units compare with their
    prototypes; ReLU in the modern variant) and C5's 120 (its map is 1x1)."""
    from cnn_jax.models import lenet, ops
    from cnn_jax.models.layers import lecun_tanh

    if isinstance(model, lenet.LeNet5):
        f6 = functools.partial(ops.float32_on_cpu, lecun_tanh)  # as LeNet5 applies it
    else:
        f6 = nn.relu
    return {"F6": FeatureLayer(("F6",), f6), "C5": FeatureLayer(("C5",), _spatial_mean)}


def feature_layers(model) -> dict[str, FeatureLayer]:
    """Every layer `model` gives features of, by name; `logits` (the class scores the model
    returns) for every model."""
    from cnn_jax.models import alexnet, lenet, vgg

    if isinstance(model, vgg.VGG):
        own = _vgg_layers(model)
    elif isinstance(model, alexnet.AlexNet):
        own = _alexnet_layers(model)
    elif isinstance(model, lenet.LeNet5 | lenet.LeNet5Modern):
        own = _lenet_layers(model)
    else:
        own = {}
    return {**own, "logits": FeatureLayer((), _as_is)}


def feature_layer(model, name: str) -> FeatureLayer:
    layers = feature_layers(model)
    if name not in layers:
        raise UserError(
            f"--layer={name}: {type(model).__name__} has no such layer; choose one of: "
            f"{', '.join(layers)}"
        )
    return layers[name]


def features_step(variables: dict, batch: dict, *, model, layer: FeatureLayer) -> jax.Array:
    """Per device: `layer`'s features [B, D] float32 of this device's images."""
    from cnn_jax.models import alexnet

    def wanted(module, method):
        return method == "__call__" and module.path == layer.module

    _, state = model.apply(variables, batch["image"], train=False, capture_intermediates=wanted)
    captured = state["intermediates"]
    for name in layer.module:
        captured = captured[name]
    values = layer.then(captured["__call__"][0]).astype(jnp.float32)
    if layer.tower_split:  # each tower device has its half: both, tower 1's first
        values = alexnet.replicated_all_gather(values, model.tower_axis)
    return values


# --- The checkpoint ------------------------------------------------------------------------


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree) if tree else {}


def saved_variables(workdir: str) -> dict:
    """The newest checkpoint's params and batch_stats as {path: shape}, read from its
    metadata (no arrays); UserError when the workdir holds no checkpoint."""
    found = {}

    def note_shapes(saved):
        for collection in COLLECTIONS:
            leaves = _flat(saved.get(collection))
            found[collection] = {path: tuple(leaf.shape) for path, leaf in leaves.items()}
        return {}  # read nothing

    checkpoint.read_newest(workdir, note_shapes, flag="--workdir")
    return found


def _variable_shapes(model, input_shape) -> dict:
    def init(x):
        key = jax.random.key(0)
        return model.init({"params": key, "dropout": key}, x, train=False)

    variables = jax.eval_shape(init, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    return {
        c: {path: tuple(leaf.shape) for path, leaf in _flat(variables.get(c)).items()}
        for c in COLLECTIONS
    }


def checkpoint_classes(model, saved: dict, input_shape, classes: int) -> int:
    """The class count of the checkpoint's classifier, which may differ from the dataset's
    (fc7 of ImageNet weights on your own folder): read from the shapes of the parameters
    whose shape follows the class count (fc8's). `classes` where none does."""
    at = {k: _variable_shapes(model.clone(num_classes=k), input_shape)["params"]
          for k in (classes, classes + 1)}  # fmt: skip
    following = [path for path, shape in at[classes].items() if at[classes + 1][path] != shape]
    counts = {saved["params"][p][-1] for p in following if p in saved["params"]}
    return counts.pop() if len(counts) == 1 else classes


def check_fits(saved: dict, model, input_shape, workdir: str) -> None:
    """UserError naming the first parameter (or statistic) the checkpoint and the config's
    model disagree on: another configuration, width or batch-norm setting."""
    ours = _variable_shapes(model, input_shape)
    for collection in COLLECTIONS:
        have, want = saved.get(collection, {}), ours[collection]
        for path in sorted(set(have) | set(want)):
            name = f"{collection}/{'/'.join(path)}"
            if have.get(path) != want.get(path):
                raise UserError(
                    f"--workdir={workdir}: the checkpoint's {name} is {have.get(path, 'absent')}"
                    f", the config's model has {want.get(path, 'none')}: give the --config "
                    "(and --config.model.* fields) it was trained or imported with"
                )


def _restore(workdir: str, abstract_state) -> tuple[int, dict]:
    """(step, {'params', 'batch_stats'}) of the newest checkpoint, placed as the run places
    them (AlexNet's tower layers split over the model axis, the rest replicated)."""
    like = {c: getattr(abstract_state, c) for c in COLLECTIONS}
    step, variables = checkpoint.read_newest(workdir, lambda _: like, flag="--workdir")
    return step, {c: v for c, v in variables.items() if v}


# --- The run -------------------------------------------------------------------------------


def check_output(output: str | None) -> str:
    """The .npz path to write, absolute; UserError unless its folder can be written."""
    if not output or not output.strip():
        raise UserError("--output=FILE.npz is required: where to write the features")
    path = os.path.abspath(os.path.expanduser(output))
    if os.path.isdir(path):
        raise UserError(f"--output={output} is a directory: give a file, e.g. {path}/feats.npz")
    paths.writable_directory(os.path.dirname(path), f"--output={output}: its folder")
    return path


def _to_host(values: jax.Array, mesh) -> np.ndarray:
    """This process's rows of a global batch, in the order of its local batch."""
    if jax.process_count() == 1:
        return np.asarray(values)
    local = multihost_utils.global_array_to_host_local_array(values, mesh, P(DATA_AXIS))
    return np.asarray(local)


def compute(trainer, variables: dict, layer: FeatureLayer, split: str) -> dict[str, np.ndarray]:
    """`layer`'s features of every example of `split`: {'features', 'labels', 'index'}, one
    row per example in the split's order, padding dropped, gathered from all processes."""
    from cnn_jax import parallel
    from cnn_jax.data import pipeline

    x = trainer.experiment
    specs = jax.tree.map(lambda a: a.sharding.spec, variables)
    step = functools.partial(features_step, model=trainer.model, layer=layer)
    compiled = parallel.compile_per_device(
        step, trainer.mesh, (specs, {"image": P(DATA_AXIS)}), P(DATA_AXIS), spmd=x.spmd
    )
    host_keys = ("label", "mask", pipeline.INDEX_KEY)
    ds = pipeline.eval_dataset(
        x.source, x.prep, {"image": None}, batch_size=x.batch_size, cache=False, split=split,
        with_index=True,
    )  # fmt: skip
    batches = pipeline.global_batches(
        ds, parallel.batch_sharding(trainer.mesh), x.batch_size, host_keys=host_keys
    )
    rows, pending = [], None  # each batch fetched while the devices compute the next
    for batch in batches:
        out = compiled(variables, {"image": batch["image"]})
        if pending is not None:
            rows.append(_fetched(*pending, trainer.mesh))
        pending = out, batch
    if pending is not None:
        rows.append(_fetched(*pending, trainer.mesh))
    return _in_split_order({k: np.concatenate([r[k] for r in rows]) for k in rows[0]})


def _fetched(out: jax.Array, batch: dict, mesh) -> dict[str, np.ndarray]:
    """One batch's rows on this process: features and the host fields, padding included."""
    from cnn_jax.data import pipeline

    return {
        "features": _to_host(out, mesh),
        "labels": batch["label"],
        "mask": batch["mask"],
        "index": batch[pipeline.INDEX_KEY],
    }


def _in_split_order(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every process's rows, padding dropped, sorted by position in the whole split.
    Processes read contiguous shares in order (cnn_jax.data.datasets), so an example's
    position is its index in its process's share plus the real examples of the processes
    before it."""
    processes = jax.process_count()
    every = local if processes == 1 else multihost_utils.process_allgather(local, tiled=True)
    mask = every["mask"].reshape(processes, -1) > 0
    before = np.concatenate([[0], np.cumsum(mask.sum(axis=1))[:-1]])
    position = (every["index"].reshape(processes, -1) + before[:, None]).reshape(-1)
    keep = mask.reshape(-1)
    order = np.argsort(position[keep], kind="stable")
    position = position[keep][order]
    if not np.array_equal(position, np.arange(len(position))):
        raise RuntimeError("features: the eval batches did not hold each example exactly once")
    return {
        "features": every["features"][keep][order],
        "labels": every["labels"][keep][order].astype(np.int32),
        "index": position.astype(np.int64),
    }


def write(path: str, arrays: dict, files: list[str], layer: str, step: int) -> None:
    """The .npz, written under a temporary name and renamed (a kill leaves no half file)."""
    if jax.process_index() != 0:
        return
    names = np.asarray([files[i] for i in arrays["index"]], dtype=str)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays, files=names, layer=np.asarray(layer), step=np.asarray(step))
    os.replace(tmp, path)


def extract(config, workdir: str, layer_name: str, output: str, split: str = "eval") -> dict:
    """Write `layer_name`'s features of `split` from the newest checkpoint in `workdir` to
    `output`; returns what was written. Every mistake (no checkpoint, an unknown layer, an
    output that cannot be written, a checkpoint of another model) is a UserError before
    anything compiles."""
    from cnn_jax import experiment, models, train
    from cnn_jax.data import pipeline

    if split not in SPLITS:
        raise UserError(f"--split={split}: choose one of: {', '.join(SPLITS)}")
    output = check_output(output)
    saved = saved_variables(workdir)
    # The checks' copy; build_trainer resolves again, reading the weights' mean RGB too.
    resolved = experiment.resolve(config, jax.device_count(), jax.process_count())
    net = experiment.model(resolved)
    layer = feature_layer(net, layer_name)
    src, prep = experiment.source(resolved), experiment.preprocessing(resolved)
    input_shape = (1, prep.image_size, prep.image_size, pipeline.input_channels(src, prep))
    classes = resolved.data.num_classes
    if models.spec(resolved.model.name).fixed_num_classes is None:  # LeNet-5's are fixed
        classes = checkpoint_classes(net, saved, input_shape, classes)
    if classes != resolved.data.num_classes:
        resolved.data.num_classes = classes
        net = experiment.model(resolved)
    check_fits(saved, net, input_shape, workdir)

    trainer = train.build_trainer(config, workdir=workdir)  # the evaluators' mesh and pipeline
    if classes != trainer.experiment.source.classes:
        trainer = train.Trainer(dataclasses.replace(trainer.experiment, model=net))
        _note(
            f"features: the checkpoint's classifier has {classes} classes, the dataset "
            f"{trainer.experiment.source.classes}; the labels are the dataset's"
        )
    step, variables = _restore(workdir, trainer.abstract_state())
    arrays = compute(trainer, variables, layer, split)
    write(output, arrays, trainer.experiment.source.example_names(split), layer_name, step)
    return {"path": output, "shape": arrays["features"].shape, "step": step}


def _note(text: str) -> None:
    if jax.process_index() == 0:
        print(text)


def main(argv: list[str] | None = None) -> None:
    """Command line; takes argv (program name first) so tests can call it in-process. Its
    flags live in their own FlagValues, so it never clashes with cnn_jax.main's."""
    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()
    cli.define_config_flag(fv, argv)
    flags.DEFINE_string("workdir", None, "The run (or imported weights) to read.", flag_values=fv)
    flags.DEFINE_string("layer", None, "The layer: fc6, fc7, fc8, pool5, F6, ...", flag_values=fv)
    flags.DEFINE_string("output", None, "The .npz file to write.", flag_values=fv)
    flags.DEFINE_string("split", "eval", f"One of: {', '.join(SPLITS)}.", flag_values=fv)
    if not cli.parse_tool_flags(argv, fv, __doc__):
        return

    def body():
        for flag, value in (("config", "configs/X.py[:arg]"), ("workdir", "DIR")):
            if fv[flag].value is None:
                raise UserError(f"--{flag}={value} is required")
        if fv.layer is None:
            raise UserError("--layer=NAME is required (fc7, pool5, F6, ...: docs/features.md)")
        done = extract(fv.config, fv.workdir, fv.layer, fv.output, fv.split)
        n, d = done["shape"]
        _note(f"features: {n} x {d} {fv.layer} of step {done['step']} -> {done['path']}")

    cli.run(body, fv.config, interrupted="interrupted; no features were written")


if __name__ == "__main__":
    main()
