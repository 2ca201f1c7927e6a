"""AlexNet (Krizhevsky, Sutskever, Hinton, "ImageNet Classification with Deep Convolutional
Neural Networks", NIPS 2012), with the paper's two-GPU split (Sec. 3.2, Fig. 2) kept as the
architecture it is: two towers that talk only at conv3 and the fully-connected layers.

At 224x224, 1000 classes ("same" = reads only its own tower's maps; "both" = all maps):

    layer  kernel      maps (x2 towers)  output  reads  then                 parameters
    conv1  11x11 /4     48                55x55          ReLU, LRN, pool 3/2       34,944
    conv2   5x5  /1    128                27x27  same    ReLU, LRN, pool 3/2      307,456
    conv3   3x3  /1    192                13x13  both    ReLU                     885,120
    conv4   3x3  /1    192                13x13  same    ReLU                     663,936
    conv5   3x3  /1    128                13x13  same    ReLU, pool 3/2           442,624
    fc6    6x6x256 -> 2048                       both    ReLU, dropout         37,752,832
    fc7       4096 -> 2048                       both    ReLU, dropout         16,781,312
    fc8       4096 -> 1000 (not split)           both                           4,097,000
                                                                               60,965,224

Spatial sizes 224 -> 55 -> 27 -> 13 -> 6 come from cuda-convnet's arithmetic, which the
paper's 224 was run with: a layer has 1 + ceil((S - kernel) / stride) positions, the last one
hanging over the bottom/right edge into zeros. conv1: 1 + ceil(213 / 4) = 55, i.e. 3 zero
rows/columns on the bottom/right (no padding on the top/left). Pools: (55 - 3) / 2 + 1 = 27,
(27 - 3) / 2 + 1 = 13, (13 - 3) / 2 + 1 = 6, exact. conv2 pads 2 and conv3-5 pad 1 on every
side, so they keep the size.

One module, two ways to run it (`tower_axis`):
- None: one device computes both towers. conv2/4/5 are grouped convolutions
  (feature_group_count=2) and LRN runs within each tower, so no tower reads the other's maps.
- a mesh axis name ('model'): the module runs per device inside shard_map over a 2-device axis
  and computes only its own tower, all-gathering activations over the axis before conv3, fc6,
  fc7 and fc8 and nowhere else -- the paper's GPU-to-GPU transfers. The gather before fc8
  is invariant (every tower device then computes the same scores), so the loss on top of it
  is differentiated once, not once per tower.
`init` always builds the global parameters (both towers, on one device), and the global arrays
mean the same in both ways: a tower's conv1/conv2/conv4/conv5 kernels and its half of the
output units of conv3, fc6 and fc7 are the matching half of each array's last axis (conv2's
kernel is (5, 5, 48, 256), a grouped-convolution kernel). `param_partition_specs` says so,
so one checkpoint serves one device, data parallelism and the tower split.

Differences from the paper, on purpose: dropout is the inverted kind (kept units scaled by
1/(1-p) in training) instead of halving the outputs at test time, the same in expectation.
Inputs of any side >= 64 run; fc6's fan-in follows the last map's size (6x6 at 224), so only
224 has the paper's parameter count. `width_divisor` divides every width, for tests.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from cnn_jax.errors import UserError
from cnn_jax.models import layers, ops
from cnn_jax.models.layers import ModuleDef, local_response_norm
from cnn_jax.models.spec import ModelSpec
from cnn_jax.parallel import MODEL_AXIS  # models name the axis, nothing else of the mesh

TOWERS = 2
TOWER_MAPS = (48, 128, 192, 192, 128)  # conv1..conv5 maps per tower (Sec. 3.5, Fig. 2)
FC_UNITS = 4096  # fc6, fc7
CONV1_KERNEL, CONV1_STRIDE = 11, 4
POOL_WINDOW, POOL_STRIDE = 3, 2  # overlapping pooling (Sec. 3.4)
# The smallest side that leaves a 1x1 map after the third pool: conv1 gives 15 positions,
# the pools 7, 3, 1.
MIN_IMAGE_SIZE = 64
# Layers whose output units (the last axis of kernel and bias) are split between the towers.
SPLIT_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")
# A width divisor must divide every width (their greatest common divisor is 16).
WIDTH_DIVISORS = (1, 2, 4, 8, 16)

# Sec. 5: "We initialized the weights in each layer from a zero-mean Gaussian distribution
# with standard deviation 0.01. We initialized the neuron biases in the second, fourth, and
# fifth convolutional layers, as well as in the fully-connected hidden layers, with the
# constant 1 ... [this] provid[es] the ReLUs with positive inputs."
ONE_BIAS_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")


@dataclasses.dataclass(frozen=True)
class Initialisation:
    """How one `init` choice (config.model.init) draws each layer's weights and biases."""

    weight_std: float | None  # N(0, std^2) weights; None: He et al. 2015's N(0, 2 / fan_in)
    positive_bias: float  # the bias of ONE_BIAS_LAYERS (every other layer's is 0)
    weight_std_of: tuple[tuple[str, float], ...] = ()  # layers with their own std

    def kernel_init(self, layer: str):
        std = dict(self.weight_std_of).get(layer, self.weight_std)
        if std is None:
            # He, Zhang, Ren, Sun 2015, Sec. 2.2: zero-mean Gaussian, std sqrt(2 / fan_in)
            # (fan_in: kernel area x the input maps a unit reads, its tower's for conv2/4/5).
            # An untruncated normal, as the paper draws it (Flax's he_normal truncates).
            return nn.initializers.variance_scaling(2.0, "fan_in", "normal")
        return nn.initializers.normal(stddev=std)

    def bias_init(self, layer: str):
        if layer in ONE_BIAS_LAYERS and self.positive_bias:
            return nn.initializers.constant(self.positive_bias)
        return nn.initializers.zeros


