"""Per-paper preprocessing as tf ops: image -> float32 model input.

Every op in PREPROCESSORS has the signature `op(image, seed, *, train, config) -> image` and
uses only stateless random ops seeded by `seed` (an int64 [2] tensor derived from the run seed,
the epoch and the example), so it gives the same result eagerly and inside `tf.data.map`, and a
resumed run sees exactly the augmentation an uninterrupted one would. `image` is a decoded
uint8 [H, W, C] tensor or, for datasets read without decoding (image folders, ImageNet), the
encoded JPEG/PNG bytes; the op decodes those itself.

Sizes. The papers crop 224x224 out of images whose shorter side is 256 (AlexNet) or
S in [256, 512] (VGG). Every side here is given at that 224 scale and multiplied by
image_size / 224, so at image_size=224 the numbers are the papers' and a small experiment
(image_size=32) keeps their proportions. Images smaller than that side, such as CIFAR-10's
32x32 fed to a 224 AlexNet, are simply upsampled by the same resize.

Evaluation views beyond the centre crop (AlexNet's ten crops, VGG's dense multi-scale) need
the whole rescaled square, not one crop: `eval_views` makes those for cnn_jax.evaluate.
"""

import numpy as np
import tensorflow as tf

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


# The ops branch only on Python values (train, config, static shapes), so tf.data need not
# rewrite them with AutoGraph: skipping the conversion saves seconds per pipeline built.
_plain_graph_code = tf.autograph.experimental.do_not_convert


# --- Building blocks ------------------------------------------------------------------------


def decoded(image):
    """Encoded JPEG/PNG bytes -> uint8 [H, W, 3]; a decoded image passes through."""
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    return image


def scaled_side(side_at_224: int, config) -> int:
    """A side quoted at the papers' 224 crop, at this run's image_size."""
    return round(side_at_224 * config.image_size / PAPER_CROP)


def resize_shorter_side(image, side):
    """Isotropic rescale so the shorter side is `side` (a Python or tensor int); float32."""
    shape = tf.shape(image)
    hw = tf.cast(shape[:2], tf.float32)
    scale = tf.cast(side, tf.float32) / tf.reduce_min(hw)
    new_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), side)
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


def pca_colour_shift(seed, std: float):
    """The RGB offset sum_i alpha_i lambda_i p_i with alpha_i ~ N(0, std), 0..255 scale.

    AlexNet Sec. 4.1: one draw per image, added to every pixel. The eigen-pairs are for values
    in [0, 1], so the offset is multiplied by 255 for our 0..255 images.
    """
    alpha = tf.random.stateless_normal([3], seed=seed, stddev=std)
    return 255.0 * tf.linalg.matvec(IMAGENET_PCA_EIGENVECTORS, alpha * IMAGENET_PCA_EIGENVALUES)


def subtract_mean_rgb(image):
    return image - IMAGENET_MEAN_RGB


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
def lenet(image, seed, *, train, config):
    """28x28 digits padded to 32x32 so that stroke end-points can reach the centre of C3's
    receptive fields; intensities mapped to [-0.1, 1.175]; with config.lenet_distortions,
    training images get one random affine distortion each (paper Sec. III-C)."""
    image = tf.cast(decoded(image), tf.float32) / 255.0
    image = LENET_BACKGROUND + image * (LENET_INK - LENET_BACKGROUND)
    size = config.image_size
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
    if train and config.lenet_distortions:
        image = _lenet_affine(image, seed)
    return image


@_plain_graph_code
def scale_to_unit(image, seed, *, train, config):
    """[0, 255] -> [-1, 1], resized to image_size: synthetic data and quick experiments."""
    del seed, train
    image = tf.cast(decoded(image), tf.float32) / 127.5 - 1.0
    size = config.image_size
    if image.shape[0] != size or image.shape[1] != size:
        image = tf.image.resize(image, [size, size])
    return image


