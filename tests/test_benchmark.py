"""Smoke test of the throughput benchmark: it runs, and its numbers are the right kind of
numbers (no timing assertions: the machine is shared)."""

import importlib.util
import math
import os

import pytest

from cnn_jax import benchmark, defaults, experiment
from cnn_jax.models import ops


def _tiny_config():
    c = defaults.get_default_config("lenet5_modern")
    c.data.name = "synthetic"
    c.data.synthetic_channels = 3  # three input maps: every convolution runs in full
    c.data.synthetic_train_size = 64
    c.data.synthetic_eval_size = 16
    c.input.preprocess = "scale_to_unit"
    c.input.image_size = 32
    c.input.batch_size = 16  # two examples on each of the 8 test devices
    c.input.cache = False
    return c


def _forward_macs() -> int:
    """LeNet-5's layers on a 3-map 32x32 input (multiply-adds per image)."""
    c1 = 28 * 28 * 6 * (5 * 5 * 3)
    c3 = 10 * 10 * 16 * (5 * 5 * 6)
    c5 = 120 * (5 * 5 * 16)
    return c1 + c3 + c5 + 120 * 84 + 84 * 10


# PyTorch is an optional extra: with it installed, the same run also times the reference.
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _torch_reference():
    """benchmarks/torch_reference.py's `from_trainer` (the repository's, not the package's)."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks",
                        "torch_reference.py")  # fmt: skip
    spec = importlib.util.spec_from_file_location("_torch_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.from_trainer


CACHE_SETTINGS = (
    "jax_enable_compilation_cache",
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
)


def _cache_settings() -> dict:
    import jax

    return {name: getattr(jax.config, name) for name in CACHE_SETTINGS}


@pytest.fixture(scope="module")
def result():
    reference = _torch_reference() if HAVE_TORCH else None
    before = _cache_settings()
    result = benchmark.run(
        _tiny_config(), steps=4, warmup=1, input_steps=2, rounds=2, reference=reference
    )
    # The cold and warm compiles use a cache of their own; the process's settings are back.
    assert _cache_settings() == before
    return result


def test_fields_are_present_and_positive(result):
    # compile_s_warm is a number only where the second compile loaded the step from the cache.
    for field in ("images_per_sec", "step_ms", "compile_s", "compile_s_warm", "flops_per_image",
                  "achieved_flops_per_sec", "input_images_per_sec",
                  "input_images_per_cpu_sec"):  # fmt: skip
        assert math.isfinite(result[field]) and result[field] > 0, field
    assert result["device_count"] == 8 and result["backend"] == "cpu"
    assert result["device_kind"] and result["timed_steps"] == 4
    assert result["model"] == "lenet5_modern" and result["batch_size"] == 16
    assert result["half_precision"] is False  # resolved from the backend: CPU
    p10, p90 = result["step_ms_p10_p90"]
    assert p10 <= result["step_ms"] <= p90
    assert result["images_per_sec"] == pytest.approx(16 / (result["step_ms"] / 1e3))
    assert result["achieved_flops_per_sec"] == pytest.approx(
        result["flops_per_image"] * result["images_per_sec"]
    )
    assert result["peak_flops_per_sec"] is None and result["mfu"] is None  # no CPU peak
    assert result["step_cpu_ms"] > 0 and len(result["load_average"]) == 2
    assert set(result["cpu_flags"]) <= ops.REPORTED_CPU_FLAGS


def test_flops_per_image_matches_the_layer_arithmetic(result):
    """XLA's count of the compiled step, all devices together, against forward + two
    backward products per layer (the first layer has no input gradient). The rest (18% here)
    is elementwise work and the optimiser update, which every device repeats on its copy of
    the parameters."""
    macs = _forward_macs()
    first_layer = 28 * 28 * 6 * (5 * 5 * 3)
    analytic = 2 * (3 * macs - first_layer)
    assert analytic < result["flops_per_image"] < analytic * 1.35


def test_peak_lookup():
    assert benchmark.peak_flops_per_sec("NVIDIA H100 80GB HBM3", True) == 989e12
    assert benchmark.peak_flops_per_sec("NVIDIA H100 80GB HBM3", False) == pytest.approx(494.7e12)
    assert benchmark.peak_flops_per_sec("cpu", True) is None
    assert benchmark.peak_flops_per_sec("cpu", True, override_tflops=2.0) == 2e12


@pytest.mark.skipif(not HAVE_TORCH, reason="the optional torch extra is not installed")
def test_torch_reference_runs_beside_it(result):
    assert result["torch_images_per_sec"] > 0 and result["torch_threads"] >= 1
    assert result["ratio"] == pytest.approx(result["torch_step_ms"] / result["step_ms"])
    t10, t90 = result["torch_step_ms_p10_p90"]
    assert t10 <= result["torch_step_ms"] <= t90
    assert len(result["ratio_per_round"]) == 2  # one per alternating round
    assert min(result["ratio_per_round"]) <= result["ratio_median_of_rounds"]
    assert result["ratio_median_of_rounds"] <= max(result["ratio_per_round"])
    assert result["cpu_ratio"] == pytest.approx(result["torch_step_cpu_ms"] / result["step_cpu_ms"])


def test_timings_pair_rounds_in_order():
    timings = benchmark.Timings()
    for seconds, r in ((3.0, 0), (1.0, 0), (2.0, 0), (5.0, 1)):
        timings.add(lambda: None, r)
        timings.wall[-1] = seconds
    assert timings.round_medians() == [2.0, 5.0]
    assert len(timings.cpu) == 4 and all(c >= 0 for c in timings.cpu)


def test_cpu_cores_become_devices_that_divide_the_batch(monkeypatch):
    from cnn_jax import cli

    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert cli._cores_dividing(batch_size=128, model_axis=1) == 4  # 6 cores: 4 divides 128
    assert cli._cores_dividing(batch_size=96, model_axis=1) == 6
    assert cli._cores_dividing(batch_size=32, model_axis=2) == 4  # data 2 x model 2
    assert cli._cores_dividing(batch_size=7, model_axis=1) == 1


def test_without_input_steps_the_data_is_never_opened(tmp_path):
    """--input_steps=0 times the model alone: a config whose dataset is not on this machine
    (ImageNet, or MNIST with no network) still runs, on synthetic examples of its shape,
    and leaves no dataset folders behind."""
    c = _tiny_config()
    c.data.name, c.data.data_dir = "mnist", str(tmp_path)
    result = benchmark.run(c, steps=1, warmup=0, input_steps=0)
    assert result["dataset"] == "synthetic" and result["images_per_sec"] > 0
    assert result["input_images_per_sec"] is None and result["input_images_per_cpu_sec"] is None
    assert os.listdir(tmp_path) == []
    imagenet = experiment.with_synthetic_data(_load_config("alexnet.py")).data
    assert (imagenet.name, imagenet.synthetic_channels, imagenet.num_classes) == (
        "synthetic",
        3,
        1000,
    )
    mnist = experiment.with_synthetic_data(_load_config("lenet.py"))
    assert (mnist.data.synthetic_channels, mnist.data.num_classes) == (1, 10)
    assert mnist.data.synthetic_train_size >= mnist.input.batch_size


def _load_config(name):
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", name)
    spec = importlib.util.spec_from_file_location("_bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.skipif(not HAVE_TORCH, reason="the optional torch extra is not installed")
@pytest.mark.parametrize("variant,batch_norm", [("A", False), ("C", True), ("A-LRN", False)])
def test_torch_vgg_has_the_same_parameter_count(variant, batch_norm):
    """The PyTorch reference is the same network: as many parameters as cnn_jax's VGG (with
    batch norm, its running statistics are buffers in both, not parameters)."""
    import jax
    import jax.numpy as jnp

    from cnn_jax import models

    fields = {"variant": variant, "batch_norm": batch_norm, "width_divisor": 16}
    net = models.build_model("vgg", num_classes=10, dtype=jnp.float32, **fields)
    shapes = jax.eval_shape(
        lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    want = sum(x.size for x in jax.tree.leaves(shapes["params"]))
    trainer = _torch_reference().__globals__["TorchTrainer"](
        "vgg", channels=3, image_size=32, batch_size=2, num_classes=10,
        model_fields={**fields, "dropout_rate": 0.5},
    )  # fmt: skip
    assert sum(p.numel() for p in trainer.model.parameters()) == want
    assert trainer.step() > 0  # and it trains: forward, backward and update run
