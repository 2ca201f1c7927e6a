"""cnn_jax: LeNet-5, AlexNet and VGG in JAX/Flax, faithful to their papers."""

import os as _os

# Set before anything imports TensorFlow, which only runs the input pipeline here (tf.data).
# - Its oneDNN custom ops are on by default on some CPUs (AVX-512, AMX) and off on others;
#   where on, TensorFlow prints two start-up lines on stderr (before absl's logging exists,
#   so TF_CPP_MIN_LOG_LEVEL does not silence them) and, by its own notice, gives slightly
#   different float results. Off, the preprocessing computes the same numbers on every CPU
#   and every command prints only what cnn_jax writes. This overrides a user's setting on
#   purpose: nothing in tf.data gains from those ops.
# - TF_CPP_MIN_LOG_LEVEL=2 drops TensorFlow's C++ INFO and WARNING start-up notes (CPU
#   features, plugin registration); a user who wants them can set it lower.
_os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
