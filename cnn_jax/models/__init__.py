"""The model zoo: one registry from config.model to a Flax Linen module."""

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from cnn_jax.errors import UserError
from cnn_jax.models.lenet import LeNet5, LeNet5Modern


def _dtype(config) -> jnp.dtype:
    return jnp.bfloat16 if config.half_precision else jnp.float32


# Each entry builds a module from the config. Other model files add themselves here.
MODELS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "lenet5": lambda c: LeNet5(num_classes=c.num_classes, dtype=_dtype(c)),
    "lenet5_modern": lambda c: LeNet5Modern(num_classes=c.num_classes, dtype=_dtype(c)),
}

# The smallest input side each model accepts (checked before anything compiles).
MIN_IMAGE_SIZE: dict[str, int] = {"lenet5": 32, "lenet5_modern": 32}
# Models whose input side is fixed by their architecture (a Dense layer after the convs).
FIXED_IMAGE_SIZE: dict[str, int] = {"lenet5": 32, "lenet5_modern": 32}


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    try:
        make = MODELS[config.model]
    except KeyError:
        raise UserError(
            f"unknown model {config.model!r}; choose one of: {', '.join(sorted(MODELS))}"
        ) from None
    return make(config)
