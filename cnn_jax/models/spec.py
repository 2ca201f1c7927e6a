"""`ModelSpec`: what the rest of the package knows about one model (cnn_jax.models.MODELS)."""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the rest of the package needs to know about one model."""

    # build(*, num_classes, dtype, model_axis, kernels, **module_fields) -> the module; it
    # rejects its own bad field values with UserError.
    build: Callable[..., nn.Module]
    # The model's own config fields (config.model, less `name`) and their defaults.
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    min_image_size: int = 1  # the smallest input side it takes
    fixed_image_size: int | None = None  # an input side fixed by the architecture
    fixed_num_classes: int | None = None  # a class count fixed by the architecture
    fixed_num_classes_why: str = ""  # ... and why, for the error line
    model_axis_sizes: tuple[int, ...] = (1,)  # mesh model-axis sizes it splits over (towers)
    dense: bool = False  # has the convolutional evaluation path (__call__(..., dense=True))
    preprocess: str = "scale_to_unit"  # its paper's preprocessing (data.preprocess op name)
    not_module_fields: tuple[str, ...] = ()  # fields read elsewhere, not passed to build

    @property
    def towers(self) -> int:
        return max(self.model_axis_sizes)
