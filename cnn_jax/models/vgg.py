"""VGG (Simonyan & Zisserman, "Very deep convolutional networks for large-scale image
recognition", ICLR 2015): configurations A, A-LRN, B, C, D and E of the paper's Table 1.

Every configuration is five blocks of 3x3 convolutions (stride 1, padding 1, ReLU), each
block followed by 2x2 max-pooling with stride 2, then three fully-connected layers
FC-4096, FC-4096, FC-1000 (Sec. 2.1). At 224x224 the last block leaves a 7x7x512 map, so FC6
reads 25,088 inputs. Parameters at 1000 classes (Table 2 rounds them to millions):

    A  132,863,336    A-LRN 132,863,336    B  133,047,848
    C  133,638,952    D     138,357,544    E  143,667,240

Layers are named as in the authors' released Caffe models: conv{block}_{index} and
fc6, fc7, fc8, so that a checkpoint reads like the paper's table.

Two ways to apply the classifier to the same parameters (Sec. 3.2):
- `dense=False` (training, centre-crop evaluation): FC6 is a fully-connected layer over the
  7x7x512 map. At any input size other than 224 the last map is first average-pooled to 7x7
  (an adaptive pool; the identity at 224), so the network, its parameters and its checkpoints
  are the paper's at every input size >= 32 -- this is how 32x32 inputs (tests, quick
  experiments) run. It is an extension: the paper only trains on 224x224 crops.
- `dense=True` (the paper's dense evaluation): FC6 slides over the map as a 7x7 convolution
  and FC7/FC8 as 1x1 convolutions, giving a class score map (2x2 at 256x256, 1x1 at 224) that
  is spatially averaged. Needs an input of at least 224.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.errors import UserError
from cnn_jax.models import layers, ops
from cnn_jax.models.layers import ModuleDef, local_response_norm
from cnn_jax.models.spec import ModelSpec

# Table 1, column by column: five blocks of (output maps, kernel side) per configuration.
_A = ((64, 3),), ((128, 3),), ((256, 3),) * 2, ((512, 3),) * 2, ((512, 3),) * 2
_B = ((64, 3),) * 2, ((128, 3),) * 2, ((256, 3),) * 2, ((512, 3),) * 2, ((512, 3),) * 2
# C adds a 1x1 convolution ("conv1") at the end of blocks 3, 4 and 5.
_C = (*_B[:2], *(((w, 3), (w, 3), (w, 1)) for w in (256, 512, 512)))
_D = (*_B[:2], *(((w, 3),) * 3 for w in (256, 512, 512)))
_E = (*_B[:2], *(((w, 3),) * 4 for w in (256, 512, 512)))


@dataclasses.dataclass(frozen=True)
class VGGVariant:
    blocks: tuple[tuple[tuple[int, int], ...], ...]
    lrn_after_first_conv: bool = False  # A-LRN (Table 1): AlexNet's LRN after conv1_1


VARIANTS: dict[str, VGGVariant] = {
    "A": VGGVariant(_A),
    "A-LRN": VGGVariant(_A, lrn_after_first_conv=True),
    "B": VGGVariant(_B),
    "C": VGGVariant(_C),
    "D": VGGVariant(_D),
    "E": VGGVariant(_E),
}
# The names the configurations were given after the paper, by their weight-layer counts.
ALIASES = {"vgg11": "A", "vgg11_lrn": "A-LRN", "vgg13": "B", "vgg16": "D", "vgg19": "E"}

FC_WIDTH = 4096  # FC6 and FC7 (Sec. 2.1)
FC6_WINDOW = 7  # FC6 reads a 7x7 map: 224 / 2**5 (five max-pools)
NUM_POOLS = 5
WIDTH_DIVISORS = (1, 2, 4, 8, 16)  # 1 is the paper; 16 leaves 4..32 maps
MIN_IMAGE_SIZE = 2**NUM_POOLS  # 32: the smallest input that leaves a 1x1 map after block 5
DENSE_MIN_IMAGE_SIZE = FC6_WINDOW * 2**NUM_POOLS  # 224: FC6's 7x7 window must fit


def resolve_variant(name: str) -> str:
    """The Table 1 letter for `name` (a letter, case-insensitive, or vgg11/13/16/19)."""
    key = str(name).strip()
    letter = ALIASES.get(key.lower(), key.upper())
    if letter not in VARIANTS:
        raise UserError(
            f"unknown VGG configuration {name!r}; choose one of: {', '.join(VARIANTS)} "
            f"(or {', '.join(f'{k}={v}' for k, v in ALIASES.items())})"
        )
    return letter


def conv_layer_names(variant: str) -> list[str]:
    """conv{block}_{index} of every convolution, in order (1-based, as in Caffe's models)."""
    return [
        f"conv{b}_{i}"
        for b, block in enumerate(VARIANTS[resolve_variant(variant)].blocks, 1)
        for i in range(1, len(block) + 1)
    ]


def adaptive_avg_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix averaging input rows [floor(i*in/out), ceil((i+1)*in/out)) into
    output row i: torchvision's adaptive average pool as a linear map. Replicates when
    in < out; the identity when in == out."""
    m = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -(-((i + 1) * in_size) // out_size)
        m[i, start:end] = 1.0 / (end - start)
    return m


class WindowDense(nn.Module):
    """A fully-connected layer over a `window` x `window` map (VGG's FC6), which can also slide
    over a larger map as a `window` x `window` convolution with the same kernel (Sec. 3.2).

    The kernel is stored as a dense layer's (window*window*C, features) matrix, in the
    row-major (H, W, C) order of flattening an NHWC map, so reshaping it to
    (window, window, C, features) is exactly the equivalent convolution kernel.
    """

    features: int
    window: int = FC6_WINDOW
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.glorot_uniform()
    dot_general: Callable = jax.lax.dot_general  # as nn.Dense's

    @nn.compact
    def __call__(self, x: jax.Array, *, dense: bool = False) -> jax.Array:
        n, h, w, c = x.shape
        k = self.window
        kernel = self.param("kernel", self.kernel_init, (k * k * c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
        x = x.astype(self.dtype)
        if dense:
            if h < k or w < k:
                raise ValueError(
                    f"dense evaluation needs a map of at least {k}x{k} before FC6, got {h}x{w} "
                    f"(input at least {DENSE_MIN_IMAGE_SIZE}x{DENSE_MIN_IMAGE_SIZE})"
                )
            window_kernel = kernel.reshape(k, k, c, self.features)
            y = jax.lax.conv_general_dilated(
                x, window_kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            return y + bias
        if (h, w) != (k, k):
            mh = jnp.asarray(adaptive_avg_pool_matrix(h, k), self.dtype)
            mw = jnp.asarray(adaptive_avg_pool_matrix(w, k), self.dtype)
            x = jnp.einsum("ph,nhwc,qw->npqc", mh, x, mw)
        return self.dot_general(x.reshape(n, -1), kernel, (((1,), (0,)), ((), ()))) + bias


class VGGFeatures(nn.Module):
    """The five convolutional blocks of one Table 1 column."""

    variant: str
    batch_norm: bool = False
    dtype: Any = jnp.float32
    width_divisor: int = 1
    conv: ModuleDef = layers.Conv
    pool: Callable = layers.max_pool

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        spec = VARIANTS[self.variant]
        for b, block in enumerate(spec.blocks, 1):
            for i, (features, kernel) in enumerate(block, 1):
                name = f"conv{b}_{i}"
                # Sec. 2.1: stride 1, padding 1 for 3x3 (0 for 1x1) keeps the resolution.
                # Batch norm's shift replaces the bias, and the ReLU follows it.
                x = self.conv(
                    features // self.width_divisor,
                    (kernel, kernel),
                    padding="SAME",
                    use_bias=not self.batch_norm,
                    activation=None if self.batch_norm else nn.relu,
                    kernel_init=nn.initializers.glorot_uniform(),
                    dtype=self.dtype,
                    name=name,
                )(x)
                if self.batch_norm:
                    norm = nn.BatchNorm(momentum=0.9, dtype=self.dtype, name=f"{name}_bn")
                    x = nn.relu(norm(x, use_running_average=not train))
                if spec.lrn_after_first_conv and (b, i) == (1, 1):
                    # Sec. 4.1: A-LRN uses the LRN of Krizhevsky et al. (k=2, n=5, alpha=1e-4,
                    # beta=0.75), and finds it does not help.
                    x = local_response_norm(x)
            x = self.pool(x, 2, 2)
        return x


class VGGClassifier(nn.Module):
    """FC6 (over a 7x7 window), FC7, FC8; dropout 0.5 after FC6 and FC7 (Sec. 3.1).

    With dense=True the input is any map of at least 7x7 and the output a class score map;
    FC7 and FC8 act on the last axis, so on a map they are exactly 1x1 convolutions.
    """

    num_classes: int
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    width_divisor: int = 1
    dot_general: Callable = ops.dot_general

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, dense: bool) -> jax.Array:
        width = FC_WIDTH // self.width_divisor
        glorot = nn.initializers.glorot_uniform()
        dot = self.dot_general

        def fc(features, name):
            return nn.Dense(
                features, dtype=self.dtype, kernel_init=glorot, dot_general=dot, name=name
            )

        fc6 = WindowDense(width, dtype=self.dtype, dot_general=dot, name="fc6")
        x = nn.relu(fc6(x, dense=dense))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(fc(width, "fc7")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return fc(self.num_classes, "fc8")(x)


class VGG(nn.Module):
    """One column of Table 1. Returns float32 class scores (N, num_classes).

    `width_divisor` divides every layer's width (convolutions and FC6/FC7), for tests and
    quick CPU runs; 1 is the paper's network.
    """

    variant: str = "D"
    num_classes: int = 1000
    batch_norm: bool = False
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    width_divisor: int = 1
    # The convolution, the dense layers' product and the max-pooling (layers.Kernels, chosen
    # per backend).
    conv: ModuleDef = layers.Conv
    dot_general: Callable = ops.dot_general
    pool: Callable = layers.max_pool

    def setup(self):
        self.features = VGGFeatures(
            resolve_variant(self.variant),
            self.batch_norm,
            self.dtype,
            self.width_divisor,
            conv=self.conv,
            pool=self.pool,
        )
        self.classifier = VGGClassifier(
            self.num_classes,
            self.dropout_rate,
            self.dtype,
            self.width_divisor,
            dot_general=self.dot_general,
        )

    def __call__(self, x: jax.Array, *, train: bool, dense: bool = False) -> jax.Array:
        if dense:
            # Sec. 3.2: "the class score map is spatially averaged (sum-pooled)".
            return jnp.mean(self.score_map(x, train=train), axis=(1, 2))
        x = self.features(x.astype(self.dtype), train=train)
        return self.classifier(x, train=train, dense=False).astype(jnp.float32)

    def score_map(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Dense evaluation's class score map (N, H', W', num_classes), float32; H' = W' = 1
        at 224x224, 2 at 256x256 (an input of side s gives floor(s / 32) - 6)."""
        x = self.features(x.astype(self.dtype), train=train)
        return self.classifier(x, train=train, dense=True).astype(jnp.float32)


# This model's own config fields (config.model) and their defaults. warm_start_from is read by
# cnn_jax.finetune, not by the module: a VGG run that starts from a trained configuration A
# (Sec. 3.1: the first four convolutions and the three fully-connected layers).
FIELDS = {
    "variant": "D",
    "batch_norm": False,
    "dropout_rate": 0.5,
    "width_divisor": 1,
    "warm_start_from": "",
}


def build(
    *,
    num_classes: int,
    dtype: Any,
    model_axis: int,
    kernels: layers.Kernels,
    variant: str,
    batch_norm: bool,
    dropout_rate: float,
    width_divisor: int,
) -> VGG:
    """A bad letter or width divisor fails here, before anything compiles."""
    del model_axis  # no towers
    layers.check_width_divisor(width_divisor, WIDTH_DIVISORS)
    try:
        letter = resolve_variant(variant)
    except UserError as error:
        raise UserError(f"--config.model.variant={variant}: {error}") from None
    return VGG(
        variant=letter,
        num_classes=num_classes,
        batch_norm=batch_norm,
        dropout_rate=dropout_rate,
        dtype=dtype,
        width_divisor=width_divisor,
        **kernels.fields(),
    )


SPEC = ModelSpec(
    build,
    FIELDS,
    min_image_size=MIN_IMAGE_SIZE,  # five 2x2 max-pools; FC6 adapts any last map to 7x7
    dense=True,
    preprocess="vgg",
    not_module_fields=("warm_start_from",),
)
