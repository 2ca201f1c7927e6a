"""A new run that starts from trained weights, and trains only some of its layers.

Where the weights come from (one mechanism, `InitFrom`, read by `start_from`):

- `--config.run.init_from=DIR` (fine-tuning): every layer of this model whose path and shapes
  fit the checkpoint's is loaded, with its batch-norm statistics; a layer the checkpoint does
  not have keeps its fresh initialisation. The classifier (the model's last layer with
  parameters: fc8) may differ in shape -- another class count -- and is then re-initialised;
  any other layer that differs is an error naming it.
- `--config.model.warm_start_from=DIR` (VGG, Simonyan & Zisserman 2015, Sec. 3.1): a deeper
  configuration begins from a trained configuration A. "When training deeper architectures,
  we initialised the first four convolutional layers and the last three fully-connected layers
  with the layers of net A (the intermediate layers were initialised randomly)." A's first
  four convolutions are conv1_1, conv2_1, conv3_1 and conv3_2; they are copied into the layers
  of the same name -- the only reading under which the shapes agree: in B..E those layers have
  exactly A's shapes (3->64, 64->128, 128->256, 256->256), whereas the deeper net's own first
  four convolutions (conv1_1, conv1_2, conv2_1, conv2_2) do not. FC6-FC8 are the same in every
  configuration. A fixed selection: each of these layers must be there and fit.

DIR is a run's workdir or its checkpoints/ folder (the newest checkpoint), or one checkpoint's
folder (WORKDIR/checkpoints/STEP), cnn_jax's own or one that `python -m cnn_jax.weights import`
wrote. Only the layers taken are read, straight into this run's shardings (AlexNet's towers
split over the model axis read their own halves). Only a new run reads it: a run with
checkpoints of its own resumes from them (cnn_jax.train).

A *layer* is a module with parameters, in the order the forward pass calls them (the rows of
cnn_jax.summary), with the batch norm that follows it: VGG's conv3_1 and conv3_1_bn are one
layer. What trains (`--config.optim.trainable`, `Trainable`): `all`; `classifier`, the
fully-connected layers at the end (fc6-fc8 of AlexNet and VGG; F6 of LeNet-5, whose RBF
output has fixed prototypes and no parameters; F6 and output of lenet5_modern); or `last:K`,
the last K layers. cnn_jax.optim gives the frozen parameters no update (`optim.train_only`),
the train step keeps them and their statistics bit for bit (`keep_frozen`), and a frozen
batch norm normalises by its running statistics in training too (`frozen_batch_norms`): a
frozen layer is one fixed function, the same in training and evaluation.
"""

import contextlib
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax import checkpoint, summary
from cnn_jax.errors import UserError

INIT_FROM_FLAG = "--config.run.init_from"
WARM_START_FLAG = "--config.model.warm_start_from"
COLLECTIONS = ("params", "batch_stats")

# (parent module, layer) of every layer VGG's warm start copies from A (cnn_jax.models.vgg).
WARM_START_LAYERS: tuple[tuple[str, str], ...] = (
    *(("features", name) for name in ("conv1_1", "conv2_1", "conv3_1", "conv3_2")),
    *(("classifier", name) for name in ("fc6", "fc7", "fc8")),
)

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer with parameters: the module paths of its variables, its own first (then its
    batch norm's, if it has one)."""

    paths: tuple[Path, ...]

    @property
    def name(self) -> str:
        return "/".join(self.paths[0])


# --- A model's layers ------------------------------------------------------------------------


def abstract_variables(model: nn.Module, image_shape: tuple[int, ...]) -> dict:
    """`model`'s variables ({'params': ..., 'batch_stats': ...}) as shapes, for one image of
    `image_shape` (H, W, C); nothing is computed or compiled."""

    def init(x):  # the key is made inside: outside, making it would compile a program
        rng = jax.random.key(0)
        return model.init({"params": rng, "dropout": rng}, x, train=False)

    return dict(jax.eval_shape(init, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)))


