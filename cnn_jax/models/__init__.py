"""The model zoo: one `ModelSpec` per model, from its name (config.model.name) to a Flax module.

A new model is its own file (the module, a `build` function and its `ModelSpec`) and one line
in `MODELS`.
"""

from typing import Any

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import PartitionSpec as P

from cnn_jax.errors import UserError
from cnn_jax.models import alexnet, lenet, vgg
from cnn_jax.models.layers import Kernels
from cnn_jax.models.spec import ModelSpec

# Every model, by its config.model.name. A model file defines its module, a `build` function
# and its ModelSpec; this dict is the one line that registers it.
MODELS: dict[str, ModelSpec] = {
    "lenet5": lenet.SPEC,
    "lenet5_modern": lenet.MODERN_SPEC,
    "alexnet": alexnet.SPEC,
    "alexnet_single_tower": alexnet.SINGLE_TOWER_SPEC,
    "vgg": vgg.SPEC,
}


def spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UserError(
            f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}"
        ) from None


def model_config(name: str) -> ml_collections.ConfigDict:
    """The config.model group of `name`: its name and its own fields' defaults."""
    return ml_collections.ConfigDict({"name": name, **spec(name).fields})


def build_model(
    name: str,
    *,
    num_classes: int,
    dtype: Any,
    model_axis: int = 1,
    backend: str | None = None,
    **fields,
) -> nn.Module:
    """The module of model `name`. `fields` are its own (config.model less `name`; missing
    ones take their defaults); `model_axis` is the mesh's model-axis size (a tower model
    splits its towers over it when it has one device per tower). The convolution, dense
    product and pooling are chosen for `backend` (default: jax.default_backend()):
    layers.Kernels.for_backend."""
    model = spec(name)
    unknown = sorted(set(fields) - set(model.fields))
    if unknown:
        own = ", ".join(model.fields) or "none"
        raise UserError(
            f"--config.model.{unknown[0]}: {name} has no such field (its fields: {own})"
        )
    if model_axis not in model.model_axis_sizes:
        raise UserError(
            f"--config.mesh.model={model_axis}: {name} cannot be split over the model axis; "
            f"it takes {' or '.join(map(str, model.model_axis_sizes))}"
        )
    values = {**model.fields, **fields}
    for field in model.not_module_fields:
        values.pop(field)
    kernels = Kernels.for_backend(backend or jax.default_backend())
    return model.build(
        num_classes=num_classes, dtype=dtype, model_axis=model_axis, kernels=kernels, **values
    )


def check_input(name: str, image_size: int, num_classes: int, classes_from: str = "") -> None:
    """The input side and class count model `name` takes: its size limits, and a class count
    fixed by its architecture (LeNet-5's ten RBF prototypes, one per digit). `classes_from`
    says where the count came from (the start of the error line: the dataset's flag)."""
    model = spec(name)
    if not image_size > 0:
        raise UserError(f"--config.input.image_size={image_size} must be > 0")
    fixed = model.fixed_image_size
    if fixed is not None and image_size != fixed:
        raise UserError(f"--config.input.image_size={image_size}: {name} takes {fixed}")
    if image_size < model.min_image_size:
        raise UserError(
            f"--config.input.image_size={image_size} is too small for {name}: "
            f"it needs at least {model.min_image_size}"
        )
    if model.fixed_num_classes not in (None, num_classes):
        why = model.fixed_num_classes_why or (
            f"{name} takes exactly {model.fixed_num_classes} classes, not {num_classes} (its "
            "output layer has one fixed unit per class)"
        )
        raise UserError(f"{classes_from}: {why}" if classes_from else why)


def param_specs(model: nn.Module, params):
    """PartitionSpec of every parameter over the mesh: where a model splits itself over the
    model axis it says so (`param_partition_specs`, AlexNet's towers); all else replicated."""
    split = getattr(model, "param_partition_specs", None)
    return split(params) if split is not None else jax.tree.map(lambda _: P(), params)
