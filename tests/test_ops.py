"""cnn_jax.models.ops and the LRN's hand-written gradient: the same values and gradients as
the plain JAX operations they replace for speed, on every code path they choose between."""

import os

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
    # More images than one group of the strided kernel gradient, the last group short.
    "strided, 7 images": ((7, 15, 15, 3), (11, 11, 3, 8), (4, 4), [(0, 3), (0, 3)], 1),
    # Maps of 28x28 and more with 64 maps and more (VGG): the kernel gradient as one matmul
    # of shifted copies.
    "28x28 map, many maps (VGG)": ((1, 28, 28, 64), (3, 3, 64, 64), (1, 1), "SAME", 1),
    "28x28 map, 1x1 kernel (VGG-C)": ((1, 28, 28, 64), (1, 1, 64, 128), (1, 1), "VALID", 1),
    "28x28 map, uneven padding, 5x3 kernel": (
        (1, 27, 28, 64),
        (5, 3, 64, 72),
        (1, 1),
        [(3, 2), (0, 2)],
        1,
    ),
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
    got = jax.jit(jax.grad(lambda x, k: loss(ops.conv_general_dilated, x, k), (0, 1), has_aux=True))
    (dx0, dk0), y0 = want(x, k)
    (dx1, dk1), y1 = got(x, k)
    for a, b in ((y0, y1), (dx0, dx1), (dk0, dk1)):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(jnp.abs(a).max()))


def test_shifted_kernel_gradient_only_at_stride_one_on_large_maps():
    """The cases above that must take the shifted-copies kernel gradient do, and AlexNet's
    maps (13x13, 27x27), VGG's conv1_1 (3 input maps) and strided convolutions keep XLA's
    own."""

    def at(side, maps=128, in_maps=None, strides=(1, 1), pads=((1, 1), (1, 1))):
        x = jnp.zeros((1, side, side, in_maps or maps))
        return ops._use_shifted_kernel_gradient(x, jnp.zeros((1, side, side, maps)), strides, pads)

    assert at(28, maps=64) and at(224, maps=64) and at(112, maps=512)
    assert not at(27) and not at(13) and not at(224, maps=64, in_maps=3)
    assert not at(56, strides=(2, 2)) and not at(28, pads=((-1, 0), (0, 0)))


