"""Training throughput of a config's model, as one JSON object on stdout.

    python -m cnn_jax.benchmark --config=configs/lenet.py --config.batch_size=128 [--steps=N]
    python -m cnn_jax.benchmark --config=configs/lenet.py --config.batch_size=128 --torch

The step timed is the one `cnn_jax.main` trains with (`train.Trainer.train_step`), compiled
once ahead of time so that compilation, XLA's cost analysis and the timed steps all see the
same executable. It runs on a fixed synthetic batch already on the devices, so the number is
the model's speed alone; the input pipeline (`Trainer.train_batches`: tf.data, preprocessing,
transfer to the devices) is timed separately, alone, as `input_images_per_sec` and, per core,
`input_images_per_cpu_sec`.

With --torch the PyTorch reference of the same layers (cnn_jax.benchmark_torch) runs on the
same machine. The two are timed in alternating rounds, so that load from other processes on a
shared machine falls on both alike, and each reports the median of its per-step times.
"""

import contextlib
import json
import math
import statistics
import sys
import time

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

    config = trainer.config
    rng = np.random.default_rng(seed)
    shape = (config.batch_size, *trainer.input_shape[1:])
    local = {
        "image": rng.standard_normal(shape, dtype=np.float32),
        "label": rng.integers(0, config.num_classes, config.batch_size, dtype=np.int32),
    }
    sharding = parallel.batch_sharding(trainer.mesh)
    return jax.tree.map(lambda x: jax.device_put(x, sharding), local)


def without_dataset(config):
    """A copy of config that reads synthetic examples of its dataset's shape and classes in
    place of the dataset itself (which may be ImageNet, not prepared on this machine)."""
    from cnn_jax.data import datasets

    spec = datasets.dataset_spec(config)
    config = config.copy_and_resolve_references()
    if config.dataset != "synthetic":
        config.synthetic_channels = spec.channels
        config.num_classes = spec.num_classes or config.num_classes
        config.dataset = "synthetic"
    config.synthetic_train_size = max(config.synthetic_train_size, config.batch_size)
    return config


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

    warmup = min(trainer.steps_per_epoch, 500) if trainer.config.cache else 3
    stream = trainer.train_batches(0)
    for _ in range(warmup):
        next(stream)
    start, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        batch = next(stream)
    jax.block_until_ready(batch)
    images = batches * trainer.config.batch_size
    return images / (time.perf_counter() - start), images / (cpu_seconds() - cpu)


def _median_spread(seconds: list[float]) -> tuple[float, float, float]:
    """(median, 10th, 90th percentile) of step times, in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    pick = lambda q: ms[min(len(ms) - 1, round(q * (len(ms) - 1)))]
    return statistics.median(ms), pick(0.1), pick(0.9)


def run(config, *, steps=20, warmup=3, input_steps=50, with_torch=False, rounds=5,
        peak_tflops=0.0) -> dict:  # fmt: skip
    """Benchmark config's training step; returns the fields `main` prints as JSON."""
    import jax

    from cnn_jax import train

    if input_steps <= 0:  # the model's speed alone: no need to have, or prepare, the data
        config = without_dataset(config)
    trainer = train.Trainer(config)
    config = trainer.config
    reference = None  # built first: a model without a PyTorch reference fails before compiling
    if with_torch:
        from cnn_jax import benchmark_torch

        reference = benchmark_torch.TorchTrainer(config, channels=trainer.input_shape[-1])
    state = trainer.init_state()
    batch = synthetic_batch(trainer)

    start = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    devices = trainer.mesh.devices.size
    # The compiled program is per device; the mesh's devices together run one global batch.
    flops_per_image = step_flops(compiled) * devices / config.batch_size

    def jax_step():
        nonlocal state
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    for _ in range(warmup):
        jax_step()
        if reference:
            reference.step()

    rounds = max(1, rounds if reference else 1)
    per_round = max(1, math.ceil(steps / rounds))
    jax_times, torch_times = [], []
    for _ in range(rounds):
        jax_times += [jax_step() for _ in range(per_round)]
        if reference:
            torch_times += [reference.step() for _ in range(per_round)]

    step_ms, p10, p90 = _median_spread(jax_times)
    images_per_sec = config.batch_size / (step_ms / 1e3)
    device = jax.devices()[0]
    peak = peak_flops_per_sec(device.device_kind, config.half_precision, peak_tflops)
    achieved = flops_per_image * images_per_sec
    result = {
        "model": config.model,
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        "half_precision": bool(config.half_precision),
        "images_per_sec": images_per_sec,
        "step_ms": step_ms,
        "step_ms_p10_p90": [p10, p90],
        "timed_steps": len(jax_times),
        "compile_s": compile_s,
        "flops_per_image": flops_per_image,
        "achieved_flops_per_sec": achieved,
        "peak_flops_per_sec": peak,
        "mfu": achieved / (peak * devices) if peak else None,
        "device_kind": device.device_kind,
        "device_count": devices,
        "backend": jax.default_backend(),
        "dataset": config.dataset,
        "input_images_per_sec": None,
        "input_images_per_cpu_sec": None,
    }
    if reference:
        torch_ms, t10, t90 = _median_spread(torch_times)
        result |= {
            "torch_images_per_sec": config.batch_size / (torch_ms / 1e3),
            "torch_step_ms": torch_ms,
            "torch_step_ms_p10_p90": [t10, t90],
            "torch_threads": reference.threads(),
            "ratio": torch_ms / step_ms,  # cnn_jax images/s over PyTorch images/s
        }
    del state
    if input_steps > 0:
        wall, per_cpu = input_rates(trainer, input_steps)
        result["input_images_per_sec"], result["input_images_per_cpu_sec"] = wall, per_cpu
    return result


def main(argv: list[str] | None = None) -> None:
    """Command line; takes argv (program name first) so tests can call it in-process. Its
    flags live in their own FlagValues, so it never clashes with cnn_jax.main's."""
    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()
    cli.define_config_flag(fv, argv)
    # Bounds: a count out of range is one error line, not a silently different benchmark.
    flags.DEFINE_integer("steps", 20, "Timed training steps per framework.", lower_bound=1,
                         flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling, per framework.",
                         lower_bound=0, flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("input_steps", 50, "Timed input-pipeline batches; 0 skips them.",
                         lower_bound=0, flag_values=fv)  # fmt: skip
    flags.DEFINE_bool("torch", False, "Also time the PyTorch reference of the same layers.",
                      flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("rounds", 5, "With --torch: alternate the frameworks this many times.",
                         lower_bound=1, flag_values=fv)  # fmt: skip
    flags.DEFINE_float("peak_tflops", 0.0, "The device's peak TFLOP/s for MFU; 0: look it up.",
                       flag_values=fv)  # fmt: skip
    flags.register_validator("peak_tflops", lambda v: math.isfinite(v) and v >= 0,
                             "must be a finite number >= 0", flag_values=fv)  # fmt: skip
    if not cli.parse_tool_flags(argv, fv, __doc__):
        return

    def body():
        if fv.config is None:
            raise UserError("--config=configs/X.py[:arg] is required")
        # stdout carries the one JSON object; what a run says on the way (the mesh chosen,
        # a dataset being prepared) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            result = run(fv.config, steps=fv.steps, warmup=fv.warmup,
                         input_steps=fv.input_steps, with_torch=fv.torch, rounds=fv.rounds,
                         peak_tflops=fv.peak_tflops)  # fmt: skip
        print(json.dumps(result))

    cli.run(body, fv.config)


if __name__ == "__main__":
    main()
