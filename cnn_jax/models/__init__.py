"""The model zoo: one registry from config.model to a Flax Linen module."""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from cnn_jax.errors import UserError
from cnn_jax.models import alexnet, vgg
from cnn_jax.models.lenet import LeNet5, LeNet5Modern


def _dtype(config) -> jnp.dtype:
    return jnp.bfloat16 if config.half_precision else jnp.float32


def resolve_half_precision(config) -> None:
    """Fill an unset (None) config.half_precision in place: bfloat16 compute on GPU and TPU,
    whose matrix units run it at twice float32's rate or more, float32 on CPU, where it only
    adds conversions (README, Performance)."""
    if config.half_precision is None:
        config.half_precision = jax.default_backend() in ("gpu", "tpu")


def resolve_mesh_model(config, num_devices: int, process_count: int = 1) -> str | None:
    """Fill an automatic model axis (config.mesh_model=0, configs/alexnet.py's default) in
    place: a device per tower where the devices allow it, else every device runs all towers
    (parallel.auto_model_axis). Returns the one line that says which, for a model with
    towers; None when nothing was chosen."""
    from cnn_jax import parallel

    if config.mesh_model != parallel.AUTO_MODEL_AXIS:
        return None
    towers = max(MODEL_AXIS_SIZES.get(config.model, (1,)))
    config.mesh_model = parallel.auto_model_axis(
        towers, num_devices=num_devices, batch_size=config.batch_size,
        mesh_data=config.mesh_data, process_count=process_count,
    )  # fmt: skip
    if towers == 1:
        return None
    if config.mesh_model == towers:
        return (
            f"mesh: {config.model}'s {towers} towers on separate devices, the paper's split "
            f"(data={num_devices // towers} x model={towers})"
        )
    return (
        f"mesh: {config.model}'s {towers} towers together on each of the {num_devices} "
        f"device(s) (data={num_devices} x model=1); a device per tower needs a multiple of "
        f"{towers} devices that splits the batch evenly (--config.mesh_model={towers} insists)"
    )


def _width_divisor(c, allowed: tuple[int, ...]) -> int:
    if c.width_divisor not in allowed:
        raise UserError(
            f"--config.width_divisor={c.width_divisor} is not one of: "
            f"{', '.join(map(str, allowed))}"
        )
    return c.width_divisor


def _vgg(c) -> nn.Module:
    return vgg.VGG(
        variant=vgg.resolve_variant(c.vgg_variant),  # a bad letter fails here, before compiling
        num_classes=c.num_classes,
        batch_norm=c.batch_norm,
        dropout_rate=c.dropout_rate,
        dtype=_dtype(c),
        width_divisor=_width_divisor(c, vgg.WIDTH_DIVISORS),
    )


def _alexnet(c, towers: int) -> nn.Module:
    _width_divisor(c, alexnet.WIDTH_DIVISORS)
    # The towers split over the mesh's model axis when it has their number of devices; on a
    # model axis of 1 each device runs both towers (grouped convolutions).
    from cnn_jax.parallel import MODEL_AXIS  # models name the axis, nothing else of the mesh

    return alexnet.AlexNet(
        num_classes=c.num_classes,
        dropout_rate=c.dropout_rate,
        dtype=_dtype(c),
        towers=towers,
        tower_axis=MODEL_AXIS if towers > 1 and c.mesh_model == towers else None,
        width_divisor=c.width_divisor,
    )


# Each entry builds a module from the config. Other model files add themselves here.
MODELS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "lenet5": lambda c: LeNet5(num_classes=c.num_classes, dtype=_dtype(c)),
    "lenet5_modern": lambda c: LeNet5Modern(num_classes=c.num_classes, dtype=_dtype(c)),
    "vgg": _vgg,
    "alexnet": lambda c: _alexnet(c, towers=alexnet.TOWERS),
    "alexnet_single_tower": lambda c: _alexnet(c, towers=1),
}

# The smallest input side each model accepts (checked before anything compiles).
MIN_IMAGE_SIZE: dict[str, int] = {
    "lenet5": 32,
    "lenet5_modern": 32,
    "vgg": vgg.MIN_IMAGE_SIZE,  # five 2x2 max-pools; FC6 adapts any last map to 7x7
    "alexnet": alexnet.MIN_IMAGE_SIZE,  # fc6's fan-in follows the last map (6x6 at 224)
    "alexnet_single_tower": alexnet.MIN_IMAGE_SIZE,
}
# Models whose input side is fixed by their architecture (a Dense layer after the convs).
FIXED_IMAGE_SIZE: dict[str, int] = {"lenet5": 32, "lenet5_modern": 32}
# The sizes of the mesh's model axis a model can be split over (its towers); others take 1.
MODEL_AXIS_SIZES: dict[str, tuple[int, ...]] = {"alexnet": (1, alexnet.TOWERS)}


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    try:
        make = MODELS[config.model]
    except KeyError:
        raise UserError(
            f"unknown model {config.model!r}; choose one of: {', '.join(sorted(MODELS))}"
        ) from None
    return make(config)


def param_specs(model: nn.Module, params):
    """PartitionSpec of every parameter over the mesh: where a model splits itself over the
    model axis it says so (`param_partition_specs`, AlexNet's towers); all else replicated."""
    split = getattr(model, "param_partition_specs", None)
    return split(params) if split is not None else jax.tree.map(lambda _: P(), params)
