"""What every command-line entry point shares: flag parsing whose errors are one line,
TensorFlow kept off the accelerators, multi-process start-up, and UserError -> exit 2."""

import functools
import os
import signal
import sys
import tempfile
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
        if flag.startswith("--config."):  # a flat name, or a nested one (eval.dense_scales)
            old = flag.removeprefix("--config.")
            if old in RENAMED:
                why = "renamed" if "." in old else "the config's fields are grouped"
                _fail(f"{flag} is now --config.{RENAMED[old]} ({why}; see cnn_jax/defaults.py)")


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
    """Before JAX touches a device: hide accelerators from TensorFlow (tf.data only), turn
    JAX's persistent compilation cache on (`config.run.compilation_cache_dir`), split the CPU
    cores into devices (`config.mesh.cpu_devices`), and join a multi-process job when launched
    as one."""
    # Orbax and TFDS log routine events at INFO and WARNING (every save and read, a
    # read-only manager, a dataset folder being prepared); cnn_jax says what matters itself.
    logging.set_verbosity(logging.ERROR)
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")

    import jax

    enable_compilation_cache(config.run.compilation_cache_dir if config is not None else "")
    if _launched_as_multi_process():
        jax.distributed.initialize(**_process_args())
    elif config is not None:
        split_cpu_cores(config.mesh.cpu_devices, config.input.batch_size, config.mesh.model)
    if config is not None:
        tune_xla_cpu(config.model.name)


# The persistent compilation cache: a rerun, a resume or another run of the same programs
# loads its executables instead of compiling them again (docs/performance.md).
COMPILATION_CACHE_ENV = "CNN_JAX_COMPILATION_CACHE"
COMPILATION_CACHE_OFF = "off"  # the field's or the variable's value that turns it off
_COMPILATION_CACHE_FIELD = "--config.run.compilation_cache_dir"


def compilation_cache_dir(configured: str = "") -> str | None:
    """Where the run's compiled programs are kept, or None for no cache.

    The first of: the config field (`configured`), $CNN_JAX_COMPILATION_CACHE, JAX's own
    setting (JAX_COMPILATION_CACHE_DIR), and the user's cache directory,
    $XDG_CACHE_HOME/cnn_jax/jax or ~/.cache/cnn_jax/jax. `off` in the field or the variable
    turns the cache off. A given value that cannot be a local directory is a UserError; a
    directory that cannot be made or written to is one warning line on stderr, and the run
    goes on without the cache.
    """
    import jax

    given = [
        (name, value.strip())
        for name, value in (
            (_COMPILATION_CACHE_FIELD, configured),
            (COMPILATION_CACHE_ENV, os.environ.get(COMPILATION_CACHE_ENV, "")),
            ("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir or ""),
        )
        if value.strip()
    ]
    source = given[0][0] if given else ""
    if given:
        value = given[0][1]
        if value.lower() == COMPILATION_CACHE_OFF and source != "JAX_COMPILATION_CACHE_DIR":
            return None
        if "\0" in value or "://" in value:
            raise UserError(
                f"{source}={value!r}: give a local directory, or {COMPILATION_CACHE_OFF}"
            )
        path = os.path.abspath(os.path.expanduser(value))
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"{source}={value} is not a directory")
    else:
        path = _user_cache_dir()
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)  # only its user may write: it runs code
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        print(
            f"warning: compiling without a cache: cannot write to {path} ({e.strerror or e}); "
            f"set {source or COMPILATION_CACHE_ENV} to another directory, or to "
            f"{COMPILATION_CACHE_OFF}",
            file=sys.stderr,
        )
        return None
    return path


def _user_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset, or relative: the XDG spec says to ignore it
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cnn_jax", "jax")


def enable_compilation_cache(configured: str = "") -> str | None:
    """Point JAX's persistent compilation cache at `compilation_cache_dir(configured)`
    (before anything compiles: JAX reads the setting once), or turn it off; returns the
    directory. Every program is kept, however fast it compiled (JAX keeps only those that
    took over a second, unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise):
    loading even a small one is quicker than compiling it."""
    import jax

    path = compilation_cache_dir(configured)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


# What XLA:CPU logs when it refuses a cached program compiled on this very machine: on some
# Intel CPUs it counts LLVM's tuning preferences (+prefer-no-gather) as features the host
# lacks (jax-ml/jax#38445, openxla/xla#44565), so every reload fails with one error line.
_REFUSED_RELOAD = "Machine type used for XLA:CPU compilation doesn't match"


def keep_cache_only_if_it_reloads() -> None:
    """Before a run's first compilation (after its config's checks, which compile nothing):
    the compilation cache off where XLA:CPU refuses its own cached programs."""
    import jax

    on = jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
    if on and not cpu_programs_reload():
        jax.config.update("jax_enable_compilation_cache", False)


def cpu_programs_reload() -> bool:
    """Whether XLA:CPU reloads a program it compiled into the cache (True on other backends).
    A tiny program is compiled, then compiled again as a new function, which JAX fetches
    from the cache, with stderr (the C++ log) captured meanwhile: where the reload is refused
    the cache would only add an error line to every compilation, so the run goes without it
    (silently: docs/performance.md says so)."""
    import tempfile

    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        return True

    def probe():  # a new function each time: not in memory, so looked up in the cache
        return jax.jit(lambda x: x * 3.0 + 0.5)

    probe()(jnp.zeros(3)).block_until_ready()  # compiled and written to the cache (or read)
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            probe()(jnp.zeros(3)).block_until_ready()  # from the cache
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        log = captured.read().decode(errors="replace")
    refused = _REFUSED_RELOAD in log
    others = [line for line in log.splitlines() if line and not refused]
    if others:  # not ours to hide
        print("\n".join(others), file=sys.stderr)
    return not refused


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


# XLA:CPU options per model, each measured against XLA's defaults in process CPU time per
# training step (docs/performance.md, "CPU with AVX-512"). LeNet-5's paper net is ~140 small
# operations, most of them element-wise (squashing, trainable subsampling, the RBF's
# distances): letting YNNPACK run those as well ("+eltwise", beside the convolutions, dots and
# reductions it takes by default) cuts its step's CPU time by 10-15%. The same option costs
# AlexNet 6%, and VGG and the modern LeNet-5 nothing measurable, so they keep the defaults.
# Experimental options come and go between releases, and XLA refuses an unknown flag, so they
# are set only with the jaxlib they were measured on.
XLA_CPU_OPTIONS = {"lenet5": {"xla_cpu_experimental_ynn_fusion_type": "+eltwise"}}
XLA_CPU_OPTIONS_JAXLIB = "0.10."


def tune_xla_cpu(model_name: str) -> None:
    """Add the model's XLA:CPU options (XLA_CPU_OPTIONS) to XLA_FLAGS before the backend
    starts, with the jaxlib they were measured on. One the user's XLA_FLAGS already sets is
    left as the user set it; GPU and TPU backends ignore these CPU options. A process whose
    backend is already up (a notebook's or a test's second run) is left alone: the options
    would not reach its backend, only the processes it starts, which would then round
    differently from it."""
    import jaxlib

    if not jaxlib.__version__.startswith(XLA_CPU_OPTIONS_JAXLIB):
        return
    # JAX's own test of a started backend, private: imported only with the jax it was read in.
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return
    flags_set = os.environ.get("XLA_FLAGS", "")
    extra = [
        f"--{name}={value}"
        for name, value in XLA_CPU_OPTIONS.get(model_name, {}).items()
        if f"--{name}=" not in flags_set
    ]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags_set, *extra]).strip()


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