@_plain_graph_code
def alexnet(image, seed, *, train, config):
    """AlexNet (Sec. 2, 4.1): shorter side to 256, central 256x256; training takes a random
    224x224 patch, mirrors it half the time and shifts its colour along the ImageNet RGB
    principal components; evaluation takes the centre patch. Per-channel mean subtracted."""
    size = config.image_size
    image = rescaled_square(decoded(image), scaled_side(ALEXNET_SIDE, config))
    if train:
        crop_seed, colour_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        image = random_crop_and_flip(image, size, crop_seed)
        image = image + pca_colour_shift(colour_seed, config.pca_lighting_std)
    else:
        image = central_crop(image, size, size)
    return subtract_mean_rgb(image)


@_plain_graph_code
def vgg(image, seed, *, train, config):
    """VGG (Sec. 3.1): training rescales the shorter side to S, drawn per image from
    [train_scale_min, train_scale_max] (equal bounds: fixed S), then takes a random 224x224
    crop, mirrored half the time, with AlexNet's colour shift. Evaluation rescales to
    Q = (S_min + S_max) / 2 (Sec. 4.1) and takes the centre crop. Mean RGB subtracted."""
    size = config.image_size
    image = decoded(image)
    s_min, s_max = (
        scaled_side(config.train_scale_min, config),
        scaled_side(config.train_scale_max, config),
    )
    if train:
        scale_seed, crop_seed, colour_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 3)
        )
        side = tf.random.stateless_uniform(
            [], seed=scale_seed, minval=s_min, maxval=s_max + 1, dtype=tf.int32
        )
        image = random_crop_and_flip(resize_shorter_side(image, side), size, crop_seed)
        image = image + pca_colour_shift(colour_seed, config.pca_lighting_std)
    else:
        image = central_crop(resize_shorter_side(image, (s_min + s_max) // 2), size, size)
    return subtract_mean_rgb(image)


PREPROCESSORS = {"lenet": lenet, "scale_to_unit": scale_to_unit, "alexnet": alexnet, "vgg": vgg}


# --- Evaluation views (cnn_jax.evaluate) ----------------------------------------------------

# How each op turns rescaled 0..255 pixels into model inputs, for views other than its own
# centre crop. LeNet-5's padding geometry has no multi-view evaluation.
_NORMALISERS = {
    "alexnet": subtract_mean_rgb,
    "vgg": subtract_mean_rgb,
    "scale_to_unit": lambda image: image / 127.5 - 1.0,
}
MULTI_VIEW_PREPROCESSORS = tuple(_NORMALISERS)


def ten_crop_side(config) -> int:
    """The square the ten crops come from: the op's own evaluation scale."""
    if config.preprocess == "vgg":
        return (
            scaled_side(config.train_scale_min, config)
            + scaled_side(config.train_scale_max, config)
        ) // 2
    return scaled_side(ALEXNET_SIDE, config)


def dense_key(q: int) -> str:
    return f"image_q{q}"


def eval_view_sides(config) -> dict[str, int]:
    """The batch fields an eval example carries for config.eval_mode, with their square side:
    center: the op's own eval crop; ten_crop: the rescaled square the crops come from; dense:
    one square per scale Q in eval_scales (VGG Sec. 3.2, rescaled to shorter side Q; the central
    Q x Q square, since a batch needs one shape where the paper used the whole rectangle)."""
    if config.eval_mode == "ten_crop":
        return {"image": ten_crop_side(config)}
    if config.eval_mode == "dense":
        return {dense_key(q): scaled_side(q, config) for q in config.eval_scales}
    return {"image": config.image_size}


@_plain_graph_code
def eval_views(image, config) -> dict:
    """One eval example's model inputs for config.eval_mode (see eval_view_sides)."""
    if config.eval_mode == "center":
        op = PREPROCESSORS[config.preprocess]
        return {"image": op(image, tf.zeros([2], tf.int64), train=False, config=config)}
    normalise = _NORMALISERS[config.preprocess]
    image = decoded(image)
    return {
        key: normalise(rescaled_square(image, side))
        for key, side in eval_view_sides(config).items()
    }
