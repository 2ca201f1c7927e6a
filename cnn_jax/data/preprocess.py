"""Per-paper preprocessing as tf ops: image -> float32 model input.

Each op is one PreprocessSpec in PREPROCESSORS: the function
`op(image, seed, *, train, image_size, **params) -> image` and the facts about it (the channels
it makes, the knobs it reads, whether it runs batched, how its multi-view evaluation squares
are normalised and rescaled). `Preprocessing` binds an op to its parameters once; the pipeline,
the evaluators and the cache take that. Every op uses only stateless random ops seeded by
`seed` (an int64 [2] tensor derived from the run seed, the epoch and the example), so it gives
the same result eagerly and inside `tf.data.map`, and a resumed run sees exactly the
augmentation an uninterrupted one would. `image` is a decoded uint8 [H, W, C] tensor or, for
datasets read without decoding (image folders, ImageNet), the encoded JPEG/PNG bytes; the op
decodes those itself.

Channels. Each op makes the channels its model takes (PreprocessSpec.input_channels): AlexNet
and VGG shift and centre RGB colours, so a grey image becomes RGB by replicating it; LeNet-5
reads grey digits, so an RGB image becomes its luminance. Files always decode as RGB first, as
torchvision's ImageFolder reads them, so that a grey, palette, RGBA, CMYK or 16-bit file gives
what its RGB rendering would. `Preprocessing.channels` is the one rule every part of the
package asks.

Sizes. The papers crop 224x224 out of images whose shorter side is 256 (AlexNet) or
S in [256, 512] (VGG). Every side here is given at that 224 scale and multiplied by
image_size / 224, so at image_size=224 the numbers are the papers' and a small experiment
(image_size=32) keeps their proportions. Images smaller than that side, such as CIFAR-10's
32x32 fed to a 224 AlexNet, are simply upsampled by the same resize.

Decoding only the patch. AlexNet's and VGG's training and centre views are patches of the
rescaled image, so they are computed from only the source pixels a patch needs
(rescaled_patch): for JPEG bytes only that window is decoded (tf.image.decode_and_crop_jpeg),
and no full-size rescaled image is made. The views equal rescale-then-crop
(PreprocessSpec.reference, same seeds) to float rounding; docs/input_pipeline.md has the
geometry and the rates.

Evaluation views beyond the centre crop need more than one crop: AlexNet's ten crops the
rescaled square (`Preprocessing.square`), VGG's dense and multi-crop evaluation the whole
rescaled image at each test scale (`WholeImage` views, `Preprocessing.whole_images`).
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from cnn_jax.errors import UserError

# LeNet-5 (paper Sec. II-B): "the values of the input pixels are normalized so that the
# background level (white) corresponds to a value of -0.1 and the foreground (black)
# corresponds to 1.175. This makes the mean input roughly 0, and the variance roughly 1."
LENET_BACKGROUND = -0.1
LENET_INK = 1.175

# The crop side every size below is quoted at (AlexNet Sec. 3; VGG Sec. 2.1).
PAPER_CROP = 224
# AlexNet Sec. 2: images are rescaled so the shorter side is 256, then the central 256x256
# patch is cut out; training takes random 224x224 patches of it (Sec. 4.1).
ALEXNET_SIDE = 256

# AlexNet Sec. 4.1 colour augmentation: PCA of the RGB values over the ImageNet training set.
# These are the eigenvalues / eigenvectors (columns) for pixel values in [0, 1] that
# fb.resnet.torch published and everyone since has used; the paper prints none.
IMAGENET_PCA_EIGENVALUES = np.array([0.2175, 0.0188, 0.0045], np.float32)
IMAGENET_PCA_EIGENVECTORS = np.array(
    [
        [-0.5675, 0.7192, 0.4009],
        [-0.5808, -0.0045, -0.8140],
        [-0.5836, -0.6948, 0.4203],
    ],
    np.float32,
)
# Per-channel mean RGB of the ImageNet training set, 0..255 (VGG Sec. 2.1 subtracts the mean
# RGB value; AlexNet Sec. 2 the mean image, which per channel is the usual simplification).
IMAGENET_MEAN_RGB = np.array([123.68, 116.78, 103.94], np.float32)

# LeNet-5 Sec. III-C trains its 0.8% net on "planar affine transformations: horizontal and
# vertical translations, scaling, squeezing (simultaneous horizontal compression and vertical
# elongation, or the reverse), and horizontal shearing". It gives no ranges; these are ours.
LENET_MAX_SHIFT = 2.0  # pixels
LENET_MAX_SCALE = 0.1  # x[0.9, 1.1]
LENET_MAX_SQUEEZE = 0.1  # x[0.9, 1.1] horizontally, the inverse vertically
LENET_MAX_SHEAR = 0.15  # horizontal shift per row, as a fraction of a pixel


# ITU-R BT.601 luma: Y = 0.299 R + 0.587 G + 0.114 B, the weights of JPEG's YCbCr and of
# tf.image.rgb_to_grayscale (which rounds them to 0.2989, 0.5870, 0.1140, summing to 0.9999;
# these sum to 1, so a grey image replicated to RGB comes back unchanged).
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)

# The ops branch only on Python values (train, their parameters, static shapes), so tf.data need not
# rewrite them with AutoGraph: skipping the conversion saves seconds per pipeline built.
_plain_graph_code = tf.autograph.experimental.do_not_convert


# --- Building blocks ------------------------------------------------------------------------


def decoded(image, channels: int | None = None):
    """Encoded JPEG/PNG bytes or a decoded uint8 [H, W, C] image -> uint8 [H, W, channels]
    (None: files as RGB, decoded images as they are; see with_channels)."""
    if image.dtype == tf.string:
        # Always three channels: TensorFlow's JPEG decoder turns a CMYK JPEG into RGB but
        # refuses it one channel, and PNGs (grey, palette, RGBA; 16-bit ones keep their high
        # byte) become RGB the same way. One luma formula then serves every file.
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    return with_channels(image, channels)


def source_size(image):
    """[height, width] (int32) of an image: read from a JPEG's header without decoding it,
    decoded for other files (PNG), the shape of an already-decoded image."""
    if image.dtype != tf.string:
        return tf.shape(image)[:2]
    return tf.cond(
        tf.io.is_jpeg(image),
        lambda: tf.image.extract_jpeg_shape(image)[:2],
        lambda: tf.shape(tf.io.decode_image(image, channels=3, expand_animations=False))[:2],
    )


def luminance(image):
    """uint8 [H, W, 3] -> its BT.601 luma, rounded: uint8 [H, W, 1]."""
    luma = tf.reduce_sum(tf.cast(image, tf.float32) * LUMA_WEIGHTS, axis=-1, keepdims=True)
    return tf.saturate_cast(tf.round(luma), tf.uint8)


def with_channels(image, channels: int | None):
    """A uint8 [H, W, C] image with `channels` channels: grey replicated to RGB, RGB reduced
    to its luminance; None or the same count leaves it as it is."""
    have = image.shape[-1]
    if channels is None or have == channels:
        return image
    if (have, channels) == (1, 3):
        return tf.tile(image, [1, 1, 3])
    if (have, channels) == (3, 1):
        return luminance(image)
    # cnn_jax.data.pipeline.input_channels refuses such datasets before a pipeline is built.
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels")


def scaled_side(side_at_224: int, image_size: int) -> int:
    """A side quoted at the papers' 224 crop, at input side `image_size`."""
    return round(side_at_224 * image_size / PAPER_CROP)


