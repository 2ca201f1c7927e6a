"""Per-layer summary of any registered model: output shape, trainable parameters and
multiply-accumulates (MACs) per image, by shape inference alone (no weights are made).

    python -m cnn_jax.summary --config=configs/lenet.py
    python -m cnn_jax.summary --config=configs/vgg.py:D --config.input.image_size=256

(tools/models_table.py makes the README's model table from these summaries.)

How it works: the model's `init` runs under `jax.eval_shape`, with `nn.intercept_methods`
recording every module call. A row is a *leaf* call (a module that calls no other module)
that owns parameters or does multiplications; pooling, ReLU and LRN are functions, not
modules, so they are not rows. MACs of a row are output positions x weights: each weight of
a convolution or dense layer (kernel, LeNet's subsampling coefficient, batch norm's scale;
not biases) multiplies once per output position, which counts grouped and sparse
convolutions right because only their real weights are parameters. Layers without parameters
that still multiply (LeNet-5's RBF units) have their own rule in MAC_RULES.
"""

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import flags

from cnn_jax import cli
from cnn_jax.errors import UserError
from cnn_jax.models.layers import EuclideanRBF


@dataclasses.dataclass(frozen=True)
class Row:
    layer: str  # module path, e.g. "features/conv1_1"
    output_shape: tuple[int, ...]  # per image (no batch axis)
    params: int  # trainable parameters
    macs: int  # multiply-accumulates per image


@dataclasses.dataclass(frozen=True)
class Summary:
    model: str
    input_shape: tuple[int, ...]  # per image
    rows: tuple[Row, ...]
    total_params: int  # every trainable parameter, counted once
    total_macs: int


def _rbf_macs(inputs: Sequence[jax.ShapeDtypeStruct], output) -> int:
    # y_i = sum_j (x_j - w_ij)^2: one multiply per (class, feature) pair.
    return output.shape[-1] * inputs[0].shape[-1]


# Modules whose multiplications are not "output positions x weights"; (inputs, output) -> MACs.
MAC_RULES: dict[type, Callable[[Sequence[jax.ShapeDtypeStruct], jax.ShapeDtypeStruct], int]] = {
    EuclideanRBF: _rbf_macs,
}


def _weight_macs(params, output) -> int:
    positions = math.prod(output.shape[1:-1])
    weights = sum(
        leaf.size
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if getattr(path[-1], "key", None) != "bias"
    )
    return positions * weights


def _first_array(tree):
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
    return leaves[0] if leaves else None


def summarize(config: ml_collections.ConfigDict) -> Summary:
    """The per-layer summary of config's model at its input size, for a batch of one image."""
    from cnn_jax import experiment  # TFDS: imported only when a summary is made
    from cnn_jax.data import pipeline

    config = experiment.resolve(config, num_devices=1, process_count=1)
    model = experiment.model(config)  # checks the input size and class count for the model
    prep = experiment.preprocessing(config)
    channels = pipeline.input_channels(experiment.source(config), prep)
    return summarize_model(model, (prep.image_size, prep.image_size, channels))


def summarize_model(model: nn.Module, image_shape: tuple[int, ...]) -> Summary:
    """The per-layer summary of a built `model` for one image of `image_shape` (H, W, C); its
    rows are in the order the forward pass calls them (cnn_jax.finetune counts layers so)."""
    rows: list[Row] = []
    stack: list[dict] = []  # module calls in progress, innermost last

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "setup" or (stack and stack[-1]["module"] is module):
            return next_fun(*args, **kwargs)  # a module's own helper methods are part of it
        if stack:
            stack[-1]["leaf"] = False
        stack.append({"module": module, "leaf": True})
        try:
            out = next_fun(*args, **kwargs)
        finally:
            call = stack.pop()
        output = _first_array(out)
        if call["leaf"] and output is not None:
            params = module.variables.get("params", {})
            rule = MAC_RULES.get(type(module))
            inputs = [a for a in args if hasattr(a, "shape")]
            macs = rule(inputs, output) if rule else _weight_macs(params, output)
            count = sum(p.size for p in jax.tree.leaves(params))
            if count or macs:
                rows.append(Row("/".join(module.path), tuple(output.shape[1:]), count, macs))
        return out

    def init(x):
        rng = jax.random.key(0)
        with nn.intercept_methods(record):
            return model.init({"params": rng, "dropout": rng}, x, train=False)

    variables = jax.eval_shape(init, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    total = sum(p.size for p in jax.tree.leaves(variables["params"]))
    variant = getattr(model, "variant", None)  # VGG's configuration letter
    return Summary(
        model=f"{type(model).__name__} {variant}" if variant else type(model).__name__,
        input_shape=image_shape,
        rows=tuple(rows),
        total_params=total,
        total_macs=sum(r.macs for r in rows),
    )


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def format_table(summary: Summary) -> str:
    header = ("layer", "output", "parameters", "MACs")
    body = [(r.layer, _shape(r.output_shape), f"{r.params:,}", f"{r.macs:,}") for r in summary.rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(4)]

    def line(cells):
        left = [cells[i].ljust(widths[i]) for i in range(2)]
        right = [cells[i].rjust(widths[i]) for i in range(2, 4)]
        return "  ".join(left + right).rstrip()

    return "\n".join(
        [
            f"{summary.model}, input {_shape(summary.input_shape)}",
            line(header),
            line(["-" * w for w in widths]),
            *(line(row) for row in body),
            "",
            f"Total parameters: {summary.total_params:,}",
            f"Total MACs: {summary.total_macs:,}",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    """Command line; takes argv (program name first) so tests can call it in-process.
    Its flags live in their own FlagValues, so it never clashes with cnn_jax.main's."""
    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()
    cli.define_config_flag(fv, argv)
    if not cli.parse_tool_flags(argv, fv, __doc__):
        return

    def body():
        if fv.config is None:
            raise UserError("--config=configs/X.py[:arg] is required")
        print(format_table(summarize(fv.config)))

    cli.run(body)


if __name__ == "__main__":
    main()