def test_shifted_kernel_gradient_is_the_convolutions():
    """_kernel_gradient_by_shifts directly, on a shape too small for the rule to pick it:
    uneven padding, a non-square kernel and more than one image."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 6, 7, 3)), jnp.float32)
    pads = ((2, 0), (1, 3))
    conv = lambda k: lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=NHWC)
    k = jnp.zeros((3, 4, 3, 5))
    g = jnp.asarray(rng.standard_normal(conv(k).shape), jnp.float32)
    want = jax.vjp(conv, k)[1](g)[0]
    got = ops._kernel_gradient_by_shifts(x, g, k.shape, pads, None)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


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


# Mixed precision on CPU: bfloat16 in and out, computed in float32 inside. Tolerances are a
# few bfloat16 ulps (2^-8 relative): the reference rounds after every operation.
BF16_TOL = {"rtol": 3e-2, "atol": 3e-2}


def _close_in_bfloat16(got, want, scale=1.0):
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    rtol, atol = BF16_TOL["rtol"], BF16_TOL["atol"] * scale
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=rtol, atol=atol)


def test_float32_on_cpu_rounds_once_to_bfloat16():
    """On CPU the tail is the float32 computation of the same bfloat16 inputs, rounded once;
    a rewrite that dropped the rounding, or the float32 compute, would not match exactly."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((4, 6, 6, 5)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal(5), jnp.float32)  # a float32 master parameter
    tail = lambda y, b: layers.lecun_tanh(y + b)
    got = jax.jit(lambda x, b: ops.float32_on_cpu(tail, x, b))(x, b)
    b16 = b.astype(jnp.bfloat16).astype(jnp.float32)  # the layer's bfloat16 copy of b
    want = tail(x.astype(jnp.float32), b16).astype(jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.float32(got), np.float32(want))
    _close_in_bfloat16(got, tail(x, b.astype(jnp.bfloat16)))  # the all-bfloat16 op


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "groups,stride,padding", [(1, 1, "VALID"), (2, 2, 1), (1, 4, [(0, 3), (0, 3)])]
)
def test_conv_layer_matches_flax_conv_then_activation(dtype, groups, stride, padding):
    """layers.Conv has nn.Conv's parameters (same tree, same initial values) and computes
    activation(nn.Conv(x)): exactly in float32, within bfloat16 rounding in bfloat16, for the
    output and for the gradients of the input and of both parameters."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 13, 13, 8)), jnp.float32)
    kw = dict(
        features=6,
        kernel_size=(3, 3),
        strides=(stride, stride),
        padding=padding,
        feature_group_count=groups,
        dtype=dtype,
        bias_init=nn.initializers.normal(0.5),
    )
    ours = layers.Conv(activation=layers.lecun_tanh, **kw)
    theirs = nn.Conv(**kw)
    params = ours.init(jax.random.key(0), x)
    ref_params = theirs.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref_params)
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)

    def loss(apply, params, x):
        y = apply(params, x)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    got = jax.jit(jax.grad(lambda p, x: loss(ours.apply, p, x), (0, 1), has_aux=True))
    reference = lambda p, x: layers.lecun_tanh(theirs.apply(p, x))
    want = jax.grad(lambda p, x: loss(reference, p, x), (0, 1), has_aux=True)
    ((dp1, dx1), y1), ((dp0, dx0), y0) = got(params, x), want(params, x)
    if dtype == jnp.float32:
        grads = zip(jax.tree.leaves(dp1), jax.tree.leaves(dp0), strict=True)
        for a, b in ((y1, y0), (dx1, dx0), *grads):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    else:
        _close_in_bfloat16(y1, y0)
        _close_in_bfloat16(dx1, dx0, scale=float(jnp.abs(dx0).max()))
        for a, b in zip(jax.tree.leaves(dp1), jax.tree.leaves(dp0), strict=True):
            _close_in_bfloat16(a, b, scale=float(jnp.abs(b).max()))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dot_general_matches_lax(dtype):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((4, 48)), dtype)
    w = jnp.asarray(rng.standard_normal((48, 7)), dtype)
    dims = (((1,), (0,)), ((), ()))
    f = lambda dot: lambda x, w: jnp.sum(jnp.sin(dot(x, w, dims).astype(jnp.float32)))
    y1, y0 = jax.jit(ops.dot_general, static_argnums=2)(x, w, dims), lax.dot_general(x, w, dims)
    g1 = jax.jit(jax.grad(f(ops.dot_general), (0, 1)))(x, w)
    g0 = jax.grad(f(lax.dot_general), (0, 1))(x, w)
    assert y1.dtype == dtype
    if dtype == jnp.float32:
        for a, b in ((y1, y0), *zip(g1, g0, strict=True)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    else:
        # float32 products of the bfloat16 values, rounded once
        exact = (x.astype(jnp.float32) @ w.astype(jnp.float32)).astype(jnp.bfloat16)
        np.testing.assert_array_equal(np.float32(y1), np.float32(exact))
        _close_in_bfloat16(y1, y0, scale=float(jnp.abs(np.float32(y0)).max()))
        for a, b in zip(g1, g0, strict=True):
            _close_in_bfloat16(a, b, scale=float(jnp.abs(np.float32(b)).max()))


def test_max_pool_gradient_in_bfloat16():
    """The CPU gradient sums in float32 and rounds once: exactly flax's gradient of the same
    bfloat16 input computed in float32, then rounded."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(np.maximum(rng.standard_normal((2, 13, 13, 3)), 0.0), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((2, 6, 6, 3)), jnp.bfloat16)
    flax_pool = lambda x: nn.max_pool(x, (3, 3), (2, 2), "VALID")
    y1, back1 = jax.vjp(lambda x: ops.max_pool(x, 3, 2), x)
    want = jax.vjp(flax_pool, x.astype(jnp.float32))[1](g.astype(jnp.float32))[0]
    np.testing.assert_array_equal(np.float32(y1), np.float32(flax_pool(x)))
    dx = back1(g)[0]
    assert dx.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.float32(dx), np.float32(want.astype(jnp.bfloat16)))


