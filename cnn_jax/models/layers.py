"""Layers the classic papers used that modern libraries dropped, and the convolution, dense
layer and max-pooling every model is built from.

- `lecun_tanh`, `TrainableSubsampling`, `SparseConv`, `EuclideanRBF`: LeNet-5 (1998).
- `local_response_norm`: AlexNet (2012) and VGG's A-LRN (2014).
- `Kernels`: the convolution module (with its activation), the dense layers' product and the
  max-pooling every model is built from, chosen once per backend (`Kernels.for_backend`):
  on CPU `Conv`, `ops.dot_general` and `max_pool`, the forms XLA:CPU runs fastest
  (cnn_jax.models.ops); elsewhere Flax's own (`FlaxConv`, `lax.dot_general`,
  `flax_max_pool`). Every model takes them as fields (`conv`, `dot_general`, `pool`), as
  Flax's ResNet takes `conv`; both sets have the same parameters, names and initialisers.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.errors import UserError
from cnn_jax.models import ops


def lecun_tanh(a: jax.Array) -> jax.Array:
    """LeNet-5's squashing function f(a) = A tanh(S a), A = 1.7159, S = 2/3 (paper, App. A).

    A and S are chosen so that f(1) = 1 and f(-1) = -1, which keeps +-1 targets in the range
    where the gain is largest.
    """
    return 1.7159 * jnp.tanh(a * (2.0 / 3.0))


ModuleDef = Any  # a Flax module class, or a functools.partial of one


class Conv(nn.Module):
    """A 2-D NHWC convolution, its bias and `activation`: `nn.Conv`'s parameters (same names,
    shapes and initialisers, so checkpoints are unchanged) followed by the activation.

    The convolution is `ops.conv_general_dilated`; bias and activation are one element-wise
    tail (`ops.float32_on_cpu`), because nn.Conv adds its bias as a separate bfloat16 step,
    whose gradient XLA:CPU reduces in its slowest loop.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = "VALID"  # as nn.Conv: a string, an int, or (low, high) per spatial axis
    feature_group_count: int = 1
    use_bias: bool = True
    activation: Callable[[jax.Array], jax.Array] | None = None
    kernel_init: Callable = nn.initializers.lecun_normal()  # nn.Conv's defaults
    bias_init: Callable = nn.initializers.zeros
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        groups = self.feature_group_count
        shape = (*self.kernel_size, x.shape[-1] // groups, self.features)
        kernel = self.param("kernel", self.kernel_init, shape)
        padding = self.padding
        if isinstance(padding, int):
            padding = [(padding, padding)] * 2
        elif not isinstance(padding, str):
            padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
        y = ops.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            self.strides,
            padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )
        activation = self.activation or (lambda v: v)
        if not self.use_bias:
            return y if self.activation is None else ops.float32_on_cpu(activation, y)
        bias = self.param("bias", self.bias_init, (self.features,))
        return ops.float32_on_cpu(lambda y, b: activation(y + b), y, bias)


class FlaxConv(nn.Conv):
    """`nn.Conv` followed by `activation`: Conv's interface (and its VALID default padding)
    on Flax's own convolution."""

    padding: Any = "VALID"
    activation: Callable[[jax.Array], jax.Array] | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        return y if self.activation is None else self.activation(y)


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """`window` x `window` max-pooling every `stride` pixels, no padding (ops.max_pool)."""
    return ops.max_pool(x, window, stride)


