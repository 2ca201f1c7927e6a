"""Convolution, dense products and max-pooling in the forms XLA:CPU runs fastest.

Same results as `lax.conv_general_dilated`, `lax.dot_general` and `flax.linen.max_pool` (same
parameters, same gradients); cnn_jax.models.layers builds the CPU kernel set from them
(`layers.Kernels.for_backend`). Measurements: docs/performance.md.

Why XLA:CPU needs help: it sends a convolution to its fast YNNPACK kernels only when a
feature dimension has more than 16 maps and the output is no larger than the input; the rest
run in Eigen's generic convolution, which is slow for few maps and for the "full" padding of
an input gradient. It differentiates a grouped convolution into a base-dilated one that runs
in its slowest loop, and it expands max-pooling's gradient (select-and-scatter) into a
reduce-window over (value, index) tuples. GPUs and TPUs have native kernels for all of these,
so there the forms that only serve XLA:CPU are skipped (`lax.platform_dependent`).

Mixed precision on CPU (`float32_on_cpu`, `dot_general`): AVX2 has no bfloat16 arithmetic, so
XLA:CPU evaluates every bfloat16 operation in float32 and rounds its result back, one scalar
float32->bfloat16 conversion per element per operation, and it splits a reduction of a
converted bfloat16 input into a slow reduce-window loop. Each layer's element-wise
tail therefore computes in float32 from its bfloat16 inputs and rounds once: what goes
between layers is still bfloat16.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

# The CPU features that decide how fast bfloat16 and the convolutions run (benchmark reports
# them): AVX512_BF16 (Zen 4, Cooper Lake and later) converts and multiplies bfloat16 pairs in
# hardware; AMX_BF16 (Sapphire Rapids) adds bfloat16 matrix tiles.
BFLOAT16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
REPORTED_CPU_FLAGS = frozenset({"avx2", "avx512f", "avx512_vnni", "amx_tile"}) | BFLOAT16_CPU_FLAGS


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of this machine's CPU (the `flags` line of Linux's /proc/cpuinfo);
    empty where there is no such file (macOS, Windows)."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return frozenset()
    return parse_cpu_flags(text)


def parse_cpu_flags(cpuinfo_text: str) -> frozenset[str]:
    """The flags of the first processor in /proc/cpuinfo's text (all cores list the same)."""
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_has_bfloat16(flags: frozenset[str]) -> bool:
    """Whether a CPU with these flags has bfloat16 arithmetic (dot products in hardware)."""
    return bool(flags & BFLOAT16_CPU_FLAGS)


def bfloat16_is_faster(backend: str) -> bool:
    """Whether a training step computes faster in bfloat16 than in float32 on `backend` (the
    default of run.half_precision). GPUs and TPUs run bfloat16 on matrix units at twice
    float32's rate or more. XLA:CPU's fast kernels decide it on a CPU, not the CPU's flags:
    its convolutions (YNNPACK's) take float32 only, so a bfloat16 network computes them in
    float32 (`_conv_cpu_float32`) and pays the conversions, and its bfloat16 dot products,
    though they use AVX512_BF16, are slower than float32's once their gradients are counted.
    On an AVX512_BF16 CPU bfloat16 takes 1.00x float32's CPU time per step for AlexNet and
    0.95x for LeNet-5, within noise, and its fully-connected layers 1.1-1.3x
    (docs/performance.md), so it is float32 on every CPU."""
    return backend in ("gpu", "tpu")


