"""Entry point: python -m cnn_jax.main --config=configs/lenet.py --workdir=DIR [--config.X=Y]"""

from absl import app, flags
from ml_collections import config_flags

from cnn_jax import cli
from cnn_jax.errors import UserError

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file; every field overridable.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    def body():
        if len(argv) > 1:
            raise UserError(
                f"unexpected arguments: {' '.join(argv[1:])} (options are --flag=value)"
            )
        from cnn_jax import train  # after flag parsing (--help stays fast), in cli.run

        train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)

    cli.run(body, flags.FLAGS.config, interrupted=cli.BEFORE_THE_RUN)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