def flax_max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """The same pooling as Flax writes it."""
    return nn.max_pool(x, (window, window), (stride, stride), "VALID")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The convolution module, the dense layers' product (nn.Dense's `dot_general` hook) and
    the max-pooling a model's layers are built from: its `conv`, `dot_general` and `pool`
    fields (`Kernels.fields`)."""

    conv: ModuleDef = Conv
    dot_general: Callable = ops.dot_general
    pool: Callable[[jax.Array, int, int], jax.Array] = max_pool

    @classmethod
    def for_backend(cls, backend: str) -> "Kernels":
        """XLA:CPU's tuned forms (ops) on "cpu"; Flax's own elsewhere, where the accelerator
        libraries have native kernels for every form (the tuned ones compute the same there,
        through `lax.platform_dependent`, only less directly)."""
        if backend == "cpu":
            return cls()
        return cls(conv=FlaxConv, dot_general=jax.lax.dot_general, pool=flax_max_pool)

    def fields(self) -> dict[str, Any]:
        return {"conv": self.conv, "dot_general": self.dot_general, "pool": self.pool}


def check_width_divisor(width_divisor: int, allowed: tuple[int, ...]) -> None:
    """A model's `width_divisor` field (every layer's width divided by it, for tests and quick
    CPU runs) must divide all its widths."""
    if width_divisor not in allowed:
        raise UserError(
            f"--config.model.width_divisor={width_divisor} is not one of: "
            f"{', '.join(map(str, allowed))}"
        )


def lecun_uniform_fan_in(fan_in: int):
    """LeNet-5's initialisation: uniform in [-2.4/F, 2.4/F], F = the unit's fan-in (App. C)."""
    limit = 2.4 / fan_in

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


class TrainableSubsampling(nn.Module):
    """LeNet-5's S2/S4: each 2x2 block is summed, multiplied by one trainable coefficient per
    map, a trainable bias is added and the result squashed (paper Sec. II-B). Two parameters
    per feature map: S2 has 12, S4 has 32.
    """

    window: int = 2
    activation: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        k = self.window
        fan_in = k * k
        coef = self.param("coefficient", lecun_uniform_fan_in(fan_in), (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        activation = lecun_tanh if self.activation else (lambda v: v)

        def layer(x, coef, bias):
            # A reshape-sum is the exact 2x2 block sum and lowers to one fused reduce.
            blocks = x[:, : h - h % k, : w - w % k].reshape(n, h // k, k, w // k, k, c)
            return activation(blocks.sum((2, 4)) * coef + bias)

        # Element-wise throughout: one float32 computation on CPU in mixed precision.
        return ops.float32_on_cpu(layer, x, coef, bias)


# LeNet-5's Table I: column j lists the S2 maps that C3 map j reads.
# Maps 0-5 read 3 contiguous maps, 6-11 read 4 contiguous, 12-14 read 4 discontinuous and
# 15 reads all six; contiguity wraps around (maps are numbered modulo 6).
LENET5_C3_TABLE: tuple[tuple[int, ...], ...] = (
    *(tuple((i + d) % 6 for d in range(3)) for i in range(6)),
    *(tuple((i + d) % 6 for d in range(4)) for i in range(6)),
    (0, 1, 3, 4),
    (1, 2, 4, 5),
    (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)


def connection_matrix(table: Sequence[Sequence[int]], num_inputs: int) -> np.ndarray:
    """Boolean (num_inputs, num_outputs) matrix: True where output j reads input i."""
    m = np.zeros((num_inputs, len(table)), dtype=bool)
    for j, inputs in enumerate(table):
        m[list(inputs), j] = True
    return m


class SparseConv(nn.Module):
    """A convolution in which each output map reads only the input maps its table names.

    Only the connected kernels are parameters (C3: 60 connections x 25 + 16 biases = 1,516).
    They are scattered into a dense kernel with zeros elsewhere, so the layer is still one
    convolution for XLA; the zeros receive no gradient because they are not parameters.
    """

    table: tuple[tuple[int, ...], ...]
    num_inputs: int
    kernel_size: tuple[int, int] = (5, 5)
    activation: Callable[[jax.Array], jax.Array] | None = None  # applied with the bias

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        mask = connection_matrix(self.table, self.num_inputs)
        in_idx, out_idx = np.nonzero(mask)  # one entry per connection
        num_out = len(self.table)
        # Fan-in of output map j is kh*kw*len(table[j]); the paper's init uses it per unit.
        fan_in = np.array([kh * kw * len(t) for t in self.table])[out_idx]
        limits = jnp.asarray(2.4 / fan_in, jnp.float32)

        def init(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -1.0, 1.0) * limits

        kernel = self.param("kernel", init, (kh, kw, len(in_idx)))
        bias = self.param("bias", nn.initializers.zeros, (num_out,))
        dense = jnp.zeros((kh, kw, self.num_inputs, num_out), kernel.dtype)
        dense = dense.at[:, :, in_idx, out_idx].set(kernel).astype(x.dtype)
        y = ops.conv_general_dilated(
            x, dense, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        activation = self.activation or (lambda v: v)
        return ops.float32_on_cpu(lambda y, b: activation(y + b), y, bias)


# The ten 7x12 bitmaps of LeNet-5's output RBF units (paper Sec. II-B, Fig. 3): stylised
# digits drawn here on the paper's grid; '#' is +1, '.' is -1. The paper's exact bitmaps are
# printed only as a figure, so these are a transcription of the idea, not of its pixels.
DIGIT_BITMAPS: tuple[str, ...] = (
    "..###.. .#...#. #.....# #.....# #.....# #.....# #.....# #.....# #.....# .#...#. ..###.. .......",
    "...#... ..##... .#.#... ...#... ...#... ...#... ...#... ...#... ...#... ...#... .#####. .......",
    ".#####. #.....# ......# ......# .....#. ....#.. ...#... ..#.... .#..... #...... ####### .......",
    ".#####. #.....# ......# ......# ..####. ......# ......# ......# ......# #.....# .#####. .......",
    "....##. ...#.#. ..#..#. .#...#. #....#. #....#. ####### .....#. .....#. .....#. .....#. .......",
    "####### #...... #...... #...... ######. ......# ......# ......# ......# #.....# .#####. .......",
    "..####. .#..... #...... #...... ######. #.....# #.....# #.....# #.....# #.....# .#####. .......",
    "####### ......# .....#. .....#. ....#.. ....#.. ...#... ...#... ..#.... ..#.... ..#.... .......",
    ".#####. #.....# #.....# #.....# .#####. #.....# #.....# #.....# #.....# #.....# .#####. .......",
    ".#####. #.....# #.....# #.....# #.....# .###### ......# ......# ......# .....#. .####.. .......",
)


def rbf_prototypes() -> np.ndarray:
    """(10, 84) array of +-1 prototype vectors, one 7x12 bitmap per class, row-major."""
    rows = []
    for bitmap in DIGIT_BITMAPS:
        bitmap_rows = bitmap.split()
        assert len(bitmap_rows) == 12 and all(len(r) == 7 for r in bitmap_rows), bitmap
        pixels = "".join(bitmap_rows)
        rows.append([1.0 if p == "#" else -1.0 for p in pixels])
    return np.asarray(rows, np.float32)


class EuclideanRBF(nn.Module):
    """LeNet-5's output layer: y_i = sum_j (x_j - w_ij)^2 with fixed prototypes w_i.

    The prototypes are constants, not parameters (the paper keeps them fixed), so the layer
    adds nothing to the parameter count. It returns the distances y_i; smaller is better.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = jnp.asarray(rbf_prototypes(), x.dtype)  # (classes, features)
        # ||x||^2 - 2 x.w + ||w||^2 is one matmul instead of a (batch, classes, 84) tensor.
        sq = jnp.sum(x * x, axis=-1, keepdims=True) - 2.0 * x @ w.T + jnp.sum(w * w, axis=-1)
        return sq


