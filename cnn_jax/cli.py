"""What every command-line entry point shares: flag parsing whose errors are one line,
TensorFlow kept off the accelerators, multi-process start-up, and UserError -> exit 2."""

import functools
import os
import signal
import sys
import threading
from collections.abc import Callable

from absl import flags, logging
from ml_collections import config_flags

from cnn_jax import errors
from cnn_jax.errors import UserError

USAGE_EXIT = 2


def _fail(message: str, status: int = USAGE_EXIT) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's parser, but a bad flag, unreadable config file or unknown config field is one
    line on stderr and exit 2 instead of a traceback. A field's name from before the config
    had groups (`--config.learning_rate`) is one line naming its new place."""
    _check_renamed_fields(argv)
    try:
        rest = flag_values(argv)
    except UserError as e:  # raised by a config's get_config (e.g. configs/vgg.py:F)
        _fail(str(e))
    except flags.Error as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except (AttributeError, KeyError) as e:  # --config.FIELD=... naming no field, or a bug
        override = _override_named(argv, str(e))  # in a config file's get_config
        if override:
            _fail(f"{override}: no such config field (see cnn_jax/defaults.py, docs/config.md)")
        _fail(f"could not load the config: {_load_failure(e)}")
    except Exception as e:  # a config file that does not load (syntax error, missing file)
        _fail(f"could not load the config: {_load_failure(e)}")
    _check_config_files_loaded(flag_values)
    return rest


def _check_renamed_fields(argv: list[str]) -> None:
    from cnn_jax.defaults import RENAMED

    for arg in argv[1:]:
        flag = arg.split("=")[0]
        if flag.startswith("--config.") and flag.count(".") == 1:
            old = flag.removeprefix("--config.")
            if old in RENAMED:
                _fail(
                    f"{flag} is now --config.{RENAMED[old]} (the config's fields are grouped; "
                    "see cnn_jax/defaults.py)"
                )


def define_config_flag(flag_values: flags.FlagValues, argv: list[str]) -> None:
    """--config for a tool with its own FlagValues (benchmark, summary, data.cache)."""
    config_flags.DEFINE_config_file(
        "config",
        None,
        "A configs/*.py file[:arg]; every field overridable.",
        flag_values=flag_values,
        sys_argv=argv,  # where config_flags finds --config.FIELD
    )


def parse_tool_flags(argv: list[str], flag_values: flags.FlagValues, doc: str) -> bool:
    """The tools with their own FlagValues (benchmark, summary): `--help` prints the usage
    paragraph of the tool's docstring and its flags and returns False (nothing to run);
    otherwise the flags are parsed as `parse_flags` does, a positional argument is one error
    line, and it returns True."""
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(doc.split("\n\n")[1], flag_values.get_help(), sep="\n\n")
        return False
    rest = parse_flags(argv, flag_values)
    if len(rest) > 1:
        _fail(f"unexpected arguments: {' '.join(rest[1:])}")
    return True


def _override_named(argv: list[str], error: str) -> str | None:
    """The --config.FIELD argument that a KeyError/AttributeError names, if there is one."""
    field = error.strip("\"' ")
    found = [a.split("=")[0] for a in argv if a.split("=")[0].endswith(f".{field}")]
    return found[0] if found else None


def _check_config_files_loaded(flag_values: flags.FlagValues) -> None:
    """ml_collections defers a missing config file's error to the first use of the config,
    which would be a traceback deep in the run; report it now instead."""
    for name in list(flag_values):
        value = flag_values[name].value
        if type(value).__name__ == "_ErrorConfig":  # config_flags' stand-in for a failed load
            try:
                value.lock()
            except OSError as e:
                _fail(f"could not load the config: {_load_failure(e)}")


def _load_failure(error: Exception) -> str:
    """One line for a config file that does not load. A missing file's own error (its last
    line names the path) is the cause of the 'earlier failure to load' ml_collections raises."""
    if isinstance(error.__cause__, OSError):
        return str(error.__cause__).strip().splitlines()[-1].strip()
    return f"{type(error).__name__}: {error}".splitlines()[0]


def setup_runtime(config=None) -> None:
    """Before JAX touches a device: hide accelerators from TensorFlow (tf.data only), split
    the CPU cores into devices (`config.mesh.cpu_devices`), and join a multi-process job when
    launched as one."""
    # Orbax and TFDS log routine events at INFO and WARNING (every save and read, a
    # read-only manager, a dataset folder being prepared); cnn_jax says what matters itself.
    logging.set_verbosity(logging.ERROR)
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")

    import jax

    if _launched_as_multi_process():
        jax.distributed.initialize(**_process_args())
    elif config is not None:
        split_cpu_cores(config.mesh.cpu_devices, config.input.batch_size, config.mesh.model)


def split_cpu_cores(cpu_devices: int, batch_size: int, model_axis: int) -> None:
    """`cpu_devices` XLA CPU devices (0: one per core, as many as divide the batch).

    The mesh's data axis then runs a share of the batch on each. XLA:CPU's threading inside
    one device gains little on small layers (LeNet-5), while big ones use it well and need no
    gradient all-reduce (AlexNet; measured in docs/performance.md). Only the
    CPU backend reads this: GPU and TPU runs are unchanged, and an explicit
    XLA_FLAGS=--xla_force_host_platform_device_count wins.
    """
    import jax

    from cnn_jax import validation

    validation.check_cpu_devices(cpu_devices)
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    count = cpu_devices or _cores_dividing(batch_size, model_axis)
    if count > 1:
        jax.config.update("jax_num_cpu_devices", count)


def _cores_dividing(batch_size: int, model_axis: int) -> int:
    """The most cores (at least 1) that split the batch evenly and hold whole model-axis
    groups (AlexNet's towers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model_axis = max(1, model_axis)
    fits = [
        n
        for n in range(model_axis, (cores or 1) + 1, model_axis)
        if batch_size % (n // model_axis) == 0
    ]
    return max(fits, default=1)


def _process_args() -> dict:
    """The job's size and this process's rank where the launcher states them
    (launch/processes.sh, a multi-node GPU job started by hand). JAX reads
    JAX_COORDINATOR_ADDRESS itself and detects Cloud TPU, SLURM and Open MPI jobs."""
    env, args = os.environ, {}
    if "JAX_NUM_PROCESSES" in env:
        args["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    elif _slurm_step_tasks() > 1 and env["SLURM_NTASKS"] != str(_slurm_step_tasks()):
        # srun --preserve-env keeps the allocation's SLURM_NTASKS, which JAX would wait for.
        args["num_processes"] = _slurm_step_tasks()
    if "JAX_PROCESS_ID" in env:
        args["process_id"] = int(env["JAX_PROCESS_ID"])
    return args


def _launched_as_multi_process() -> bool:
    # Cloud TPU VM slices, srun steps and Open MPI set these; jax.distributed picks the rest
    # up. CNN_JAX_MULTIPROCESS=1 asks for it where nothing in the environment says so (a Cloud
    # TPU VM's ssh shell: JAX reads the slice from the VM's metadata; launch/tpu_vm.sh).
    env = os.environ
    return bool(
        env.get("CNN_JAX_MULTIPROCESS") == "1"
        or env.get("JAX_COORDINATOR_ADDRESS")
        or int(env.get("JAX_NUM_PROCESSES", "1")) > 1
        or (env.get("TPU_WORKER_HOSTNAMES", "localhost").count(",") > 0)
        or _slurm_step_tasks() > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )


# What JAX's SLURM detection reads (jax/_src/clusters/slurm_cluster.py); srun sets all five
# for every task of a step.
_SLURM_TASK_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)


def _slurm_step_tasks() -> int:
    """How many tasks the srun step this process belongs to has; 1 outside a step.

    An salloc shell or a batch script itself has SLURM_NTASKS (the allocation's) but is one
    process, and JAX finds no coordinator there (no SLURM_STEP_NODELIST): it runs alone
    (docs/multihost.md). Under srun, SLURM_NTASKS is the step's count unless --preserve-env
    kept the allocation's (salloc's interactive step does), so the step's own count decides.
    """
    env = os.environ
    if not all(name in env for name in _SLURM_TASK_VARIABLES):
        return 1
    return int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]))