# YNNPACK (XLA:CPU's fast convolution library) takes a convolution only when its input or
# output has more than this many feature maps (xla/backends/cpu/ynn_support.cc).
_YNN_MIN_FEATURES = 16
_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """`lax.conv_general_dilated` (flax's `nn.Conv(conv_general_dilated=...)` hook).

    - A grouped convolution (AlexNet's towers on one device) is one convolution per group on
      that group's slice of maps and kernel, concatenated: same kernel layout (H, W, C/groups,
      O), and gradients that are ordinary convolutions (XLA:CPU differentiates a grouped
      kernel into a base-dilated convolution, its slowest loop).
    - On CPU, each product of an NHWC convolution (forward, input and kernel gradient) is
      computed the way XLA:CPU runs it fastest (`_conv_cpu`).
    """
    options = dict(
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    conv = functools.partial(lax.conv_general_dilated, **options)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if feature_group_count > 1:
        lhs_groups = jnp.split(lhs, feature_group_count, axis=dn.lhs_spec[1])
        rhs_groups = jnp.split(rhs, feature_group_count, axis=dn.rhs_spec[0])
        one_group = functools.partial(conv_general_dilated, **options)
        outs = [one_group(x, k) for x, k in zip(lhs_groups, rhs_groups, strict=True)]
        return jnp.concatenate(outs, axis=dn.out_spec[1])

    nhwc = dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    plain = all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
    if not (nhwc and plain and lhs.ndim == 4):
        return conv(lhs, rhs)
    strides = tuple(window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    else:
        pads = [tuple(p) for p in padding]
    on_cpu = functools.partial(
        _conv_cpu_float32, strides=strides, pads=tuple(pads), precision=precision
    )
    return lax.platform_dependent(lhs, rhs, cpu=on_cpu, default=conv)


def _conv_cpu_float32(x, kernel, *, strides, pads, precision):
    """_conv_cpu in float32. XLA:CPU's fast convolution kernels take float32 only; a bfloat16
    convolution falls back to Eigen's, which are slower. Mixed precision keeps its bfloat16
    activations between layers; each convolution computes in float32 (as bfloat16 hardware
    accumulates) and rounds its output back."""
    if x.dtype == jnp.bfloat16:
        f32 = jnp.float32
        return _conv_cpu(x.astype(f32), kernel.astype(f32), strides, pads, precision).astype(
            x.dtype
        )
    return _conv_cpu(x, kernel, strides, pads, precision)


def float32_on_cpu(fn, x: jax.Array, *args: jax.Array) -> jax.Array:
    """`fn(x, *args)`; with bfloat16 `x` on CPU, computed in float32 from the same bfloat16
    values and rounded to bfloat16 once, instead of after each of fn's operations.

    For one layer's element-wise tail (bias, scale, squashing function), which XLA:CPU would
    otherwise round after every operation, forward and backward. The arguments are rounded
    to x's dtype first (the bfloat16 copies of float32 parameters the layer computes with),
    so only the intermediate roundings inside fn are skipped, as a bfloat16 GPU's fused
    epilogue skips them. GPUs and TPUs run fn as it is.
    """
    args = tuple(a.astype(x.dtype) for a in args)
    if x.dtype != jnp.bfloat16:
        return fn(x, *args)

    def on_cpu(x, *args):
        return fn(x.astype(jnp.float32), *(a.astype(jnp.float32) for a in args)).astype(x.dtype)

    return lax.platform_dependent(x, *args, cpu=on_cpu, default=fn)


def dot_general(
    lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None
) -> jax.Array:
    """`lax.dot_general` (flax's `nn.Dense(dot_general=...)` hook). With bfloat16 operands on
    CPU it computes in float32 from their bfloat16 values and rounds the product once:
    XLA:CPU's own bfloat16 dot is slower."""
    plain = functools.partial(
        lax.dot_general,
        dimension_numbers=dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if lhs.dtype != jnp.bfloat16 or rhs.dtype != jnp.bfloat16:
        return plain(lhs, rhs)

    def on_cpu(lhs, rhs):
        f32 = jnp.float32
        y = lax.dot_general(
            lhs.astype(f32), rhs.astype(f32), dimension_numbers, precision=precision
        )
        return y.astype(preferred_element_type or lhs.dtype)

    return lax.platform_dependent(lhs, rhs, cpu=on_cpu, default=plain)


def _few_maps(kernel) -> bool:
    return max(kernel.shape[-2:]) <= _YNN_MIN_FEATURES


def _use_dot_form(x, kernel, strides, pads) -> bool:
    """Stride 1 and either few maps or one output position (kernel covers the input)."""
    covers_input = all(x.shape[1 + d] + sum(pads[d]) == kernel.shape[d] for d in range(2))
    return strides == (1, 1) and (_few_maps(kernel) or covers_input)


def _pad(x, pads):
    return jnp.pad(x, [(0, 0), *pads, (0, 0)]) if any(p != (0, 0) for p in pads) else x


def _xla_conv(x, kernel, strides, pads, precision):
    return lax.conv_general_dilated(
        x, kernel, strides, pads, precision=precision, dimension_numbers=_NHWC
    )


def _dot_form_padded(x, kernel, pads, precision):
    return _dot_form(_pad(x, pads), kernel, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_cpu(x, kernel, strides, pads, precision):
    """An NHWC/HWIO convolution, each of its three products computed the way XLA:CPU runs
    it fastest: XLA's own convolutions (padding inside them, where YNNPACK takes it), except
    at stride 1 with few maps or a kernel covering the input (LeNet-5), where YNNPACK refuses
    the forward and input-gradient convolutions and Eigen's are slow: there `_dot_form` and
    its gradient, dot products and shifted adds, and a matmul's kernel gradient when the
    kernel covers the input.
    """
    if _use_dot_form(x, kernel, strides, pads):
        return _dot_form_padded(x, kernel, pads, precision)
    return _xla_conv(x, kernel, strides, pads, precision)


def _conv_cpu_fwd(x, kernel, strides, pads, precision):
    return _conv_cpu(x, kernel, strides, pads, precision), (x, kernel)


def _conv_cpu_bwd(strides, pads, precision, residuals, g):
    x, kernel = residuals
    if _use_dot_form(x, kernel, strides, pads):
        dx = jax.vjp(lambda x: _dot_form_padded(x, kernel, pads, precision), x)[1](g)[0]
    else:  # XLA's transposed convolution keeps the padding inside: YNNPACK takes it
        dx = jax.vjp(lambda x: _xla_conv(x, kernel, strides, pads, precision), x)[1](g)[0]
    padded = _pad(x, pads)
    if padded.shape[1:3] == kernel.shape[:2]:  # one output position: a matmul's gradient
        dkernel = jax.vjp(lambda k: _dot_form(padded, k, precision), kernel)[1](g)[0]
    elif _use_shifted_kernel_gradient(x, g, strides, pads):
        dkernel = _kernel_gradient_by_shifts(x, g, kernel.shape, pads, precision)
    elif strides != (1, 1):
        dkernel = _kernel_gradient_by_image_groups(x, g, kernel, strides, pads, precision)
    else:
        dkernel = _xla_kernel_gradient(x, g, kernel, strides, pads, precision)
    return dx, dkernel


def _xla_kernel_gradient(x, g, kernel, strides, pads, precision):
    """XLA's own, the padding inside the convolution (not on a padded copy of x)."""
    as_conv = lambda k: _xla_conv(x, k, strides, pads, precision)
    return jax.vjp(as_conv, kernel)[1](g)[0]


# XLA:CPU's kernel gradient of a strided convolution is a convolution whose feature
# dimension is the batch: over more than 16 images YNNPACK takes it and runs it slowly
# (AlexNet's conv1, 11x11 stride 4, batch 32: 530 ms on one core, against 145 ms summed over
# groups of 4 images and PyTorch's 76 ms; batch 128: 2,030 against 510 ms).
_STRIDED_GRADIENT_IMAGES = 4


def _kernel_gradient_by_image_groups(x, g, kernel, strides, pads, precision):
    """XLA's own kernel gradient summed over groups of _STRIDED_GRADIENT_IMAGES images."""
    size = _STRIDED_GRADIENT_IMAGES
    groups = range(0, x.shape[0], size)
    return sum(
        _xla_kernel_gradient(x[i : i + size], g[i : i + size], kernel, strides, pads, precision)
        for i in groups
    )


_conv_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)

# XLA:CPU computes a kernel gradient as a convolution whose window is the whole output map
# and whose feature dimension is the batch, which runs 1.3-8x slower than one matmul on VGG's
# maps of 28x28 and more (docs/performance.md). On AlexNet's 13x13 and 27x27 maps, VGG's
# 14x14 and with 3 input maps (conv1_1) XLA's own is as fast or faster.
_SHIFTED_GRADIENT_MIN_SIDE = 28
_SHIFTED_GRADIENT_MIN_MAPS = 64


def _use_shifted_kernel_gradient(x, g, strides, pads) -> bool:
    """Stride 1, no cropping, an output of at least _SHIFTED_GRADIENT_MIN_SIDE a side and
    at least _SHIFTED_GRADIENT_MIN_MAPS input and output maps."""
    big = min(g.shape[1:3]) >= _SHIFTED_GRADIENT_MIN_SIDE
    maps = min(x.shape[3], g.shape[3]) >= _SHIFTED_GRADIENT_MIN_MAPS
    return big and maps and strides == (1, 1) and all(p >= 0 for pad in pads for p in pad)


def _kernel_gradient_by_shifts(x, g, kernel_shape, pads, precision):
    """The kernel gradient of a stride-1 convolution of `x` (padding `pads`) as one matmul:

        dk[i, j, c, o] = sum over n, y, x of columns[n, y, x, (j, c)] * rows[n, y, x, (i, o)]

    where `columns` holds the kw column-shifted copies of the padded input side by side
    (kw * C maps) and `rows` the kh row-shifted copies of the output gradient (kh * O maps),
    both over the padded input's rows. One (kw*C, kh*O) product has every tap's
    (C, O) block, with matmul operands wide enough to run at the CPU's peak; each copy is
    one fused loop (a sum of zero-padded views, not a concatenation, which XLA:CPU would
    write twice), 3(C + O) values per position against 9C for per-tap copies."""
    kh, kw, c, o = kernel_shape
    n, oh, ow, _ = g.shape
    (top, bottom), (left, right) = pads
    zero = jnp.zeros((), x.dtype)
    columns = sum(
        lax.pad(x, zero, [(0, 0, 0), (top, bottom, 0), (left - j, j + right - kw + 1, 0),
                          (j * c, (kw - 1 - j) * c, 0)])
        for j in range(kw)
    )  # fmt: skip
    rows = sum(
        lax.pad(g, zero, [(0, 0, 0), (i, kh - 1 - i, 0), (0, 0, 0), (i * o, (kh - 1 - i) * o, 0)])
        for i in range(kh)
    )
    positions = n * (oh + kh - 1) * ow
    over_positions = (((0,), (0,)), ((), ()))
    product = lax.dot_general(
        columns.reshape(positions, kw * c),
        rows.reshape(positions, kh * o),
        over_positions,
        precision=precision,
    )
    return product.reshape(kw, c, kh, o).transpose(2, 0, 1, 3)


def _dot_form(x, kernel, precision):
    """A VALID stride-1 convolution as dot products and shifted multiply-adds:

    - kernel covering the whole input: one matmul over the flattened window (LeNet-5's C5);
    - one input map (C1): YNNPACK's convolution on output maps zero-padded past its minimum;
    - otherwise (C3): the kw column shifts side by side as one (kw*C)-map input, then kh
      row-shifted matmuls, whose input gradient is matmuls and shifted adds too.
    """
    kh, kw, c, o = kernel.shape
    n, h, w, _ = x.shape
    oh, ow = h - kh + 1, w - kw + 1
    dot = functools.partial(jnp.matmul, precision=precision)
    if oh == 1 and ow == 1:
        y = dot(x.reshape(n, h * w * c), kernel.reshape(kh * kw * c, o))
        return y.reshape(n, 1, 1, o)
    if c == 1:
        # Zero output maps past YNNPACK's minimum (24: a multiple of its 8-wide vectors),
        # then dropped: a 4x larger convolution in its fast kernels is still faster than
        # Eigen's. (A sum of shifted outer products is faster alone, but XLA fuses it into
        # every consumer and recomputes it there.)
        spare = 24 - o
        wide = jnp.pad(kernel, [(0, 0), (0, 0), (0, 0), (0, max(0, spare))])
        return _xla_conv(x, wide, (1, 1), ((0, 0), (0, 0)), precision)[..., :o]
    columns = jnp.concatenate([x[:, :, j : j + ow, :] for j in range(kw)], axis=-1)
    rows = kernel.reshape(kh, kw * c, o)
    return sum(dot(columns[:, i : i + oh], rows[i]) for i in range(kh))


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """Max-pooling over `window` x `window` patches every `stride` pixels, no padding (NHWC),
    as `flax.linen.max_pool(x, (window,) * 2, (stride,) * 2, 'VALID')`, ties included: the
    gradient goes to the first maximal element of each window in row-major order."""
    if x.dtype != jnp.bfloat16:
        return _max_pool(x, window, stride)

    def on_cpu(x):
        # The maximum of bfloat16 values is one of them, so float32 gives the same result;
        # in bfloat16 XLA:CPU re-rounds a float32 copy of x in each of the gradient's
        # window*window comparisons and each add.
        return _max_pool(x.astype(jnp.float32), window, stride).astype(x.dtype)

    return lax.platform_dependent(x, cpu=on_cpu, default=lambda x: _max_pool(x, window, stride))


def _reduce_window_max(x, window, stride):
    dims, strides = (1, window, window, 1), (1, stride, stride, 1)
    return lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, "VALID")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x, window, stride):
    return _reduce_window_max(x, window, stride)


def _max_pool_fwd(x, window, stride):
    y = _reduce_window_max(x, window, stride)
    return y, (x, y)


def _max_pool_bwd(window, stride, residuals, g):
    x, y = residuals

    def native(x, g):  # XLA's select-and-scatter: a native kernel on GPU and TPU
        return jax.vjp(lambda x: _reduce_window_max(x, window, stride), x)[1](g)[0]

    def shifted_masks(x, g):
        """Each window offset in row-major order is a strided view of x the size of y; the
        gradient goes to the first offset holding the window's maximum, scattered back by
        interior padding. XLA fuses the whole loop, unlike its CPU select-and-scatter."""
        n, h, w, c = x.shape
        oh, ow = y.shape[1:3]
        zero = jnp.zeros((), g.dtype)
        dx, taken = jnp.zeros_like(g, shape=x.shape), jnp.zeros(y.shape, bool)
        for i in range(window):
            for j in range(window):
                end = (n, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c)
                view = lax.slice(x, (0, i, j, 0), end, (1, stride, stride, 1))
                hit = (view == y) & ~taken
                taken = taken | hit
                rows, cols = (i, h - end[1], stride - 1), (j, w - end[2], stride - 1)
                spread = [(0, 0, 0), rows, cols, (0, 0, 0)]
                dx = dx + lax.pad(jnp.where(hit, g, zero), zero, spread)
        return dx

    return (lax.platform_dependent(x, g, cpu=shifted_masks, default=native),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
