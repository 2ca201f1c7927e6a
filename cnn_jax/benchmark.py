"""Training throughput of a config's model, as one JSON object on stdout.

    python -m cnn_jax.benchmark --config=configs/lenet.py --config.input.batch_size=128 [--steps=N]
    python benchmarks/torch_reference.py --config=configs/lenet.py --config.input.batch_size=128

The step timed is the one `cnn_jax.main` trains with (`train.Trainer.train_step`), compiled
once ahead of time so that compilation, XLA's cost analysis and the timed steps all see the
same executable. It runs on a fixed synthetic batch already on the devices, so the number is
the model's speed alone; the input pipeline (`Trainer.train_batches`: tf.data, preprocessing,
transfer to the devices) is timed separately, alone, as `input_images_per_sec` and, per core,
`input_images_per_cpu_sec`. `compile_s` is that step's compile with nothing cached, as a first
run pays it; `compile_s_warm` the same step loaded from JAX's persistent compilation cache, as
a rerun or a resume pays it (`compile_cold_and_warm`).

benchmarks/torch_reference.py (in the repository, not the package) runs the same benchmark
with the PyTorch reference of the same layers beside it. The two are timed in alternating
rounds, so that load from other processes on a shared machine falls on both alike, and each
reports the median of its per-step times.
"""

import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from absl import flags

from cnn_jax import cli
from cnn_jax.errors import UserError

# Dense peak TFLOP/s per chip, (bfloat16, float32). XLA's default precision runs float32
# matmuls and convolutions on GPU tensor cores as TF32, so TF32 is float32's peak there.
PEAK_TFLOPS = {
    "H100": (989.0, 494.7),  # SXM; NVIDIA H100 datasheet
    "H200": (989.0, 494.7),
    "A100": (312.0, 156.0),
    "TPU v4": (275.0, 275.0),
    "TPU v5 lite": (197.0, 197.0),
    "TPU v5p": (459.0, 459.0),
    "TPU v6 lite": (918.0, 918.0),
}


