"""VGG's warm start (Simonyan & Zisserman 2015, Sec. 3.1): a deeper configuration begins
from a trained configuration A.

"When training deeper architectures, we initialised the first four convolutional layers
and the last three fully-connected layers with the layers of net A (the intermediate layers
were initialised randomly)."

A's first four convolutions are conv1_1, conv2_1, conv3_1 and conv3_2. They are copied into
the layers of the same name in the deeper net -- the only reading under which the shapes
agree: in B..E those layers have exactly A's shapes (3->64, 64->128, 128->256, 256->256),
whereas the deeper net's own first four convolutions (conv1_1, conv1_2, conv2_1, conv2_2) do
not. FC6, FC7 and FC8 are identical in every configuration. With batch norm, a layer's
batch-norm parameters and statistics go with it. Everything else keeps its random init.
"""

import jax

from cnn_jax import checkpoint
from cnn_jax.errors import UserError

FLAG = "--config.model.warm_start_from"

# (parent module, layer) of every layer copied from A; names as in cnn_jax.models.vgg.
WARM_START_LAYERS: tuple[tuple[str, str], ...] = (
    *(("features", name) for name in ("conv1_1", "conv2_1", "conv3_1", "conv3_2")),
    *(("classifier", name) for name in ("fc6", "fc7", "fc8")),
)
COLLECTIONS = ("params", "batch_stats")


def _copied_paths(variables: dict) -> list[tuple[str, str, str]]:
    """(collection, parent, layer) of every subtree the warm start replaces in `variables`:
    the named layers and their batch-norm layers ("<layer>_bn"), where they exist."""
    paths = []
    for collection in COLLECTIONS:
        tree = variables.get(collection) or {}
        for parent, layer in WARM_START_LAYERS:
            for name in (layer, f"{layer}_bn"):
                if name in tree.get(parent, {}):
                    paths.append((collection, parent, name))
    return paths


def _shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def _check_fits(where: tuple[str, str, str], have, want) -> None:
    """UserError unless the checkpoint's subtree `have` has the structure and shapes of ours."""
    fits = have is not None and jax.tree.structure(have) == jax.tree.structure(want)
    if not fits or _shapes(have) != _shapes(want):
        raise UserError(
            f"{FLAG}: {'/'.join(where)} in the checkpoint "
            f"({None if have is None else _shapes(have)}) does not fit this model's "
            f"({_shapes(want)}); warm-start from a VGG-A with the same num_classes and batch_norm"
        )


def _get(variables: dict, collection: str, parent: str, name: str):
    return ((variables.get(collection) or {}).get(parent) or {}).get(name)


def copy_layers(target: dict, source: dict) -> dict:
    """`target` variables ({'params': ..., 'batch_stats': ...}) with the warm-start layers
    taken from `source` (those of a VGG-A). Raises UserError when the source lacks a layer
    or its shapes differ (another configuration, class count or batch-norm setting)."""
    out = {c: dict(tree) for c, tree in target.items()}
    for where in _copied_paths(target):
        collection, parent, name = where
        have = _get(source, *where)
        _check_fits(where, have, target[collection][parent][name])
        out[collection][parent] = {**out[collection][parent], name: have}
    return out


def load_layers(path: str, like: dict) -> dict:
    """Read from the newest checkpoint under `path` (a VGG-A run's workdir or its checkpoints/
    folder) only the warm-start layers of `like` (this model's variables), placed with the
    dtypes and shardings of `like`'s arrays."""

    def select(saved: dict) -> dict:
        wanted: dict = {}
        for where in _copied_paths(like):
            collection, parent, name = where
            target = like[collection][parent][name]
            _check_fits(where, _get(saved, *where), target)
            wanted.setdefault(collection, {}).setdefault(parent, {})[name] = jax.tree.map(
                lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=t.sharding), target
            )
        return wanted

    _, layers = checkpoint.read_newest(path, select, flag=FLAG)
    return layers


def warm_start(state, path: str):
    """The TrainState `state` (freshly initialised) with VGG-A's layers from `path` copied in."""
    like = {"params": state.params, "batch_stats": state.batch_stats}
    if not _copied_paths(like):
        raise UserError(f"{FLAG} applies to VGG (--config.model.name=vgg) only")
    variables = copy_layers(like, load_layers(path, like))
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"] or {})
