"""What every source's converter hands over, and how it becomes cnn_jax's VGG variables.

A converter (torchvision.py, keras.py) reads a file and returns `Imported`: the convolutions
block by block and the three fully-connected layers, already in cnn_jax's layouts (HWIO
kernels, (in, out) dense kernels, FC6's rows in the (H, W, C) order of flattening an NHWC map)
with the source's input convention folded into conv1_1. `to_variables` then finds which
Table 1 column the convolutions are (and at what width divisor), names the layers as
cnn_jax.models.vgg does (conv{block}_{i}, conv{block}_{i}_bn, fc6..fc8) and checks every array
against the shapes cnn_jax's VGG of that column makes. A file that fits nothing is one
UserError line naming the file's key or layer.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.errors import UserError
from cnn_jax.models import vgg

# Table 1's columns a file can be: A-LRN is A's parameters with an LRN no source has.
COLUMNS = tuple(letter for letter in vgg.VARIANTS if letter != "A-LRN")
BN_EPSILON = 1e-5  # flax.linen.BatchNorm's default = torch.nn.BatchNorm2d's


@dataclasses.dataclass(frozen=True)
class BatchNorm:
    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray


@dataclasses.dataclass(frozen=True)
class Conv:
    source: str  # the file's name for the layer, for error lines (features.0, block1_conv1)
    kernel: np.ndarray  # (kh, kw, in, out)
    bias: np.ndarray | None  # None with batch norm (its shift replaces the bias)
    norm: BatchNorm | None = None


@dataclasses.dataclass(frozen=True)
class Dense:
    source: str
    kernel: np.ndarray  # (in, out); FC6's rows in NHWC flatten order
    bias: np.ndarray


@dataclasses.dataclass(frozen=True)
class Imported:
    """A converted file: five blocks of convolutions, FC6-FC8, and what was folded."""

    blocks: tuple[tuple[Conv, ...], ...]
    classifier: tuple[Dense, Dense, Dense]
    # The input convention the source's first layer expected, and what was done about it:
    # mean_rgb (0..255) is what cnn_jax's `vgg` preprocessing must subtract for the imported
    # network to see exactly the source's input (docs/weights.md).
    convention: dict


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the file is, in cnn_jax's config terms."""

    variant: str  # a Table 1 letter
    batch_norm: bool
    width_divisor: int
    num_classes: int

    def describe(self) -> str:
        alias = {v: k for k, v in vgg.ALIASES.items()}.get(self.variant)
        name = f"VGG-{self.variant}" + (f" ({alias})" if alias else "")
        narrow = f", width / {self.width_divisor}" if self.width_divisor > 1 else ""
        return (
            f"{name}{' with batch norm' if self.batch_norm else ''}{narrow}, "
            f"{self.num_classes} classes"
        )


def identify(imported: Imported, flag: str) -> Facts:
    """The Table 1 column, batch-norm setting, width divisor and class count of a file."""
    blocks = imported.blocks
    if len(blocks) != len(vgg.VARIANTS["A"].blocks) or not all(blocks):
        raise UserError(
            f"{flag}: {len(blocks)} blocks of convolutions; VGG has 5, each ending in a max-pool"
        )
    first = blocks[0][0]
    maps = first.kernel.shape[-1]
    divisor = vgg.VARIANTS["A"].blocks[0][0][0] // max(maps, 1)
    if divisor not in vgg.WIDTH_DIVISORS or maps * divisor != vgg.VARIANTS["A"].blocks[0][0][0]:
        raise UserError(
            f"{flag}: {first.source} has {maps} output maps; VGG's first convolution has 64 "
            f"(or 64 / d for a width divisor d in {vgg.WIDTH_DIVISORS})"
        )
    found = tuple(tuple((c.kernel.shape[-1], c.kernel.shape[0]) for c in b) for b in blocks)
    letter = next((v for v in COLUMNS if _column(v, divisor) == found), None)
    if letter is None:
        raise UserError(
            f"{flag}: its convolutions, block by block {_maps(found)}, are no column of "
            f"VGG's Table 1 ({', '.join(f'{v} {_maps(_column(v, divisor))}' for v in COLUMNS)})"
        )
    norms = [c.norm is not None for b in blocks for c in b]
    if any(norms) and not all(norms):
        plain = next(c for b in blocks for c in b if c.norm is None)
        raise UserError(
            f"{flag}: {plain.source} has no batch norm but other convolutions do; cnn_jax's "
            "VGG has it after every convolution or none"
        )
    return Facts(letter, all(norms), divisor, int(imported.classifier[-1].kernel.shape[-1]))


