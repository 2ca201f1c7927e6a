"""Test set-up: 8 emulated CPU devices, set before JAX starts, and small shared helpers."""

import os

# Must precede any JAX import: XLA reads it once, when the CPU backend starts.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache for the runs the tests start (cnn_jax.cli), in the process
# or as subprocesses: never the user's own directory, and no serialising of every program
# the suite compiles. tests/test_compile_cache.py gives its runs a directory of their own.
os.environ["CNN_JAX_COMPILATION_CACHE"] = "off"

import pytest


@pytest.fixture(scope="session", autouse=True)
def _tensorflow_off_accelerators():
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """A TFDS data_dir shared by the session's tests (bundled_digits is prepared once)."""
    return str(tmp_path_factory.mktemp("tfds"))
