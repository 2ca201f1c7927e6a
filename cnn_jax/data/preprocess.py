"""Per-paper preprocessing as tf ops: uint8 image -> float32 model input.

Every op has the signature `op(image, seed, *, train, config) -> image` and uses only
stateless random ops seeded by `seed` (an int64 [2] tensor derived from the run seed, the
epoch and the example), so it gives the same result eagerly and inside `tf.data.map`, and a
resumed run sees exactly the augmentation an uninterrupted one would.
"""

import tensorflow as tf

# LeNet-5 (paper Sec. II-B): "the values of the input pixels are normalized so that the
# background level (white) corresponds to a value of -0.1 and the foreground (black)
# corresponds to 1.175. This makes the mean input roughly 0, and the variance roughly 1."
LENET_BACKGROUND = -0.1
LENET_INK = 1.175


def lenet(image, seed, *, train, config):
    """28x28 digits padded to 32x32 so that stroke end-points can reach the centre of C3's
    receptive fields; intensities mapped to [-0.1, 1.175]."""
    del seed, train
    image = tf.cast(image, tf.float32) / 255.0
    image = LENET_BACKGROUND + image * (LENET_INK - LENET_BACKGROUND)
    size = config.image_size
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    if image.shape[0] is not None and image.shape[0] > size:
        image = tf.image.resize(image, [size, size], antialias=True)
        h, w = size, size
    pad_h, pad_w = size - h, size - w
    # Pad with the background value, not zero, so the border looks like paper.
    return (
        tf.pad(
            image - LENET_BACKGROUND,
            [[pad_h // 2, pad_h - pad_h // 2], [pad_w // 2, pad_w - pad_w // 2], [0, 0]],
        )
        + LENET_BACKGROUND
    )


def scale_to_unit(image, seed, *, train, config):
    """[0, 255] -> [-1, 1], resized to image_size: synthetic data and quick experiments."""
    del seed, train
    image = tf.cast(image, tf.float32) / 127.5 - 1.0
    size = config.image_size
    if image.shape[0] != size or image.shape[1] != size:
        image = tf.image.resize(image, [size, size])
    return image


PREPROCESSORS = {"lenet": lenet, "scale_to_unit": scale_to_unit}