def model_layers(model: nn.Module, image_shape: tuple[int, ...]) -> tuple[Layer, ...]:
    """`model`'s layers in forward order; a batch norm (a module with batch statistics)
    belongs to the layer before it."""
    stats = abstract_variables(model, image_shape).get("batch_stats") or {}
    layers: list[Layer] = []
    for row in summary.summarize_model(model, image_shape).rows:
        if not row.params:
            continue
        path = tuple(row.layer.split("/"))
        if layers and _get(stats, path) is not None:
            layers[-1] = Layer((*layers[-1].paths, path))
        else:
            layers.append(Layer((path,)))
    return tuple(layers)


def classifier_layers(layers: tuple[Layer, ...], params: dict) -> tuple[Layer, ...]:
    """The fully-connected layers at the end: the last layers whose kernel is a matrix."""
    found: list[Layer] = []
    for layer in reversed(layers):
        kernel = _get(params, (*layer.paths[0], "kernel"))
        if kernel is None or len(kernel.shape) != 2:
            break
        found.insert(0, layer)
    return tuple(found)


# --- What trains -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trainable:
    """The layers a run trains (`--config.optim.trainable`) and the mask that says so: a tree
    of bools shaped like the parameters, True where a parameter trains."""

    rule: str
    trained: tuple[Layer, ...]
    layers: tuple[Layer, ...]
    mask: Any
    counts: tuple[int, int]  # parameters trained, frozen

    def note(self) -> str:
        """The one line a run prints about what it trains."""
        names = ", ".join(layer.name for layer in self.trained)
        return (
            f"optim.trainable={self.rule}: training {len(self.trained)} of {len(self.layers)} "
            f"layers ({names}: {self.counts[0]:,} parameters); {self.counts[1]:,} frozen"
        )


def trainable(rule: str, parsed: tuple[str, int], layers: tuple[Layer, ...], params) -> Trainable:
    """The Trainable of `rule` (optim.parse_trainable's `parsed`: ("classifier", 0) or
    ("last", K)) for a model with `layers` and (abstract) `params`."""
    kind, k = parsed
    flag = f"--config.optim.trainable={rule}"
    if kind == "all":
        trained = layers
    elif kind == "classifier":
        trained = classifier_layers(layers, params)
        if not trained:
            raise UserError(f"{flag}: this model ends in no fully-connected layer")
    elif k > len(layers):
        raise UserError(f"{flag}: the model has {len(layers)} layers with parameters")
    else:
        trained = layers[-k:]
    wanted = {path for layer in trained for path in layer.paths}
    mask = jax.tree_util.tree_map_with_path(lambda path, _: _module_path(path) in wanted, params)
    counts = {True: 0, False: 0}
    for param, trains in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True):
        counts[trains] += math.prod(param.shape)
    return Trainable(rule, trained, layers, mask, counts=(counts[True], counts[False]))


def frozen_batch_norms(trainable_mask):
    """A context in which each batch norm whose parameters are all frozen normalises by its
    running statistics, also in training. (In training Flax's BatchNorm normalises by the
    batch's statistics; a frozen layer would then compute in training what it does not in
    evaluation, whose running statistics stay the checkpoint's.)"""
    if trainable_mask is None:
        return contextlib.nullcontext()

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
            own = _get(trainable_mask, tuple(module.path))
            if own is not None and not any(jax.tree.leaves(own)):
                args, kwargs = args[:1], {**kwargs, "use_running_average": True}
        return next_fun(*args, **kwargs)

    return nn.intercept_methods(intercept)


def keep_frozen(new, old, trainable_mask):
    """`new` variables (params or batch_stats) with those of frozen modules (every parameter
    of the module frozen in `trainable_mask`) taken from `old`, bit for bit."""
    if trainable_mask is None:
        return new

    def pick(path, new_leaf, old_leaf):
        own = _get(trainable_mask, _module_path(path))
        frozen = own is not None and not any(jax.tree.leaves(own))
        return old_leaf if frozen else new_leaf

    return jax.tree_util.tree_map_with_path(pick, new, old)


# --- Where the weights come from -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InitFrom:
    """The checkpoint a new run starts from and the layers it takes from it."""

    path: str
    flag: str  # the config field that asked, for every message
    layers: tuple[Layer, ...]  # the layers taken
    all_required: bool  # each must be there and fit (the warm start); else those that fit
    classifier: Layer | None = None  # may differ in shape (the class count): re-initialised