def rescaled_size(hw, side):
    """[height, width] (int32) of an image of size `hw` isotropically rescaled so that its
    shorter side is `side` (a Python or tensor int)."""
    hw = tf.cast(hw, tf.float32)
    scale = tf.cast(side, tf.float32) / tf.reduce_min(hw)
    return tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), side)


def resize_shorter_side(image, side):
    """Isotropic rescale so the shorter side is `side` (a Python or tensor int); float32."""
    new_hw = rescaled_size(tf.shape(image)[:2], side)
    return tf.image.resize(tf.cast(image, tf.float32), new_hw, antialias=True)


def central_crop(image, height: int, width: int):
    shape = tf.shape(image)
    top, left = (shape[0] - height) // 2, (shape[1] - width) // 2
    return image[top : top + height, left : left + width]


def rescaled_square(image, side: int):
    """Shorter side to `side`, then the central side x side patch (AlexNet Sec. 2)."""
    image = central_crop(resize_shorter_side(image, side), side, side)
    return tf.ensure_shape(image, [side, side, image.shape[-1]])


def random_crop_and_flip(image, size: int, seed):
    """One random size x size patch, mirrored with probability 1/2 (AlexNet Sec. 4.1)."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.image.stateless_random_crop(image, [size, size, image.shape[-1]], seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


# --- Decoding only the patch a view uses (docs/input_pipeline.md) ---------------------------
#
# A training view is a size x size patch of the image rescaled to a shorter side S, rescaled
# by tf.image.resize's antialiased bilinear filter (ScaleAndTranslate, kernel "triangle"):
# along each axis, output pixel r samples the source at x_r = (r + 0.5) / scale (pixel k's
# centre is at k + 0.5) with a triangle of half-width max(1 / scale, 1) source pixels, its
# weights normalised to sum to 1. A patch needs only the source pixels under its samples'
# triangles: that window is all that is decoded (tf.image.decode_and_crop_jpeg for JPEG
# bytes) and resampled, at the same sample positions with the same weights, so the patch
# equals resize-then-crop to float rounding (tests/test_input_pipeline.py).


def _crop_offset(extent_hw, size: int, seed):
    """The top-left corner of a random size x size patch of an extent_hw region: the draw
    tf.image.stateless_random_crop makes for a rank-3 image, so the same seed picks the same
    patch as random_crop_and_flip does (runs keep their augmentation)."""
    limit = tf.concat([extent_hw - size + 1, [1]], 0)
    draw = tf.random.stateless_uniform([3], seed=seed, maxval=tf.int32.max, dtype=tf.int32)
    return (draw % limit)[:2]


def patch_window(hw, new_hw, top_left, size: int):
    """Where the size x size patch at `top_left` of an image of size `hw` rescaled to `new_hw`
    lies in the image: (window [top, left, height, width] of source pixels, int32; the first
    sample's position in the window and the step between samples, float32 [2] each)."""
    step = tf.cast(hw, tf.float32) / tf.cast(new_hw, tf.float32)  # source pixels per output one
    half_width = tf.maximum(step, 1.0)  # the triangle's, widened when shrinking (antialias)
    first = (tf.cast(top_left, tf.float32) + 0.5) * step
    last = first + (size - 1) * step
    # A sample at x reads sources ceil(x - w - 0.5) .. floor(x + w - 0.5); one pixel more on
    # each side absorbs float rounding.
    low = tf.maximum(tf.cast(tf.floor(first - half_width - 0.5), tf.int32) - 1, 0)
    high = tf.minimum(tf.cast(tf.math.ceil(last + half_width - 0.5), tf.int32) + 2, hw)
    return tf.concat([low, high - low], 0), first - tf.cast(low, tf.float32), step


def _tap_weights(size: int, n, first, step):
    """Resampling along both axes, rows and columns, of n ([2]) source pixels to `size`
    samples at first + r * step (step < 0: mirrored; all [2]): the taps of each sample, the
    source pixels under its triangle (weights [2, size, 1, taps], float32; their source
    indices [2, size, taps], int32). Both axes at once: these are a few dozen tiny ops,
    whose overhead, not their arithmetic, is their cost."""
    half_width = tf.maximum(tf.abs(step), 1.0)[:, None]
    x = first[:, None] + tf.range(size, dtype=tf.float32) * step[:, None]  # [2, size]
    # ScaleAndTranslate's support of each sample and triangle weights, exactly.
    # (The window holds every sample, so only its supports' outer ends can need clipping.)
    start = tf.maximum(tf.math.ceil(x - half_width - 0.5), 0.0)
    end = tf.minimum(tf.floor(x + half_width - 0.5), tf.cast(n - 1, tf.float32)[:, None]) + 1.0
    taps = tf.cast(tf.reduce_max(end - start), tf.int32)  # 3 for ImageNet's 375 -> 256
    source = start[..., None] + tf.range(taps, dtype=tf.float32)
    distance = tf.abs(source + 0.5 - x[..., None]) / half_width[..., None]
    weights = tf.where(source < end[..., None], tf.maximum(0.0, 1.0 - distance), 0.0)
    weights = tf.math.divide_no_nan(weights, tf.reduce_sum(weights, axis=2, keepdims=True))
    source = tf.minimum(tf.cast(source, tf.int32), tf.cast(n - 1, tf.int32)[:, None, None])
    return weights[:, :, None, :], source


def _resample_rows(matrix, weights, source):
    """[n, m] (uint8 or float32) -> float32 [size, m]: each output row the weighted sum of
    its taps' rows (weights [size, 1, taps], source [size, taps]: _tap_weights)."""
    # Gathered as they are (uint8: a quarter of the bytes), then made float.
    taps = tf.cast(tf.gather(matrix, source), tf.float32)  # [size, taps, m]
    return tf.reshape(tf.matmul(weights, taps), [tf.shape(source)[0], -1])  # 1 x taps each


def _resample(pixels, size: int, first, step):
    """uint8 [h, w, C] -> float32 [size, size, C]: ScaleAndTranslate's triangle resampling at
    the given sample positions (TensorFlow's own kernel is scalar code), one axis at a time.
    Each pass resamples the rows of a matrix: every output row is its taps' source rows
    (3 for ImageNet's sizes) gathered and weighted by a batched matrix product. Between the
    passes and after them the matrix is transposed as a plain 2-D one, so that no pass and
    no transpose moves single channel values about (a transpose that keeps C = 3 values
    together, tf.transpose(x, [1, 0, 2]), costs ~3x as much)."""
    hw, channels = tf.shape(pixels)[:2], pixels.shape[-1]
    weights, source = _tap_weights(size, hw, first, step)
    rows = _resample_rows(tf.reshape(pixels, [hw[0], -1]), weights[0], source[0])  # [r, (x, C)]
    columns = tf.reshape(tf.transpose(rows), [hw[1], -1])  # [x, (C, r)]
    out = _resample_rows(columns, weights[1], source[1])  # [c, (C, r)]
    return tf.reshape(tf.transpose(tf.reshape(out, [-1, size])), [size, size, channels])


def add_per_channel(image, offset):
    """float32 [h, w, C] (static shape) plus `offset` [C] at every pixel. Added over the
    [h, w * C] view: TensorFlow's broadcast along a last axis of 3 costs ~6x as much."""
    h, w, channels = image.shape
    flat = tf.reshape(image, [h, w * channels]) + tf.tile(offset, [w])
    return tf.reshape(flat, [h, w, channels])


# The widest iMCU column of common JPEGs (4:2:0 and 4:2:2 chroma: 2 x 8 pixels; 4:4:4: 8).
_JPEG_IMCU_WIDTH = 16


def _source_and_window(image, geometry):
    """Decode no more of `image` than its window asks: geometry(hw) gives (window [top,
    left, height, width], first, step) for a source of size hw, as patch_window does. Returns
    (uint8 [height, width, 3] pixels, first, step), `first` relative to the window as decoded
    (a JPEG's may start a few columns left of the one asked): one tf.cond per image."""

    def window_of(pixels, hw):
        window, first, step = geometry(hw)
        top, left, height, width = tf.unstack(window)
        return pixels[top : top + height, left : left + width], first, step

    if image.dtype != tf.string:  # an already-decoded image (MNIST, CIFAR-10): slice it
        pixels, first, step = window_of(image, tf.shape(image)[:2])
        return with_channels(pixels, 3), first, step

    def jpeg():
        window, first, step = geometry(tf.image.extract_jpeg_shape(image)[:2])
        # libjpeg-turbo decodes a cropped row from the iMCU column boundary at or left of
        # the window (16 pixels for 4:2:0 and 4:2:2 chroma); a window that starts elsewhere
        # is decoded into a scratch row and copied out, row by row. Starting it there costs
        # the decoder nothing and saves that copy (~3% of the op's time).
        widen = tf.stack([0, window[1] % _JPEG_IMCU_WIDTH])
        window = window - tf.concat([widen, -widen], 0)
        # Three channels, as `decoded` asks: a CMYK or grey JPEG comes out RGB.
        pixels = tf.image.decode_and_crop_jpeg(image, window, channels=3)
        return pixels, first + tf.cast(widen, tf.float32), step

    def other():  # other formats (PNG) have no partial decoder: decode them whole, then slice
        whole = tf.io.decode_image(image, channels=3, expand_animations=False)
        return window_of(whole, tf.shape(whole)[:2])

    return tf.cond(tf.io.is_jpeg(image), jpeg, other)


def rescaled_patch(image, side, offset_of, size: int, mirror=False):
    """The size x size patch of `image` rescaled to shorter side `side` whose top-left corner,
    in the rescaled image, is offset_of(rescaled [height, width]); float32 [size, size, 3],
    mirrored left-right where `mirror` (a bool tensor) holds. The same pixels as
    resize_shorter_side then slicing (and tf.reverse), computed from only the source window
    the patch needs (patch_window): for JPEG bytes, only that window is decoded."""

    def geometry(hw):
        new_hw = rescaled_size(hw, side)
        return patch_window(hw, new_hw, offset_of(new_hw), size)

    pixels, first, step = _source_and_window(image, geometry)
    mirror = tf.convert_to_tensor(mirror, tf.bool)

    def resampled():
        # A mirrored patch samples its columns from the right: the same samples, reversed.
        flip = tf.cast(mirror, tf.float32) * tf.constant([0.0, 1.0])
        return _resample(pixels, size, first + flip * (size - 1) * step, step * (1 - 2 * flip))

    def sliced():
        # Already at the scale (an image of a fixed-side cache, cnn_jax.data.cache): every
        # sample sits on a pixel centre, where the triangle's weights are 1, 0, 0.
        top_left = tf.cast(first - 0.5, tf.int32)
        patch = tf.cast(
            tf.slice(pixels, tf.concat([top_left, [0]], 0), [size, size, 3]), tf.float32
        )
        return tf.cond(mirror, lambda: tf.reverse(patch, [1]), lambda: patch)

    # A step of 1 is an image already at the scale, new_hw == hw, whose samples then sit at
    # pixel centres, top_left + 0.5 - low.
    on_pixels = tf.reduce_all(tf.equal(step, 1.0))
    return tf.ensure_shape(tf.cond(on_pixels, sliced, resampled), [size, size, 3])


def _mirrors(seed):
    """tf.image.stateless_random_flip_left_right's decision for `seed`, as a bool."""
    return tf.random.stateless_uniform([], seed=seed, minval=0, maxval=1.0) < 0.5


def pca_colour_shift(seed, std: float):
    """The RGB offset sum_i alpha_i lambda_i p_i with alpha_i ~ N(0, std), 0..255 scale.

    AlexNet Sec. 4.1: one draw per image, added to every pixel. The eigen-pairs are for values
    in [0, 1], so the offset is multiplied by 255 for our 0..255 images.
    """
    alpha = tf.random.stateless_normal([3], seed=seed, stddev=std)
    return 255.0 * tf.linalg.matvec(IMAGENET_PCA_EIGENVECTORS, alpha * IMAGENET_PCA_EIGENVALUES)


def subtract_mean_rgb(image, mean_rgb=()):
    """`image` (0..255 RGB) less a mean RGB: `mean_rgb`, or the paper's when it is empty."""
    return image - mean_rgb_or_paper(mean_rgb)


def mean_rgb_or_paper(mean_rgb) -> np.ndarray:
    """The mean RGB an op subtracts: the config's `input.mean_rgb` where given (imported
    weights trained with another mean, cnn_jax.weights), else IMAGENET_MEAN_RGB."""
    return np.asarray(mean_rgb, np.float32) if len(mean_rgb) else IMAGENET_MEAN_RGB


def _lenet_affine(image, seed):
    """One random affine distortion of a [H, W, C] float image about its centre, filled with
    the background (LeNet-5 Sec. III-C)."""
    u = tf.random.stateless_uniform([6], seed=seed, minval=-1.0, maxval=1.0)
    shift_x, shift_y = u[0] * LENET_MAX_SHIFT, u[1] * LENET_MAX_SHIFT
    scale = 1.0 + u[2] * LENET_MAX_SCALE
    squeeze = 1.0 + u[3] * LENET_MAX_SQUEEZE
    shear = u[4] * LENET_MAX_SHEAR
    # Forward map (x = column, y = row, about the centre c): diag(s q, s / q) @ [[1, h], [0, 1]],
    # then the shift t. The transform op wants the inverse: output pixel -> input pixel.
    inv = [[1.0 / (scale * squeeze), -shear * squeeze / scale], [0.0, squeeze / scale]]
    h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    ox, oy = cx + shift_x, cy + shift_y  # where the centre goes
    transform = tf.stack(
        [
            inv[0][0],
            inv[0][1],
            cx - inv[0][0] * ox - inv[0][1] * oy,
            inv[1][0],
            inv[1][1],
            cy - inv[1][0] * ox - inv[1][1] * oy,
            0.0,
            0.0,
        ]
    )
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform[None],
        output_shape=tf.shape(image)[:2],
        fill_value=LENET_BACKGROUND,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return out[0]


# --- The ops --------------------------------------------------------------------------------


@_plain_graph_code
def lenet(image, seed, *, train, image_size, lenet_distortions):
    """28x28 digits padded to 32x32 so that stroke end-points can reach the centre of C3's
    receptive fields; intensities mapped to [-0.1, 1.175]; with lenet_distortions, training
    images get one random affine distortion each (paper Sec. III-C)."""
    image = tf.cast(decoded(image, PREPROCESSORS["lenet"].input_channels), tf.float32) / 255.0
    image = LENET_BACKGROUND + image * (LENET_INK - LENET_BACKGROUND)
    size = image_size
    static_side = image.shape[0]
    if static_side is None or static_side > size:
        # Larger images (a folder of JPEGs, whose size is known only per image) are shrunk to
        # the input side; MNIST's 28x28 digits are padded below, as the paper did.
        too_large = tf.reduce_any(tf.shape(image)[:2] > size)
        image = tf.cond(
            too_large, lambda: tf.image.resize(image, [size, size], antialias=True), lambda: image
        )
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    pad_h, pad_w = size - h, size - w
    # Pad with the background value, not zero, so the border looks like paper.
    image = (
        tf.pad(
            image - LENET_BACKGROUND,
            [[pad_h // 2, pad_h - pad_h // 2], [pad_w // 2, pad_w - pad_w // 2], [0, 0]],
        )
        + LENET_BACKGROUND
    )
    if train and lenet_distortions:
        image = _lenet_affine(image, seed)
    return image


def _unit_range(image):
    return image / 127.5 - 1.0


@_plain_graph_code
def scale_to_unit(image, seed, *, train, image_size):
    """[0, 255] -> [-1, 1], resized to image_size: synthetic data and quick experiments."""
    del seed, train
    channels = PREPROCESSORS["scale_to_unit"].input_channels
    image = _unit_range(tf.cast(decoded(image, channels), tf.float32))
    if image.shape[0] != image_size or image.shape[1] != image_size:
        image = tf.image.resize(image, [image_size, image_size])
    return image


@_plain_graph_code
def alexnet(image, seed, *, train, image_size, pca_lighting_std):
    """AlexNet (Sec. 2, 4.1): shorter side to 256, central 256x256; training takes a random
    224x224 patch, mirrors it half the time and shifts its colour along the ImageNet RGB
    principal components; evaluation takes the centre patch. Per-channel mean subtracted.

    Only the patch is computed, from only the source pixels it needs (rescaled_patch): the
    same views as alexnet_resize_then_crop, which rescales the whole image first."""
    size, side = image_size, scaled_side(ALEXNET_SIDE, image_size)
    square = tf.constant([side, side])
    if train:
        crop_seed, colour_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        # random_crop_and_flip's two seeds: the same patch and mirror as the reference.
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(crop_seed, 2))
        in_square = _crop_offset(square, size, crop_seed)
    else:
        in_square = (square - size) // 2  # central_crop's centre patch
    mirror = _mirrors(flip_seed) if train else False
    offset_of = lambda new_hw: (new_hw - side) // 2 + in_square
    image = rescaled_patch(image, side, offset_of, size, mirror)
    if not train:
        return add_per_channel(image, -IMAGENET_MEAN_RGB)
    # One pass over the patch for both offsets (the op is memory-bound).
    offset = pca_colour_shift(colour_seed, pca_lighting_std) - IMAGENET_MEAN_RGB
    return add_per_channel(image, offset)


@_plain_graph_code
def vgg(
    image, seed, *, train, image_size, pca_lighting_std, train_scale_min, train_scale_max, mean_rgb
):
    """VGG (Sec. 3.1): training rescales the shorter side to S, drawn per image from
    [train_scale_min, train_scale_max] (equal bounds: fixed S), then takes a random 224x224
    crop, mirrored half the time, with AlexNet's colour shift. Evaluation rescales to
    Q = (S_min + S_max) / 2 (Sec. 4.1) and takes the centre crop. Mean RGB subtracted: the
    paper's, or `mean_rgb` where given (imported weights' own, cnn_jax.weights).

    Only the crop is computed, from only the source pixels it needs (rescaled_patch): the
    same views as vgg_resize_then_crop."""
    size = image_size
    s_min, s_max = scaled_side(train_scale_min, size), scaled_side(train_scale_max, size)
    if not train:
        centre = lambda new_hw: (new_hw - size) // 2  # central_crop's
        return subtract_mean_rgb(
            rescaled_patch(image, (s_min + s_max) // 2, centre, size), mean_rgb
        )
    scale_seed, crop_seed, colour_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    side = tf.random.stateless_uniform(
        [], seed=scale_seed, minval=s_min, maxval=s_max + 1, dtype=tf.int32
    )
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(crop_seed, 2))
    offset_of = lambda new_hw: _crop_offset(new_hw, size, crop_seed)
    image = rescaled_patch(image, side, offset_of, size, _mirrors(flip_seed))
    return image + (pca_colour_shift(colour_seed, pca_lighting_std) - mean_rgb_or_paper(mean_rgb))


# The resize-then-crop forms of the decode-the-patch ops: same seeds, same views.
@_plain_graph_code
def alexnet_resize_then_crop(image, seed, *, train, image_size, pca_lighting_std):
    """`alexnet` as the paper words it: decode the whole image, rescale it, cut the square,
    then the patch. The same views from the same seeds; the reference the op is tested
    against (and timed against: benchmarks/input_rate.py --compare)."""
    size = image_size
    image = rescaled_square(decoded(image, 3), scaled_side(ALEXNET_SIDE, size))
    if train:
        crop_seed, colour_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        image = random_crop_and_flip(image, size, crop_seed)
        image = image + pca_colour_shift(colour_seed, pca_lighting_std)
    else:
        image = central_crop(image, size, size)
    return subtract_mean_rgb(image)


@_plain_graph_code
def vgg_resize_then_crop(
    image, seed, *, train, image_size, pca_lighting_std, train_scale_min, train_scale_max, mean_rgb
):
    """`vgg` as the paper words it: decode the whole image, rescale it to S, then crop. The
    reference the op is tested and timed against, as alexnet_resize_then_crop."""
    size = image_size
    image = decoded(image, 3)
    s_min, s_max = scaled_side(train_scale_min, size), scaled_side(train_scale_max, size)
    if train:
        scale_seed, crop_seed, colour_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 3)
        )
        side = tf.random.stateless_uniform(
            [], seed=scale_seed, minval=s_min, maxval=s_max + 1, dtype=tf.int32
        )
        image = random_crop_and_flip(resize_shorter_side(image, side), size, crop_seed)
        image = image + pca_colour_shift(colour_seed, pca_lighting_std)
    else:
        image = central_crop(resize_shorter_side(image, (s_min + s_max) // 2), size, size)
    return subtract_mean_rgb(image, mean_rgb)


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """One preprocessing op and the facts the rest of the package needs about it."""

    fn: Callable  # fn(image, seed, *, train, image_size, **{p: ... for p in params})
    input_channels: int | None  # the model input's channels; None keeps the dataset's
    params: tuple[str, ...] = ()  # the Preprocessing fields fn takes besides image_size
    # Training applies fn to whole batches: tf.vectorized_map turns the per-example op into
    # batched tensor ops (the same values, seeds included), which removes tf.data's
    # per-element overhead that dominates a tiny op. Not for ops that decode or give each
    # example its own intermediate shape (AlexNet, VGG): those stay a parallel map.
    batched: bool = False
    # Rescaled 0..255 pixels -> model input, for evaluation views other than the op's own
    # centre crop (ten_crop, dense); None: the op has none (LeNet-5's padding geometry).
    normalise: Callable | None = None
    # The shorter side, at a 224 crop, the op's squares are rescaled to: AlexNet's 256
    # (Sec. 2), which scale_to_unit's ten crops use too. With scale_jitter it is VGG's S,
    # drawn per image from [train_scale_min, train_scale_max] in training (Sec. 3.1), and
    # Q = (S_min + S_max) / 2 in evaluation (Sec. 4.1).
    side: int | None = None
    scale_jitter: bool = False
    # Views are patches of the image rescaled to a side (rescaled_patch), so a fixed-side copy
    # of an image folder (cnn_jax.data.cache) serves the op.
    cacheable: bool = False
    # The same views computed by decoding and rescaling the whole image first (same seeds);
    # tests and benchmarks/input_rate.py --compare check the op against it.
    reference: Callable | None = None


PREPROCESSORS: dict[str, PreprocessSpec] = {
    "lenet": PreprocessSpec(lenet, 1, params=("lenet_distortions",), batched=True),
    "scale_to_unit": PreprocessSpec(scale_to_unit, None, normalise=_unit_range, side=ALEXNET_SIDE),
    "alexnet": PreprocessSpec(
        alexnet,
        3,
        params=("pca_lighting_std",),
        normalise=subtract_mean_rgb,
        side=ALEXNET_SIDE,
        cacheable=True,
        reference=alexnet_resize_then_crop,
    ),
    "vgg": PreprocessSpec(
        vgg,
        3,
        params=("pca_lighting_std", "train_scale_min", "train_scale_max", "mean_rgb"),
        normalise=subtract_mean_rgb,
        scale_jitter=True,
        cacheable=True,
        reference=vgg_resize_then_crop,
    ),
}
# The dataset channel counts an op with a fixed count converts from (see with_channels).
CONVERTIBLE_CHANNELS = (1, 3)
MULTI_VIEW_PREPROCESSORS = tuple(name for name, s in PREPROCESSORS.items() if s.normalise)


def dense_key(q: int) -> str:
    """The eval batch key of the image at test scale Q (VGG's dense and multi-crop
    evaluation, cnn_jax.evaluate)."""
    return f"image_q{q}"


def size_key(view_key: str) -> str:
    """The eval batch key of the [height, width] of the image in the zero-padded WholeImage
    view under `view_key`."""
    return f"{view_key}_size"


# Whole-image views are zero-padded to sides that are multiples of this: VGG's five 2x2
# max-pools (Sec. 2.1) then halve every padded side exactly, so at each layer the image's own
# pixels are the top-left floor(size / 2**k) of the map, and the dense path can mask the rest
# (cnn_jax.evaluate.masked_score_mean).
WHOLE_IMAGE_MULTIPLE = 32


@dataclasses.dataclass(frozen=True)
class WholeImage:
    """An evaluation view (VGG Sec. 3.2): the whole image rescaled to shorter side `side`,
    aspect kept, uncropped, as model input. Such views differ in shape from image to image,
    so the eval pipeline groups images by shape (`shape_step` pixels of the longer side at
    the largest side of the batch) and zero-pads each to its group's size; the image's own
    [height, width] travels under size_key(key) (cnn_jax.data.pipeline.eval_dataset)."""

    side: int
    shape_step: int


def view_side(view, image_size: int) -> int:
    """The shorter side an eval view is rescaled to (at most): a square's side, a
    WholeImage's, image_size for the op's own centre view (None)."""
    if view is None:
        return image_size
    return view.side if isinstance(view, WholeImage) else view


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """An op with its parameters bound: the fields are the input group's knobs
    (cnn_jax/defaults.py); each op reads image_size and its spec's `params`."""

    name: str
    image_size: int
    lenet_distortions: bool = False
    pca_lighting_std: float = 0.1
    train_scale_min: int = 256
    train_scale_max: int = 512
    # vgg: the mean RGB subtracted; empty: the paper's (imported weights bring their own).
    mean_rgb: tuple[float, ...] = ()

    def __post_init__(self):
        if self.name not in PREPROCESSORS:
            raise UserError(
                f"--config.input.preprocess={self.name!r} is not one of: {', '.join(PREPROCESSORS)}"
            )
        if not self.image_size > 0:
            raise UserError(f"--config.input.image_size={self.image_size} must be > 0")
        std = self.pca_lighting_std
        if not math.isfinite(std):
            raise UserError(f"--config.input.pca_lighting_std={std} must be a finite number")
        if std < 0:
            raise UserError(f"--config.input.pca_lighting_std={std} must be >= 0")
        crop, low, high = PAPER_CROP, self.train_scale_min, self.train_scale_max
        if self.spec.scale_jitter and not crop <= low <= high:
            raise UserError(
                f"--config.input.train_scale_min={low} and --config.input.train_scale_max="
                f"{high} must satisfy {crop} <= min <= max (sides at a {crop} crop)"
            )
        self._check_mean_rgb()

    def _check_mean_rgb(self) -> None:
        mean = tuple(self.mean_rgb)
        if not mean:
            return
        flag = f"--config.input.mean_rgb={mean}"
        if "mean_rgb" not in self.spec.params:
            ops = ", ".join(n for n, s in PREPROCESSORS.items() if "mean_rgb" in s.params)
            raise UserError(f"{flag} applies to preprocess={ops}, not {self.name}")
        if len(mean) != 3 or not all(isinstance(v, int | float) and math.isfinite(v) for v in mean):
            raise UserError(f"{flag} must be three finite numbers (R, G, B on 0..255)")

    @property
    def spec(self) -> PreprocessSpec:
        return PREPROCESSORS[self.name]

    @property
    def op(self) -> Callable:
        """The op with its parameters bound: op(image, seed, *, train)."""
        params = {p: getattr(self, p) for p in self.spec.params}
        return functools.partial(self.spec.fn, image_size=self.image_size, **params)

    @_plain_graph_code
    def train(self, image, seed):
        """One training view of `image`, augmented as `seed` draws."""
        return self.op(image, seed, train=True)

    @_plain_graph_code
    def center(self, image):
        """The op's evaluation view (its centre crop), image_size square."""
        return self.op(image, tf.zeros([2], tf.int64), train=False)

    def _normalise(self) -> Callable:
        if self.spec.normalise is None:
            raise UserError(
                f"--config.input.preprocess={self.name} has no multi-view evaluation "
                f"(ten_crop, dense, multi_crop): use one of {', '.join(MULTI_VIEW_PREPROCESSORS)}"
            )
        if "mean_rgb" in self.spec.params:  # the op's own mean, for every view
            return functools.partial(self.spec.normalise, mean_rgb=self.mean_rgb)
        return self.spec.normalise

    @_plain_graph_code
    def square(self, image, side: int):
        """`image` rescaled to shorter side `side`, its central side x side square, as model
        input: what the ten crops (AlexNet Sec. 4.1) are taken from."""
        normalise = self._normalise()
        return normalise(rescaled_square(decoded(image, self.spec.input_channels), side))

    @_plain_graph_code
    def views(self, image, views: dict) -> dict:
        """One eval example's model inputs: batch key -> prep.square(image, side), or the
        centre view for a side of None (cnn_jax.data.pipeline.eval_dataset)."""
        out = {k: self.center(image) for k, side in views.items() if side is None}
        squares = {k: side for k, side in views.items() if side is not None}
        if squares:
            normalise = self._normalise()
            image = decoded(image, self.spec.input_channels)
            out.update({k: normalise(rescaled_square(image, s)) for k, s in squares.items()})
        return out

    @_plain_graph_code
    def whole_images(self, image, padded: dict) -> dict:
        """One eval example's WholeImage views: {shorter side: padded [height, width]} ->
        {side: (the whole image rescaled to that side as model input, with zeros below and
        right of it to the padded size, since zero is what a convolution's own padding reads;
        the image's [height, width] in it)}."""
        normalise = self._normalise()
        image = decoded(image, self.spec.input_channels)
        out = {}
        for side, padded_hw in padded.items():
            rescaled = normalise(resize_shorter_side(image, side))
            hw = tf.shape(rescaled)[:2]
            below, right = tf.unstack(padded_hw - hw)
            out[side] = (tf.pad(rescaled, [[0, below], [0, right], [0, 0]]), hw)
        return out

    def channels(self, dataset_channels: int) -> int:
        """The model input's channels when this op reads images with `dataset_channels`."""
        wanted = self.spec.input_channels
        return dataset_channels if wanted is None else wanted

    def scaled_side(self, side_at_224: int) -> int:
        """A side quoted at the papers' 224 crop, at this image_size."""
        return scaled_side(side_at_224, self.image_size)

    @property
    def ten_crop_side(self) -> int:
        """The square the ten crops come from: the op's own evaluation scale."""
        self._normalise()
        if self.spec.scale_jitter:
            return (
                self.scaled_side(self.train_scale_min) + self.scaled_side(self.train_scale_max)
            ) // 2
        return self.scaled_side(self.spec.side)

    @property
    def largest_train_side(self) -> int:
        """The largest shorter side a training view is cut from (rescaling ops only)."""
        if self.spec.scale_jitter:
            return self.scaled_side(self.train_scale_max)
        return self.scaled_side(self.spec.side)