def local_response_norm(
    x: jax.Array, *, size: int = 5, k: float = 2.0, alpha: float = 1e-4, beta: float = 0.75
) -> jax.Array:
    """AlexNet's local response normalisation across channels (Krizhevsky et al. 2012, 3.3).

    b[c] = a[c] / (k + alpha * sum_{c' in [c - n/2, c + n/2]} a[c']^2) ** beta

    alpha multiplies the plain sum over the n neighbours, as the paper writes it; PyTorch's and
    Caffe's LRN divide alpha by n, so their alpha=1e-4 is this alpha=2e-5. Channels beyond
    either end count as zero. Computed in float32 whatever x's dtype.
    """
    return _lrn(x, size, k, alpha, beta)


def _channel_window_sum(v: jax.Array, size: int) -> jax.Array:
    """sum_{c' in [c - size//2, c + size//2]} v[c'], zero beyond the ends: `size` shifted
    slices of the zero-padded channels, added in one fused loop (a cumulative sum lowers
    to a multi-pass scan on XLA:CPU)."""
    half, channels = size // 2, v.shape[-1]
    padded = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(half, half)])
    return sum(jax.lax.slice_in_dim(padded, i, i + channels, axis=-1) for i in range(size))


def _lrn_denominator(xf, size, k, alpha, beta):
    """(s, s ** -beta) with s = k + alpha * window sum of squares."""
    s = k + alpha * _channel_window_sum(xf * xf, size)
    if beta == 0.75:  # the paper's beta: two square roots instead of exp(-0.75 * log(s))
        r = jax.lax.rsqrt(s)
        return s, r * jnp.sqrt(r)
    return s, s ** (-beta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _lrn(x, size, k, alpha, beta):
    xf = x.astype(jnp.float32)
    return (xf * _lrn_denominator(xf, size, k, alpha, beta)[1]).astype(x.dtype)


def _lrn_fwd(x, size, k, alpha, beta):
    return _lrn(x, size, k, alpha, beta), x  # the backward recomputes s: one saved array


def _lrn_bwd(size, k, alpha, beta, x, g):
    """With s_c as above and b_c = a_c s_c^-beta, each a_j enters its own b_j and the s_c of
    its window neighbours c:  dE/da_j = g_j s_j^-beta
    - 2 alpha beta a_j sum_{c in window(j)} g_c b_c / s_c.
    The window is symmetric, so the sum is the same window sum as the forward's; autodiff
    would instead differentiate the power with a second power."""
    xf, gf = x.astype(jnp.float32), g.astype(jnp.float32)
    s, scale = _lrn_denominator(xf, size, k, alpha, beta)
    spread = _channel_window_sum(gf * xf * scale / s, size)
    return ((gf * scale - 2.0 * alpha * beta * xf * spread).astype(x.dtype),)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)