def init_from_selection(path: str, layers: tuple[Layer, ...]) -> InitFrom:
    """init_from: every layer of the model that fits; its last may be re-initialised."""
    return InitFrom(path, INIT_FROM_FLAG, layers, all_required=False, classifier=layers[-1])


def warm_start_selection(path: str, variables: dict) -> InitFrom:
    """VGG's warm start (Sec. 3.1) from the VGG-A at `path`, for a model with `variables`."""
    params = variables.get("params") or {}
    layers = tuple(
        Layer(tuple((parent, n) for n in (name, f"{name}_bn") if n in params.get(parent, {})))
        for parent, name in WARM_START_LAYERS
        if name in params.get(parent, {})
    )
    if not layers:
        raise UserError(f"{WARM_START_FLAG} applies to VGG (--config.model.name=vgg) only")
    return InitFrom(path, WARM_START_FLAG, layers, all_required=True)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `start_from` does with each layer of an InitFrom, given the checkpoint."""

    loaded: tuple[Layer, ...]
    absent: tuple[Layer, ...]  # not in the checkpoint: their fresh initialisation stays
    reinitialised: Layer | None = None  # the classifier, whose shape differs
    classes: tuple[int, int] = (0, 0)  # ... its classes there and here

    def note(self, init: InitFrom, step: int) -> str:
        """The one line a run prints about where its weights came from."""
        field = init.flag.rsplit(".", 1)[-1]
        line = (
            f"{field}: loaded {len(self.loaded)} of {len(init.layers)} layers from "
            f"{init.path} (step {step})"
        )
        if self.reinitialised is not None:
            there, here = self.classes
            line += f"; {self.reinitialised.name} re-initialised ({there} -> {here} classes)"
        if self.absent:
            line += f"; not in it, initialised afresh: {', '.join(a.name for a in self.absent)}"
        return line


def check(init: InitFrom, like: dict) -> None:
    """UserError (one line) unless the checkpoint of `init` gives a model with the variables
    `like` (shapes suffice) what `init` asks for; reads the checkpoint's metadata, no array
    (a run checks this before the data opens)."""

    def select_nothing(saved: dict) -> dict:
        _plan(init, saved, like)  # raises where a layer does not fit
        return {}

    checkpoint.read_newest(init.path, select_nothing, flag=init.flag)


def start_from(state, init: InitFrom):
    """(state, note): the freshly initialised TrainState `state` with the layers `init` takes
    read from its checkpoint, in `state`'s dtypes and shardings; the line to print."""
    like = {"params": state.params, "batch_stats": state.batch_stats}
    variables, plan, step = load(init, like)
    started = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    return started, plan.note(init, step)


def load(init: InitFrom, like: dict) -> tuple[dict, Plan, int]:
    """(variables, plan, step): `like` ({'params', 'batch_stats'}: arrays) with the layers
    that `init` takes read from its checkpoint, each into the dtype and sharding of the array
    it replaces."""
    plans: list[Plan] = []

    def select(saved: dict) -> dict:
        plans.append(_plan(init, saved, like))
        return _subtrees(like, plans[-1].loaded, _read_like)

    step, read = checkpoint.read_newest(init.path, select, flag=init.flag)
    return _overlay(like, read), plans[0], step


def copy_layers(target: dict, source: dict, init: InitFrom | None = None) -> dict:
    """`target` variables with the layers `init` takes (default: VGG's warm start) copied
    from the variables `source`, in memory."""
    init = init or warm_start_selection("<variables>", target)
    return _overlay(target, _subtrees(source, _plan(init, source, target).loaded, lambda x: x))


def warm_start(state, path: str):
    """The TrainState `state` (freshly initialised) with VGG-A's layers from `path` copied in."""
    like = {"params": state.params, "batch_stats": state.batch_stats}
    return start_from(state, warm_start_selection(path, like))[0]


def load_layers(path: str, like: dict) -> dict:
    """The warm start's layers of `like` (this model's variables) read from `path`."""
    init = warm_start_selection(path, like)
    return _subtrees(load(init, like)[0], init.layers, lambda x: x)


# --- Fitting a checkpoint's layers to the model's ---------------------------------------------