def _column(letter: str, divisor: int):
    return tuple(tuple((f // divisor, k) for f, k in b) for b in vgg.VARIANTS[letter].blocks)


def _maps(blocks) -> str:
    """[64] [128] [256 256] ... with 1x1 kernels marked (C's conv*_3)."""
    return " ".join(
        "[" + " ".join(f"{f}" + ("(1x1)" if k == 1 else "") for f, k in b) + "]" for b in blocks
    )


def to_variables(imported: Imported, facts: Facts, flag: str) -> dict:
    """{'params': ..., 'batch_stats': ...} of cnn_jax's VGG (numpy float32), checked against
    the shapes the model of `facts` makes."""
    params = {"features": {}, "classifier": {}}
    stats = {"features": {}}
    sources = {}
    for b, block in enumerate(imported.blocks, 1):
        for i, conv in enumerate(block, 1):
            name = f"conv{b}_{i}"
            params["features"][name] = {"kernel": conv.kernel}
            sources["features", name] = conv.source
            if conv.norm is None:
                params["features"][name]["bias"] = conv.bias
                continue
            n = conv.norm
            params["features"][f"{name}_bn"] = {"scale": n.scale, "bias": n.bias}
            stats["features"][f"{name}_bn"] = {"mean": n.mean, "var": n.var}
            sources["features", f"{name}_bn"] = conv.source
    for name, dense in zip(("fc6", "fc7", "fc8"), imported.classifier, strict=True):
        params["classifier"][name] = {"kernel": dense.kernel, "bias": dense.bias}
        sources["classifier", name] = dense.source
    variables = {"params": params, "batch_stats": stats if facts.batch_norm else {}}
    variables = jax.tree.map(lambda a: np.asarray(a, np.float32), variables)
    _check_shapes(variables, model_shapes(facts), sources, facts, flag)
    return variables


def model_shapes(facts: Facts) -> dict:
    """The variables' shapes cnn_jax's VGG of `facts` makes (shape inference only)."""
    model = vgg.VGG(
        variant=facts.variant,
        num_classes=facts.num_classes,
        batch_norm=facts.batch_norm,
        width_divisor=facts.width_divisor,
    )
    side = vgg.MIN_IMAGE_SIZE  # FC6 pools any last map to 7x7: shapes do not depend on it
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, side, side, 3)), train=False)
    )
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _check_shapes(variables, wanted, sources, facts: Facts, flag: str) -> None:
    have = dict(_leaves(variables))
    need = dict(_leaves(wanted))
    for path, shape in need.items():
        source = sources.get(path[1:3], "/".join(path[1:3]))
        if path not in have:
            raise UserError(f"{flag}: {source} has no {path[-1]} for {'/'.join(path)}")
        if have[path] != shape:
            raise UserError(
                f"{flag}: {source} gives {'/'.join(path[1:])} the shape {have[path]} (in "
                f"cnn_jax's layout), but {facts.describe()} needs {shape}"
            )
    extra = sorted(set(have) - set(need))
    if extra:
        raise UserError(f"{flag}: {sources.get(extra[0][1:3])} has an unexpected {extra[0][-1]}")


def _leaves(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), tuple(value.shape)
