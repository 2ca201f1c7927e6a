"""LeNet-5 (LeCun, Bottou, Bengio, Haffner, "Gradient-based learning applied to document
recognition", Proc. IEEE 1998, Sec. II-B), and a modern variant for comparison.

Layer by layer (N@HxW = N feature maps of HxW):

    input  1@32x32
    C1     6@28x28   5x5 conv            (5*5*1 + 1) * 6            =    156
    S2     6@14x14   trainable 2x2 sum   (1 + 1) * 6                =     12
    C3    16@10x10   5x5 conv, Table I   60 connections * 25 + 16   =  1,516
    S4    16@5x5     trainable 2x2 sum   (1 + 1) * 16               =     32
    C5   120@1x1     5x5 conv            (5*5*16 + 1) * 120         = 48,120
    F6    84         dense               (120 + 1) * 84             = 10,164
    out   10         Euclidean RBF, fixed +-1 prototypes            =      0
                                                                      60,000

Both models return class *scores* (higher is better). For the faithful model the score is the
negative RBF distance -y_i, so softmax cross-entropy over scores and the paper's MAP criterion
(cnn_jax.losses) both apply to the same output.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.models import layers, ops
from cnn_jax.models.layers import (
    LENET5_C3_TABLE,
    EuclideanRBF,
    ModuleDef,
    SparseConv,
    TrainableSubsampling,
    lecun_tanh,
    lecun_uniform_fan_in,
)
from cnn_jax.models.spec import ModelSpec


class LeNet5(nn.Module):
    """The paper's LeNet-5: exactly 60,000 trainable parameters."""

    num_classes: int = 10
    dtype: Any = jnp.float32
    # The convolution and the dense layers' product (layers.Kernels, chosen per backend).
    conv: ModuleDef = layers.Conv
    dot_general: Callable = ops.dot_general

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no dropout or batch statistics in the 1998 network
        if self.num_classes != 10:
            raise ValueError("LeNet-5's RBF output has one prototype per digit: num_classes=10")
        x = x.astype(self.dtype)

        def conv(features, fan_in, name):  # nn.Conv's parameters, squashed with its bias
            init = lecun_uniform_fan_in(fan_in)
            return self.conv(
                features,
                (5, 5),
                activation=lecun_tanh,
                kernel_init=init,
                dtype=self.dtype,
                name=name,
            )

        x = conv(6, 5 * 5 * 1, "C1")(x)
        x = TrainableSubsampling(name="S2")(x)
        x = SparseConv(LENET5_C3_TABLE, num_inputs=6, activation=lecun_tanh, name="C3")(x)
        x = TrainableSubsampling(name="S4")(x)
        x = conv(120, 5 * 5 * 16, "C5")(x)
        x = x.reshape(x.shape[0], -1)
        init = lecun_uniform_fan_in(120)
        x = nn.Dense(
            84, dtype=self.dtype, kernel_init=init, dot_general=self.dot_general, name="F6"
        )(x)
        x = ops.float32_on_cpu(lecun_tanh, x)
        distances = EuclideanRBF(name="output")(x.astype(jnp.float32))
        return -distances


class LeNet5Modern(nn.Module):
    """The same widths with what replaced each 1998 choice: ReLU, max-pooling, full C3
    connectivity, and a dense softmax head instead of the RBF units."""

    num_classes: int = 10
    dtype: Any = jnp.float32
    conv: ModuleDef = layers.Conv
    dot_general: Callable = ops.dot_general
    pool: Callable = layers.max_pool

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        x = x.astype(self.dtype)

        def conv(features, name):
            return self.conv(features, (5, 5), activation=nn.relu, dtype=self.dtype, name=name)

        def dense(features, name):
            return nn.Dense(features, dtype=self.dtype, dot_general=self.dot_general, name=name)

        x = self.pool(conv(6, "C1")(x), 2, 2)
        x = self.pool(conv(16, "C3")(x), 2, 2)
        x = conv(120, "C5")(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(dense(84, "F6")(x))
        return dense(self.num_classes, "output")(x).astype(jnp.float32)


def build(*, num_classes: int, dtype: Any, model_axis: int, kernels: layers.Kernels) -> LeNet5:
    del model_axis  # no towers
    conv, dot_general = kernels.conv, kernels.dot_general
    return LeNet5(num_classes=num_classes, dtype=dtype, conv=conv, dot_general=dot_general)


def build_modern(
    *, num_classes: int, dtype: Any, model_axis: int, kernels: layers.Kernels
) -> LeNet5Modern:
    del model_axis
    return LeNet5Modern(num_classes=num_classes, dtype=dtype, **kernels.fields())


# The input is 32x32 (a Dense layer after the convolutions); the faithful net's RBF output has
# one fixed prototype per digit, so it takes ten classes.
SPEC = ModelSpec(
    build,
    min_image_size=32,
    fixed_image_size=32,
    fixed_num_classes=10,
    fixed_num_classes_why=(
        "LeNet-5's RBF output has one fixed prototype per digit, so it takes exactly 10 "
        "classes; --config=configs/lenet.py:modern (a softmax head) takes any number"
    ),
    preprocess="lenet",
)
MODERN_SPEC = ModelSpec(build_modern, min_image_size=32, fixed_image_size=32, preprocess="lenet")
