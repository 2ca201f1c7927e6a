"""Training input pipeline alone: images/s and images per CPU-second, as one JSON object.

    python benchmarks/input_rate.py --config=configs/alexnet.py --config.data.name=image_folder \\
        --config.data.manual_dir=DIR --config.input.batch_size=32 [--steps=30] [--rounds=3] \\
        [--compare | --form=resize_then_crop]

Times `cnn_jax.data.pipeline.train_dataset` (read, decode, augment, batch: what a training
step waits on, without the transfer to devices) over --steps batches after a warm-up, in
--rounds rounds, and reports the median round. Besides wall-clock images/s it reports images
per CPU-second of this process (user + system time of all its threads, getrusage): the rate
of one core, which other processes' load on a shared machine changes far less than the
wall-clock rate. With --compare each round also times the resize-then-crop form of the op
(its PreprocessSpec.reference: the whole image decoded and rescaled), alternating, so both see
the same machine. --form=resize_then_crop times only that form (to profile it alone, e.g.
under `perf record`, as docs/input_pipeline.md does).
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from absl import flags

from cnn_jax import cli
from cnn_jax.errors import UserError


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        lines = out.splitlines()
        return next(
            line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def time_round(source, prep, config, steps: int, warmup: int) -> dict:
    from cnn_jax.data import pipeline

    batches = iter(
        pipeline.train_dataset(
            source,
            prep,
            batch_size=config.input.batch_size,
            seed=config.run.seed,
            cache=config.input.cache,
            shuffle_buffer=config.input.shuffle_buffer,
        )
    )
    for _ in range(warmup):
        next(batches)
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(steps):
        next(batches)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    images = steps * config.input.batch_size
    return {"images_per_sec": images / wall, "images_per_cpu_sec": images / cpu}


# The op as registered, and its resize-then-crop form (PreprocessSpec.reference).
FORMS = ("decode_patch", "resize_then_crop")


def run(
    config, *, steps: int, rounds: int, warmup: int, compare: bool, form: str = FORMS[0]
) -> dict:
    import dataclasses

    from cnn_jax import experiment
    from cnn_jax.data import preprocess

    source, prep = experiment.source(config), experiment.preprocessing(config)
    current = prep.spec
    names = FORMS if compare else (form,)
    if "resize_then_crop" in names and current.reference is None:
        raise UserError(f"preprocess {prep.name!r} has no resize-then-crop form to time")
    specs = {"decode_patch": current}
    if current.reference is not None:
        specs["resize_then_crop"] = dataclasses.replace(current, fn=current.reference)
    variants = {name: specs[name] for name in names}
    times = {name: [] for name in variants}
    try:
        for _ in range(rounds):
            for name, spec in variants.items():
                preprocess.PREPROCESSORS[prep.name] = spec  # Preprocessing looks its op up
                times[name].append(time_round(source, prep, config, steps, warmup))
    finally:
        preprocess.PREPROCESSORS[prep.name] = current
    batch_size = config.input.batch_size
    result = {
        "preprocess": prep.name,
        "dataset": source.name,
        "images": source.num_examples("train"),
        "batch_size": batch_size,
        "timed_images_per_round": steps * batch_size,
        "rounds": rounds,
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "load_average_1min": os.getloadavg()[0],
    }
    for name, rounds_ in times.items():
        for field in ("images_per_sec", "images_per_cpu_sec"):
            values = [r[field] for r in rounds_]
            result[f"{name}_{field}"] = statistics.median(values)
            result[f"{name}_{field}_rounds"] = [round(v, 1) for v in values]
    if compare:
        result["per_core_speedup"] = (
            result["decode_patch_images_per_cpu_sec"]
            / result["resize_then_crop_images_per_cpu_sec"]
        )
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()
    cli.define_config_flag(fv, argv)
    flags.DEFINE_integer("steps", 30, "Timed batches per round.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer(
        "rounds", 3, "Rounds (the median is reported).", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_integer(
        "warmup", 3, "Untimed batches before each round.", lower_bound=0, flag_values=fv
    )
    flags.DEFINE_bool("compare", False, "Time both forms of the op, alternating.", flag_values=fv)
    flags.DEFINE_enum("form", FORMS[0], FORMS, "The form timed without --compare.", flag_values=fv)
    if not cli.parse_tool_flags(argv, fv, __doc__):
        return

    def body():
        if fv.config is None:
            raise UserError("--config=configs/X.py[:arg] is required")
        result = run(
            fv.config,
            steps=fv.steps,
            rounds=fv.rounds,
            warmup=fv.warmup,
            compare=fv.compare,
            form=fv.form,
        )
        print(json.dumps(result))

    cli.run(body)


if __name__ == "__main__":
    main()