def peak_flops_per_sec(device_kind: str, half_precision: bool, override_tflops: float = 0.0):
    """Per-chip peak FLOP/s for the compute dtype, or None where unknown (CPUs)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for name, (bf16, f32) in PEAK_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return (bf16 if half_precision else f32) * 1e12
    return None


def synthetic_batch(trainer, seed: int = 0) -> dict:
    """A random global batch in the layout the train step takes, already on the devices."""
    import jax
    import numpy as np

    from cnn_jax import parallel

    rng = np.random.default_rng(seed)
    batch_size, classes = trainer.batch_size, trainer.experiment.source.classes
    local = {
        "image": rng.standard_normal((batch_size, *trainer.input_shape[1:]), dtype=np.float32),
        "label": rng.integers(0, classes, batch_size, dtype=np.int32),
    }
    sharding = parallel.batch_sharding(trainer.mesh)
    return jax.tree.map(lambda x: jax.device_put(x, sharding), local)


def step_flops(compiled) -> float:
    """FLOPs of one execution of a compiled SPMD program on one device (XLA's count)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per program
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def input_rates(trainer, batches: int) -> tuple[float, float]:
    """(images/s, images per CPU-second) the input pipeline alone delivers to the devices, in
    steady state: a cached dataset is read through one whole epoch first, as training would.
    CPU-seconds are this process's user + system time over all its threads, so the second
    number is one core's rate, which other processes' load on a shared machine barely moves
    (docs/input_pipeline.md)."""
    import resource

    import jax

    def cpu_seconds():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    warmup = min(trainer.steps_per_epoch, 500) if trainer.experiment.cache else 3
    stream = trainer.train_batches(0)
    for _ in range(warmup):
        next(stream)
    start, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        batch = next(stream)
    jax.block_until_ready(batch)
    images = batches * trainer.batch_size
    return images / (time.perf_counter() - start), images / (cpu_seconds() - cpu)


def _median_spread(seconds: list[float]) -> tuple[float, float, float]:
    """(median, 10th, 90th percentile) of step times, in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    pick = lambda q: ms[min(len(ms) - 1, round(q * (len(ms) - 1)))]
    return statistics.median(ms), pick(0.1), pick(0.9)


def run(
    config,
    *,
    steps=20,
    warmup=3,
    input_steps=50,
    rounds=5,
    peak_tflops=0.0,
    reference: Callable | None = None,
) -> dict:
    """Benchmark config's training step; returns the fields `main` prints as JSON.

    `reference(trainer)`, where given, makes another framework's trainer of the same model
    (an object with `step() -> seconds` and `threads()`; benchmarks/torch_reference.py); the
    two are then timed in alternating rounds."""
    from cnn_jax import experiment, train

    if input_steps <= 0:  # the model's speed alone: no need to have, or prepare, the data
        config = experiment.with_synthetic_data(config)
    trainer = train.build_trainer(config)
    other = reference(trainer) if reference else None  # before compiling: it may refuse
    state, batch = trainer.init_state(), synthetic_batch(trainer)
    compiled, compile_s, compile_s_warm = compile_cold_and_warm(trainer.train_step, state, batch)
    load_before = _load_average()
    jax_times, other_times = _alternate(compiled, state, batch, other, steps, warmup, rounds)
    compile_times = (compile_s, compile_s_warm)
    result = _result(trainer, jax_times, compile_times, step_flops(compiled), peak_tflops)
    result["load_average"] = [load_before, _load_average()]
    if other:
        result |= _reference_fields(trainer.batch_size, result, jax_times, other_times)
        result["torch_threads"] = other.threads()
    if input_steps > 0:
        wall, per_cpu = input_rates(trainer, input_steps)
        result["input_images_per_sec"], result["input_images_per_cpu_sec"] = wall, per_cpu
    return result


def _reference_fields(batch_size: int, result: dict, jax_times, other_times) -> dict:
    """The reference's fields, and the ratios: each cnn_jax images/s over the reference's.
    `ratio` compares the medians of all steps; `ratio_per_round` each round's pair of
    medians, which ran back to back and so under much the same load; `cpu_ratio` the
    medians of process CPU time per step."""
    other_ms, t10, t90 = _median_spread(other_times.wall)
    other_cpu_ms = statistics.median(other_times.cpu) * 1e3
    pairs = zip(other_times.round_medians(), jax_times.round_medians(), strict=True)
    per_round = [theirs / ours for theirs, ours in pairs]
    return {
        "torch_images_per_sec": batch_size / (other_ms / 1e3),
        "torch_step_ms": other_ms,
        "torch_step_ms_p10_p90": [t10, t90],
        "torch_step_cpu_ms": other_cpu_ms,
        "ratio": other_ms / result["step_ms"],
        "ratio_per_round": per_round,
        "ratio_median_of_rounds": statistics.median(per_round),
        "cpu_ratio": other_cpu_ms / result["step_cpu_ms"],
    }


def _load_average() -> float | None:
    """The 1-minute load average (other processes sharing the cores), where the OS has one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


CACHE_HITS = "/jax/compilation_cache/cache_hits"  # jax.monitoring's event for a cache hit


def compile_cold_and_warm(step, state, batch):
    """(compiled, cold seconds, warm seconds): `step` traced, lowered and compiled as a first
    run does, with nothing cached, then again as a rerun does, loading the executable from
    JAX's persistent compilation cache (in-memory caches cleared first, as in a new process).

    Both use an empty temporary cache of their own, so the two numbers do not depend on what
    the user's cache holds (or whether it is on); the user's settings are restored after.
    The warm time is None where the second compile found nothing in the cache (a backend
    that cannot serialise executables; a process other than 0, which JAX never lets write).
    The executable returned is the freshly compiled one."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    hits = []
    count_hits = lambda name, **_: hits.append(name) if name == CACHE_HITS else None
    names = (
        "jax_enable_compilation_cache",
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    jax.monitoring.register_event_listener(count_hits)
    with tempfile.TemporaryDirectory(prefix="cnn_jax_compile_") as path:
        try:
            for name, value in zip(names, (True, path, 0.0), strict=True):
                jax.config.update(name, value)
            compilation_cache.reset_cache()  # JAX opens the cache once; make it reopen
            start = time.perf_counter()
            compiled = step.lower(state, batch).compile()
            cold = time.perf_counter() - start
            jax.clear_caches()
            hits.clear()
            start = time.perf_counter()
            step.lower(state, batch).compile()
            warm = time.perf_counter() - start
        finally:
            jax.monitoring.unregister_event_listener(count_hits)
            for name, value in saved.items():
                jax.config.update(name, value)
            compilation_cache.reset_cache()
    return compiled, cold, warm if hits else None


@dataclasses.dataclass
class Timings:
    """Per-step seconds of one framework: wall time, this process's CPU time (user + system,
    all threads: the work a step costs, which other processes' load barely moves), and the
    round each step ran in."""

    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)
    round: list[int] = dataclasses.field(default_factory=list)

    def add(self, step: Callable[[], object], round_index: int) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        step()
        self.wall.append(time.perf_counter() - start)
        self.cpu.append(time.process_time() - cpu)
        self.round.append(round_index)

    def round_medians(self) -> list[float]:
        """Median wall seconds of each round, in order."""
        rounds = sorted(set(self.round))
        return [statistics.median(self._in_round(r)) for r in rounds]

    def _in_round(self, r: int) -> list[float]:
        return [t for t, k in zip(self.wall, self.round, strict=True) if k == r]


def _alternate(compiled, state, batch, other, steps: int, warmup: int, rounds: int):
    """Timings of the compiled step and of `other` (if any), after `warmup` untimed steps
    each, in `rounds` alternating rounds (load on a shared machine then falls on both
    alike)."""
    import jax

    def jax_step():
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)

    for _ in range(warmup):
        jax_step()
        if other:
            other.step()
    rounds = max(1, rounds if other else 1)
    per_round = max(1, math.ceil(steps / rounds))
    jax_times, other_times = Timings(), Timings()
    for r in range(rounds):
        for _ in range(per_round):
            jax_times.add(jax_step, r)
        for _ in range(per_round if other else 0):
            other_times.add(other.step, r)
    return jax_times, other_times


def _result(trainer, times: Timings, compile_s: tuple, flops: float, peak_tflops: float):
    """The JSON fields; `compile_s`: (cold, warm) seconds, from compile_cold_and_warm."""
    import jax
    import jax.numpy as jnp

    from cnn_jax.models import ops

    x, devices = trainer.experiment, trainer.mesh.devices.size
    # The compiled program is per device; the mesh's devices together run one global batch.
    flops_per_image = flops * devices / x.batch_size
    step_ms, p10, p90 = _median_spread(times.wall)
    images_per_sec = x.batch_size / (step_ms / 1e3)
    device = jax.devices()[0]
    half_precision = x.model.dtype == jnp.bfloat16
    peak = peak_flops_per_sec(device.device_kind, half_precision, peak_tflops)
    achieved = flops_per_image * images_per_sec
    return {
        "model": x.model_name,
        "batch_size": x.batch_size,
        "image_size": x.prep.image_size,
        "half_precision": half_precision,
        "images_per_sec": images_per_sec,
        "step_ms": step_ms,
        "step_ms_p10_p90": [p10, p90],
        "step_cpu_ms": statistics.median(times.cpu) * 1e3,
        "timed_steps": len(times.wall),
        "compile_s": compile_s[0],  # nothing cached: a first run
        "compile_s_warm": compile_s[1],  # from the persistent compilation cache: a rerun
        "flops_per_image": flops_per_image,
        "achieved_flops_per_sec": achieved,
        "peak_flops_per_sec": peak,
        "mfu": achieved / (peak * devices) if peak else None,
        "device_kind": device.device_kind,
        "device_count": devices,
        "backend": jax.default_backend(),
        # The CPU features the kernels and the precision were chosen by (ops.cpu_features).
        "cpu_flags": sorted(ops.cpu_features() & ops.REPORTED_CPU_FLAGS),
        "dataset": x.source.name,
        "input_images_per_sec": None,
        "input_images_per_cpu_sec": None,
    }


def main(argv: list[str] | None = None, reference: Callable | None = None, doc: str = "") -> None:
    """Command line; takes argv (program name first) so tests can call it in-process. Its
    flags live in their own FlagValues, so it never clashes with cnn_jax.main's. `reference`
    and `doc`: another framework's trainer and the usage text of the script that adds it
    (benchmarks/torch_reference.py)."""
    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()
    cli.define_config_flag(fv, argv)
    # Bounds: a count out of range is one error line, not a silently different benchmark.
    flags.DEFINE_integer(
        "steps", 20, "Timed training steps per framework.", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_integer(
        "warmup", 3, "Untimed steps after compiling, per framework.", lower_bound=0, flag_values=fv
    )
    flags.DEFINE_integer(
        "input_steps",
        50,
        "Timed input-pipeline batches; 0 skips them.",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "rounds",
        5,
        "With a reference: alternate the two this many times.",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_float(
        "peak_tflops", 0.0, "The device's peak TFLOP/s for MFU; 0: look it up.", flag_values=fv
    )
    flags.register_validator(
        "peak_tflops",
        lambda v: math.isfinite(v) and v >= 0,
        "must be a finite number >= 0",
        flag_values=fv,
    )
    if not cli.parse_tool_flags(argv, fv, doc or __doc__):
        return

    def body():
        if fv.config is None:
            raise UserError("--config=configs/X.py[:arg] is required")
        # stdout carries the one JSON object; what a run says on the way (the mesh chosen,
        # a dataset being prepared) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            result = run(
                fv.config,
                steps=fv.steps,
                warmup=fv.warmup,
                input_steps=fv.input_steps,
                rounds=fv.rounds,
                peak_tflops=fv.peak_tflops,
                reference=reference,
            )
        print(json.dumps(result))

    cli.run(body, fv.config)


if __name__ == "__main__":
    main()