# config.model.init -> its Initialisation (docs/learning.md measures the three).
INITIALISATIONS = {
    "paper": Initialisation(weight_std=0.01, positive_bias=1.0),  # Sec. 5, quoted above
    # Caffe's bvlc_alexnet (models/bvlc_alexnet/train_val.prototxt): N(0, 0.01) for conv1-5
    # and fc8, N(0, 0.005) for fc6/fc7; biases 0.1 in conv2/4/5 and fc6/fc7, 0 elsewhere.
    # Its readme: "initializing non-zero biases to 0.1 instead of 1 (found necessary for
    # training, as initialization to 1 gave flat loss)".
    "caffe": Initialisation(
        weight_std=0.01, positive_bias=0.1, weight_std_of=(("fc6", 0.005), ("fc7", 0.005))
    ),
    "he": Initialisation(weight_std=None, positive_bias=0.0),  # every bias 0 (He Sec. 2.2)
}


def check_init(init: str) -> None:
    if init not in INITIALISATIONS:
        raise UserError(f"--config.model.init={init!r} is not one of: {', '.join(INITIALISATIONS)}")


def conv1_padding(side: int) -> tuple[int, int]:
    """(top/left, bottom/right) zero padding giving cuda-convnet's 1 + ceil((S - 11) / 4)
    positions: (0, 3) at 224, (0, 0) at 227."""
    positions = 1 + math.ceil((side - CONV1_KERNEL) / CONV1_STRIDE)
    return 0, (positions - 1) * CONV1_STRIDE + CONV1_KERNEL - side


def _pooled(side: int) -> int:
    return (side - POOL_WINDOW) // POOL_STRIDE + 1


def model_axis_bytes_per_image(
    image_size: int = 224, width_divisor: int = 1, itemsize: int = 4
) -> dict[str, int]:
    """Bytes one tower's device receives from the other for one image in a training step,
    from the layer shapes: forward, the other tower's half of the activations gathered before
    conv3, fc6, fc7 and fc8; backward, the other device's part of the gradient for this
    tower's half at conv3, fc6 and fc7 (the gather before fc8 transposes to a local slice)."""
    conv1 = 1 + math.ceil((image_size - CONV1_KERNEL) / CONV1_STRIDE)
    pool2 = _pooled(_pooled(conv1))
    pool5 = _pooled(pool2)
    halves = {
        "conv3": pool2 * pool2 * TOWER_MAPS[1] // width_divisor,
        "fc6": pool5 * pool5 * TOWER_MAPS[4] // width_divisor,
        "fc7": FC_UNITS // TOWERS // width_divisor,
        "fc8": FC_UNITS // TOWERS // width_divisor,
    }
    forward = sum(halves.values()) * itemsize
    backward = (sum(halves.values()) - halves["fc8"]) * itemsize
    inputs = {f"{k}_input": v * itemsize for k, v in halves.items()}
    return {**inputs, "forward": forward, "backward": backward}


