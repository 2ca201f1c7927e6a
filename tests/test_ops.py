"""cnn_jax.models.ops and the LRN's hand-written gradient: the same values and gradients as
the plain JAX operations they replace for speed, on every code path they choose between."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnn_jax.models import layers, ops

NHWC = ("NHWC", "HWIO", "NHWC")

# (input shape, kernel shape, strides, padding, groups): the path each one takes on CPU.
CONVS = {
    "one input map (LeNet C1)": ((2, 12, 12, 1), (5, 5, 1, 6), (1, 1), "VALID", 1),
    "few maps (LeNet C3)": ((2, 9, 9, 6), (5, 5, 6, 16), (1, 1), "VALID", 1),
    "kernel covers input (LeNet C5)": ((2, 5, 5, 16), (5, 5, 16, 24), (1, 1), "VALID", 1),
    "padded, few maps": ((2, 7, 7, 3), (3, 3, 3, 4), (1, 1), "SAME", 1),
    "many maps, padded": ((2, 7, 7, 20), (3, 3, 20, 24), (1, 1), [(1, 1), (1, 1)], 1),
    "grouped (AlexNet towers)": ((2, 7, 7, 40), (3, 3, 20, 36), (1, 1), [(1, 1), (1, 1)], 2),
    "strided, uneven padding (AlexNet conv1)": (
        (2, 30, 30, 3),
        (11, 11, 3, 20),
        (4, 4),
        [(0, 3), (0, 3)],
        1,
    ),
    "strided, many maps": ((2, 9, 9, 20), (3, 3, 20, 24), (2, 2), "SAME", 1),
}


@pytest.mark.parametrize("name", CONVS)
def test_conv_matches_lax_in_value_and_gradients(name):
    x_shape, k_shape, strides, padding, groups = CONVS[name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)

    def loss(conv, x, k):
        y = conv(x, k, strides, padding, dimension_numbers=NHWC, feature_group_count=groups)
        return jnp.sum(jnp.sin(y)), y

    want = jax.grad(lambda x, k: loss(lax.conv_general_dilated, x, k), (0, 1), has_aux=True)
    got = jax.jit(jax.grad(lambda x, k: loss(ops.conv_general_dilated, x, k), (0, 1),
                           has_aux=True))  # fmt: skip
    (dx0, dk0), y0 = want(x, k)
    (dx1, dk1), y1 = got(x, k)
    for a, b in ((y0, y1), (dx0, dx1), (dk0, dk1)):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(jnp.abs(a).max()))


def test_conv_in_bfloat16_returns_bfloat16():
    x = jnp.ones((2, 8, 8, 3), jnp.bfloat16)
    k = jnp.ones((3, 3, 3, 20), jnp.bfloat16)
    y = ops.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC)
    assert y.dtype == jnp.bfloat16 and float(y[0, 4, 4, 0]) == 27.0


@pytest.mark.parametrize("window,stride,side", [(3, 2, 13), (2, 2, 8), (3, 2, 9)])
def test_max_pool_matches_flax_with_ties(window, stride, side):
    rng = np.random.default_rng(1)
    # ReLU-like input: many exact zeros, so windows tie and the first maximum must win.
    x = jnp.asarray(np.maximum(rng.standard_normal((2, side, side, 3)), 0.0), jnp.float32)
    flax_pool = lambda x: nn.max_pool(x, (window, window), (stride, stride), "VALID")
    y0, back0 = jax.vjp(flax_pool, x)
    y1, back1 = jax.vjp(lambda x: ops.max_pool(x, window, stride), x)
    g = jnp.asarray(rng.standard_normal(y0.shape), jnp.float32)
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_allclose(back1(g)[0], back0(g)[0], atol=1e-6)


@pytest.mark.parametrize("beta", [0.75, 0.6])
def test_lrn_gradient_matches_autodiff_of_the_formula(beta):
    """The LRN's closed-form backward against JAX differentiating the paper's formula."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 3, 3, 11)) * 20.0, jnp.float32)
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def formula(a, size=5, k=2.0, alpha=1e-4):
        padded = jnp.pad(a * a, [(0, 0)] * 3 + [(size // 2, size // 2)])
        window = sum(padded[..., i : i + a.shape[-1]] for i in range(size))
        return a / (k + alpha * window) ** beta

    y0, back0 = jax.vjp(formula, x)
    y1, back1 = jax.vjp(lambda a: layers.local_response_norm(a, beta=beta), x)
    np.testing.assert_allclose(y1, y0, rtol=1e-5)
    np.testing.assert_allclose(back1(g)[0], back0(g)[0], rtol=1e-4, atol=1e-6)
