"""Import trained VGG weights (torchvision, Keras) into a cnn_jax workdir.

    python -m cnn_jax.weights import --from=torchvision --file=vgg16-397923af.pth \\
        --workdir=runs/vgg16_tv
    python -m cnn_jax.weights import --from=keras \\
        --file=vgg16_weights_tf_dim_ordering_tf_kernels.h5 --workdir=runs/vgg16_keras
    python -m cnn_jax.main --config=configs/vgg.py:D --workdir=runs/vgg16_tv \\
        --config.eval.only=True --config.data.manual_dir=DIR

The network (Table 1 column, batch norm, width, classes) is read from the file. --config
(optional, with --config.X=Y overrides) names the config the checkpoint is made for: the
file must be its network, and its optimiser and seed make the step-0 state; without it, the
vgg defaults (SGD) are used, as configs/vgg.py has them. --reader picks how a .pth is read:
auto (torch if installed, else the built-in reader), torch, or builtin. docs/weights.md has
each source's conventions and what is folded into the weights.
"""

import sys

from absl import flags

from cnn_jax import cli
from cnn_jax.errors import UserError

COMMANDS = ("import",)


def _define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    from cnn_jax.weights import pth  # light: numpy and the standard library

    flags.DEFINE_enum(
        "from", None, ["torchvision", "keras"], "The file's framework.", flag_values=fv
    )
    flags.DEFINE_string("file", None, "The weights file (.pth, .h5, .weights.h5).", flag_values=fv)
    flags.DEFINE_string("workdir", None, "The cnn_jax workdir to write.", flag_values=fv)
    flags.DEFINE_enum("reader", "auto", list(pth.READERS), "How a .pth is read.", flag_values=fv)
    cli.define_config_flag(fv, argv)


def main(argv: list[str] | None = None) -> None:
    """Command line; takes argv (program name first) so tests can call it in-process."""
    argv = sys.argv if argv is None else argv
    command = argv[1] if len(argv) > 1 and not argv[1].startswith("-") else None
    rest = [argv[0], *argv[2:]] if command else list(argv)
    fv = flags.FlagValues()
    _define_flags(fv, rest)
    if not cli.parse_tool_flags(rest, fv, __doc__):
        return

    def body():
        if command not in COMMANDS:
            shown = f"unknown command {command!r}" if command else "no command"
            raise UserError(f"{shown}: python -m cnn_jax.weights import --from=... --file=...")
        for name in ("from", "file", "workdir"):
            if not fv[name].value:
                raise UserError(f"--{name} is required (python -m cnn_jax.weights --help)")
        from cnn_jax.weights import importer  # after the flags: --help stays fast

        facts, workdir = importer.import_weights(
            fv["from"].value, fv.file, fv.workdir, config=fv.config, reader=fv.reader
        )
        bn = " --config.model.batch_norm=True" if facts.batch_norm else ""
        if facts.width_divisor > 1:
            bn += f" --config.model.width_divisor={facts.width_divisor}"
        print(f"imported {facts.describe()} from {fv.file} into {workdir} (step 0)")
        print(
            f"evaluate: python -m cnn_jax.main --config=configs/vgg.py:{facts.variant}{bn} "
            f"--workdir={workdir} --config.eval.only=True"
        )

    cli.run(body, fv.config)


if __name__ == "__main__":
    main()