def _per_tower(fn, x: jax.Array, towers: int) -> jax.Array:
    """Apply fn to each tower's maps separately (maps are tower-major on the last axis)."""
    if towers == 1:
        return fn(x)
    split = x.reshape(*x.shape[:-1], towers, x.shape[-1] // towers)
    return fn(split).reshape(x.shape)


def replicated_all_gather(y: jax.Array, axis_name: str) -> jax.Array:
    """All-gather along the last axis for a computation every device of `axis_name` then
    repeats identically (fc8 and the loss). Its transpose keeps each device's own slice of
    the (identical) cotangent; a plain all-gather's sums the copies, doubling the gradient.

    Under shard_map that is `all_gather(to='invarying')`, whose result the type system knows
    to be replicated. pmap (vma not tracked) and vmap do not support that primitive in JAX
    0.10, so there the same transpose is a custom VJP."""
    if axis_name in _varying_axes(y):
        return lax.all_gather(y, axis_name, axis=y.ndim - 1, tiled=True, to="invarying")
    return _gather_keep_own_cotangent(y, axis_name)


def _varying_axes(y: jax.Array) -> frozenset:
    """The mesh axes shard_map's type system knows y to vary over (empty under pmap/vmap)."""
    aval = jax.typeof(y)
    vma = getattr(aval, "vma", None)  # the public name in JAX 0.7-0.9
    return frozenset(vma if vma is not None else aval.mat.varying)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_keep_own_cotangent(y, axis_name):
    return lax.all_gather(y, axis_name, axis=y.ndim - 1, tiled=True)


def _gather_fwd(y, axis_name):
    return _gather_keep_own_cotangent(y, axis_name), y.shape[-1]


def _gather_bwd(axis_name, width, cotangent):
    start = lax.axis_index(axis_name) * width
    return (lax.dynamic_slice_in_dim(cotangent, start, width, axis=cotangent.ndim - 1),)


_gather_keep_own_cotangent.defvjp(_gather_fwd, _gather_bwd)


class AlexNet(nn.Module):
    """AlexNet; `towers=2` is the paper's net, `towers=1` the single-tower variant with the
    same widths and full connectivity at every layer (62,378,344 parameters at 224)."""

    num_classes: int = 1000
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    towers: int = TOWERS
    tower_axis: str | None = None
    width_divisor: int = 1
    # A key of INITIALISATIONS (config.model.init; `init` is Flax's method).
    initialisation: str = "paper"
    # The convolution, the dense layers' product and the max-pooling (layers.Kernels, chosen
    # per backend).
    conv: ModuleDef = layers.Conv
    dot_general: Callable = ops.dot_general
    pool: Callable = layers.max_pool

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        # init builds the global parameters on one device even for a tower-split module
        # (there is no mesh axis to gather over outside shard_map).
        split = self.tower_axis is not None and not self.is_initializing()
        if self.tower_axis is not None and self.towers != TOWERS:
            raise ValueError("only the two-tower AlexNet splits over a mesh axis")
        # Towers computed on this device: both (one device), or its own one (split).
        here = 1 if split else self.towers
        if split and lax.axis_size(self.tower_axis) != self.towers:
            raise ValueError(f"axis {self.tower_axis!r} must have {self.towers} devices")
        conv = functools.partial(_tower_conv, self, here=here)
        dense = functools.partial(_tower_dense, self, here=here)
        gather = functools.partial(_tower_gather, self, split=split)

        def pool(y):  # 3x3 windows, stride 2, as _pooled counts them
            return self.pool(y, POOL_WINDOW, POOL_STRIDE)

        def lrn(y):
            return _per_tower(local_response_norm, y, here)  # Sec. 3.3, within a tower

        x = x.astype(self.dtype)
        pad1 = conv1_padding(x.shape[1]), conv1_padding(x.shape[2])
        x = conv("conv1", x, CONV1_KERNEL, stride=CONV1_STRIDE, padding=pad1)
        x = pool(lrn(x))
        x = pool(lrn(conv("conv2", x, 5, padding=2, same_tower=True)))
        x = conv("conv3", gather(x), 3, padding=1)
        x = conv("conv4", x, 3, padding=1, same_tower=True)
        x = pool(conv("conv5", x, 3, padding=1, same_tower=True))
        x = gather(x).reshape(x.shape[0], -1)  # (N, 6*6*256) at 224: both towers' maps
        x = self._dropout(nn.relu(dense("fc6", x)), train, split)
        x = gather(x)
        x = self._dropout(nn.relu(dense("fc7", x)), train, split)
        # Invariant gather: fc8 and the loss are then one replicated computation, whose
        # gradient comes back to each tower once (sliced), not once per device (summed).
        x = dense("fc8", gather(x, replicated=True), units=self.num_classes)
        return x.astype(jnp.float32)

    def _dropout(self, x: jax.Array, train: bool, split: bool) -> jax.Array:
        """Dropout 0.5 on fc6 and fc7 (Sec. 4.2). The mask is drawn for the whole layer from
        the same key on every tower device and each keeps its own half, so the split
        network drops exactly the units the one-device network does."""
        if not train or self.dropout_rate == 0.0:
            return x
        rng = self.make_rng("dropout")
        keep_prob = 1.0 - self.dropout_rate
        width = x.shape[-1] * (self.towers if split else 1)
        keep = jax.random.bernoulli(rng, keep_prob, (x.shape[0], width))
        if split:
            start = lax.axis_index(self.tower_axis) * x.shape[-1]
            keep = lax.dynamic_slice_in_dim(keep, start, x.shape[-1], axis=1)
        return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))

    @nn.nowrap
    def param_partition_specs(self, params) -> Any:
        """PartitionSpec of each parameter array: the tower-split layers' last axis over
        `tower_axis`, fc8 replicated; everything replicated when the module is not split."""

        def spec(path, leaf):
            layer = path[0].key
            if self.tower_axis is None or layer not in SPLIT_LAYERS:
                return P()
            return P(*([None] * (leaf.ndim - 1)), self.tower_axis)

        return jax.tree_util.tree_map_with_path(spec, params)


