"""What every command-line entry point shares: flag parsing whose errors are one line,
TensorFlow kept off the accelerators, multi-process start-up, and UserError -> exit 2."""

import os
import sys
from collections.abc import Callable

from absl import flags, logging

from cnn_jax.errors import UserError

# TensorFlow's C++ start-up chatter (CPU feature notes, plugin registration) is noise here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

USAGE_EXIT = 2


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's parser, but a bad flag, unreadable config file or unknown config field is one
    line on stderr and exit 2 instead of a traceback."""
    try:
        return flag_values(argv)
    except UserError as e:  # raised by a config's get_config (e.g. configs/vgg.py:F)
        _fail(str(e))
    except flags.Error as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except Exception as e:  # a config file that does not load (syntax error, missing file)
        _fail(f"could not load the config: {type(e).__name__}: {e}".splitlines()[0])
    return []


def setup_runtime() -> None:
    """Before JAX touches a device: hide accelerators from TensorFlow (tf.data only), and join a
    multi-process job when launched as one."""
    # Orbax and TFDS log every save and read at INFO; our own output says what matters.
    logging.set_verbosity(logging.WARNING)
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU") if tf.config.list_physical_devices("TPU") else None

    import jax

    if _launched_as_multi_process():
        jax.distributed.initialize()


def _launched_as_multi_process() -> bool:
    # Cloud TPU VM slices, SLURM and Open MPI set these; jax.distributed picks the rest up.
    env = os.environ
    return bool(
        env.get("JAX_COORDINATOR_ADDRESS")
        or int(env.get("JAX_NUM_PROCESSES", "1")) > 1
        or (env.get("TPU_WORKER_HOSTNAMES", "localhost").count(",") > 0)
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )


def run(fn: Callable[[], object]) -> None:
    """Run an entry point's body; a UserError becomes one line and exit status 2."""
    try:
        setup_runtime()
        fn()
    except UserError as e:
        _fail(str(e))