# What Ctrl-C while JAX and TensorFlow load says for cnn_jax.main (from the workdir's lock on,
# cnn_jax.train says it): `interrupted=BEFORE_THE_RUN` picks the line for the config's mode.
BEFORE_THE_RUN = {
    False: "interrupted before training started; nothing was saved",
    True: "interrupted; the evaluation wrote nothing",  # eval.only
}


def run(fn: Callable[[], object], config=None, interrupted: str | dict = "interrupted") -> None:
    """Run an entry point's body. A UserError becomes one line and its exit status (2 for bad
    input, 1 for a run that cannot go on); so does a full disk, wherever a write hit it.
    Ctrl-C is one line and exit status 130: `interrupted`, at once (errors.exit_interrupted),
    unless the training loop took SIGINT over to save first (errors.Interrupted says what).
    `config`, where the entry point has one, sets the runtime up for it (CPU devices)."""
    if isinstance(interrupted, dict):
        interrupted = interrupted[bool(config.eval.only)]
    previous = None
    usable = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # a background job's is
    if usable and threading.current_thread() is threading.main_thread():
        previous = signal.signal(
            signal.SIGINT, functools.partial(errors.exit_interrupted, interrupted)
        )
    try:
        setup_runtime(config)
        fn()
    except UserError as e:
        _fail(_first_line(e), e.exit_status)
    except errors.Interrupted as e:
        print(_first_line(e), file=sys.stderr)
        sys.exit(e.exit_status)
    except Exception as e:
        if not errors.is_disk_full(e):
            raise
        _fail(f"disk full: {_first_line(e)}", errors.RunFailure.exit_status)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