# This model's own config fields (config.model) and their defaults. init: the paper's
# (Sec. 5); configs/alexnet.py:digits picks another for small data (docs/learning.md).
FIELDS = {"dropout_rate": 0.5, "width_divisor": 1, "init": "paper"}


def build(
    *,
    num_classes: int,
    dtype: Any,
    model_axis: int,
    kernels: layers.Kernels,
    towers: int,
    dropout_rate: float,
    width_divisor: int,
    init: str,
) -> AlexNet:
    """The towers split over the mesh's model axis when it has one device per tower; on a
    model axis of 1 each device runs every tower (grouped convolutions)."""
    layers.check_width_divisor(width_divisor, WIDTH_DIVISORS)
    check_init(init)
    return AlexNet(
        num_classes=num_classes,
        dropout_rate=dropout_rate,
        dtype=dtype,
        towers=towers,
        tower_axis=MODEL_AXIS if towers > 1 and model_axis == towers else None,
        width_divisor=width_divisor,
        initialisation=init,
        **kernels.fields(),
    )


SPEC = ModelSpec(
    functools.partial(build, towers=TOWERS),
    FIELDS,
    min_image_size=MIN_IMAGE_SIZE,  # fc6's fan-in follows the last map (6x6 at 224)
    model_axis_sizes=(1, TOWERS),
    preprocess="alexnet",
)
SINGLE_TOWER_SPEC = dataclasses.replace(
    SPEC, build=functools.partial(build, towers=1), model_axis_sizes=(1,)
)


def _tower_conv(net, name, y, kernel, *, here, padding, stride=1, same_tower=False):
    """Layer `name` (conv1..conv5) of AlexNet `net`, for the `here` towers computed on this
    device. (A function, not a method: Flax would add a method's name to every op's name.)"""
    maps = TOWER_MAPS[int(name[-1]) - 1] * TOWERS // net.width_divisor  # all towers
    return net.conv(
        maps * here // net.towers,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        # A grouped convolution keeps each tower's maps apart; with one tower here it is
        # an ordinary convolution over that tower's maps.
        feature_group_count=here if same_tower else 1,
        activation=nn.relu,
        kernel_init=INITIALISATIONS[net.initialisation].kernel_init(name),
        bias_init=INITIALISATIONS[net.initialisation].bias_init(name),
        dtype=net.dtype,
        name=name,
    )(y)


def _tower_dense(net, name, y, *, here, units=None):
    """fc6/fc7 of the `here` towers on this device, or fc8 (`units`: the classes)."""
    if units is None:
        units = FC_UNITS // net.width_divisor * here // net.towers
    return nn.Dense(
        units,
        kernel_init=INITIALISATIONS[net.initialisation].kernel_init(name),
        bias_init=INITIALISATIONS[net.initialisation].bias_init(name),
        dtype=net.dtype,
        dot_general=net.dot_general,
        name=name,
    )(y)


def _tower_gather(net, y, *, split, replicated=False):
    """The paper's cross-GPU transfer: both towers' maps, tower 0's first."""
    if not split:
        return y
    if replicated:
        return replicated_all_gather(y, net.tower_axis)
    return lax.all_gather(y, net.tower_axis, axis=y.ndim - 1, tiled=True)