def test_kernels_are_chosen_by_backend():
    cpu, gpu = layers.Kernels.for_backend("cpu"), layers.Kernels.for_backend("gpu")
    assert (cpu.conv, cpu.dot_general, cpu.pool) == (layers.Conv, ops.dot_general, layers.max_pool)
    assert (gpu.conv, gpu.dot_general, gpu.pool) == (
        layers.FlaxConv,
        lax.dot_general,
        layers.flax_max_pool,
    )
    assert layers.Kernels.for_backend("tpu") == gpu
    assert set(cpu.fields()) == {"conv", "dot_general", "pool"}


@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_and_flax_conv_share_their_interface_and_parameters(use_bias):
    """The two kernel sets' convolutions take the same arguments (VALID by default, as Conv)
    and build the same parameters; without a bias, batch norm's shift replaces it (VGG)."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 20)), jnp.float32)
    kw = dict(features=24, kernel_size=(3, 3), use_bias=use_bias, activation=nn.relu)
    ours, flax_own = layers.Conv(**kw), layers.FlaxConv(**kw)
    params = ours.init(jax.random.key(0), x)
    jax.tree.map(np.testing.assert_array_equal, params, flax_own.init(jax.random.key(0), x))
    assert ("bias" in params["params"]) == use_bias
    y1, y0 = jax.jit(ours.apply)(params, x), flax_own.apply(params, x)
    assert y1.shape == y0.shape == (2, 7, 7, 24)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,stride", [(3, 2), (2, 2)])
def test_both_poolings_agree(window, stride):
    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 13, 13, 3)), jnp.float32)
    np.testing.assert_array_equal(
        layers.max_pool(x, window, stride), layers.flax_max_pool(x, window, stride)
    )


# Two processors of a /proc/cpuinfo (Linux), trimmed: an AVX2-only CPU's flags first.
FAKE_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx avx2 fma
bugs\t\t: sysret_ss_attrs

processor\t: 1
flags\t\t: fpu sse2 avx avx2 fma
"""


def test_cpu_flags_from_cpuinfo_decide_bfloat16_arithmetic(tmp_path):
    avx2 = ops.parse_cpu_flags(FAKE_CPUINFO)
    assert avx2 == {"fpu", "sse2", "avx", "avx2", "fma"} and not ops.cpu_has_bfloat16(avx2)
    zen4 = ops.parse_cpu_flags(FAKE_CPUINFO.replace("fma", "fma avx512f avx512_bf16"))
    assert ops.cpu_has_bfloat16(zen4) and ops.cpu_has_bfloat16(frozenset({"amx_bf16"}))
    path = tmp_path / "cpuinfo"
    path.write_text(FAKE_CPUINFO)
    assert ops.cpu_features(str(path)) == avx2
    assert ops.cpu_features(str(tmp_path / "absent")) == frozenset()  # macOS, Windows
    assert ops.parse_cpu_flags("processor\t: 0\n") == frozenset()


def test_bfloat16_is_the_default_only_where_the_kernels_run_it_faster():
    assert ops.bfloat16_is_faster("gpu") and ops.bfloat16_is_faster("tpu")
    assert not ops.bfloat16_is_faster("cpu")  # XLA:CPU's convolutions are float32 only


def test_xla_cpu_options_join_the_users_flags_without_overriding_them(monkeypatch):
    from jax._src import xla_bridge

    from cnn_jax import cli

    option = "--xla_cpu_experimental_ynn_fusion_type"
    monkeypatch.setattr(cli, "XLA_CPU_OPTIONS", {"lenet5": {option[2:]: "+eltwise"}})
    monkeypatch.setattr(cli, "XLA_CPU_OPTIONS_JAXLIB", "")  # any jaxlib
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)  # a new process
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    cli.tune_xla_cpu("lenet5")
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=2",
        f"{option}=+eltwise",
    ]
    monkeypatch.setenv("XLA_FLAGS", f"{option}=reduce")  # the user's own value stays
    cli.tune_xla_cpu("lenet5")
    cli.tune_xla_cpu("vgg")  # a model without options
    assert os.environ["XLA_FLAGS"] == f"{option}=reduce"
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    cli.tune_xla_cpu("lenet5")  # too late for this process: its children are not changed
    assert "XLA_FLAGS" not in os.environ
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setattr(cli, "XLA_CPU_OPTIONS_JAXLIB", "0.0.")  # not the jaxlib measured
    cli.tune_xla_cpu("lenet5")
    assert "XLA_FLAGS" not in os.environ