def _plan(init: InitFrom, saved: dict, like: dict) -> Plan:
    """Each layer of `init`: loaded, absent (kept fresh), the classifier re-initialised, or a
    UserError. `saved` and `like` are variable trees whose leaves have a `shape`."""
    loaded, absent, reinitialised, classes = [], [], None, (0, 0)
    for layer in init.layers:
        misfit = _misfit(layer, saved, like)
        if misfit is None:
            loaded.append(layer)
        elif misfit == "absent" and not init.all_required:
            absent.append(layer)
        elif layer == init.classifier and misfit != "absent":
            reinitialised, classes = layer, _classes(layer, saved, like)
        else:
            raise UserError(_misfit_message(init, layer, misfit, saved, like))
    if not loaded:
        held = ", ".join(_module_names(saved.get("params") or {})[:8])
        raise UserError(
            f"{init.flag}={init.path}: the checkpoint has none of this model's layers (it "
            f"holds {held or 'no parameters'}): a checkpoint of another model?"
        )
    return Plan(tuple(loaded), tuple(absent), reinitialised, classes)


def _misfit(layer: Layer, saved: dict, like: dict):
    """None if every variable of `layer` is in `saved` with `like`'s shapes; "absent" if none
    is there; else the (collection, path) of the first that differs."""
    wanted = [(c, p) for p in layer.paths for c in COLLECTIONS if _get(like.get(c), p) is not None]
    present = [(c, p) for c, p in wanted if _get(saved.get(c), p) is not None]
    if not present:
        return "absent"
    for c, p in wanted:
        have, want = _get(saved.get(c), p), _get(like.get(c), p)
        if have is None or _shapes(have) != _shapes(want):
            return c, p
    return None


def _misfit_message(init: InitFrom, layer: Layer, misfit, saved: dict, like: dict) -> str:
    if misfit == "absent":
        return f"{init.flag}={init.path}: the checkpoint has no layer {layer.name}"
    collection, path = misfit
    have = _get(saved.get(collection), path)
    where = f"{collection} of {'/'.join(path)}"
    shown = "nothing" if have is None else _describe(have)
    if init.all_required:
        hint = "warm-start from a VGG-A with the same num_classes and batch_norm"
    else:
        hint = (
            f"only the classifier ({init.classifier.name}) may differ (it is re-initialised): "
            "start from a checkpoint of the same model (configuration, width, batch_norm)"
        )
    return (
        f"{init.flag}={init.path}: {where} in the checkpoint ({shown}) does not fit this "
        f"model's ({_describe(_get(like.get(collection), path))}); {hint}"
    )


def _classes(layer: Layer, saved: dict, like: dict) -> tuple[int, int]:
    """The output units of `layer` in the checkpoint and here (the last axis of its bias)."""
    path = (*layer.paths[0], "bias")
    there, here = _get(saved.get("params"), path), _get(like.get("params"), path)
    units = lambda bias: 0 if bias is None else bias.shape[-1]
    return units(there), units(here)


def _read_like(target):
    return jax.ShapeDtypeStruct(target.shape, target.dtype, sharding=target.sharding)


def _subtrees(variables: dict, layers, leaf) -> dict:
    """The part of `variables` that holds `layers`, its leaves mapped by `leaf`."""
    picked: dict = {}
    for layer in layers:
        for path in layer.paths:
            for collection in COLLECTIONS:
                tree = _get(variables.get(collection), path)
                if tree is not None:
                    _set(picked.setdefault(collection, {}), path, jax.tree.map(leaf, tree))
    return picked


def _overlay(base: dict, top: dict) -> dict:
    """`base` (nested dicts) with the leaves of `top` put in place of its own."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _overlay(base.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _get(tree, path: Path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _module_path(key_path) -> Path:
    """The module path of a leaf's key path (its dict keys but the last, the variable)."""
    return tuple(str(k.key) for k in key_path[:-1])


def _module_names(tree: dict) -> list[str]:
    paths = {_module_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}
    return sorted("/".join(p) for p in paths)


def _shapes(tree) -> dict:
    return {
        jax.tree_util.keystr(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _describe(tree) -> str:
    """'bias 64, kernel 3x3x3x64': a module's variables and their shapes."""
    return ", ".join(
        f"{path[-1].key} {'x'.join(map(str, leaf.shape)) or 'scalar'}"
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    )
