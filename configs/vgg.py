"""VGG (Simonyan & Zisserman, ICLR 2015): the argument picks a column of Table 1.

    python -m cnn_jax.main --config=configs/vgg.py:D --workdir=runs/vgg_d \\
        --config.data.manual_dir=DIR
    python -m cnn_jax.main --config=configs/vgg.py:vgg16 ...          # the same network
    python -m cnn_jax.main --config=configs/vgg.py:D --workdir=runs/vgg_d \\
        --config.model.warm_start_from=runs/vgg_a                             # Sec. 3.1 warm start

Arguments: A, A-LRN, B, C, D (the default), E, or vgg11 / vgg11_lrn / vgg13 / vgg16 / vgg19.
The training recipe is Sec. 3.1's: batch 256, SGD with momentum 0.9, weight decay 5e-4,
dropout 0.5 on FC6/FC7, learning rate 1e-2 divided by 10 when validation accuracy stops
improving (three times in the paper), 74 epochs, 224x224 crops.
"""

from cnn_jax import defaults
from cnn_jax.models import vgg


def get_config(arg=None):
    c = defaults.get_default_config("vgg")
    c.model.variant = vgg.resolve_variant(arg or "D")
    c.model.batch_norm = False  # the paper has none; --config.model.batch_norm=True: modern
    c.model.dropout_rate = 0.5  # on FC6 and FC7
    c.data.name = "imagenet2012"
    c.data.num_classes = 1000  # what synthetic data then has; real datasets bring their own
    c.input.image_size = 224
    # Sec. 3.1: isotropic rescale to a training scale S drawn per image from [256, 512] (scale
    # jittering, the paper's best setting), a random 224x224 crop, random mirror, AlexNet's
    # RGB colour shift, mean RGB subtracted. Evaluation is a centre crop here;
    # --config.eval.evaluators=dense is the paper's dense multi-scale evaluation (Sec. 3.2).
    c.input.preprocess = "vgg"
    c.input.train_scale_min = 256
    c.input.train_scale_max = 512
    c.input.batch_size = 256
    c.input.cache = False  # ImageNet does not fit in memory
    c.run.num_epochs = 74.0  # Sec. 3.1: "stopped after 370K iterations (74 epochs)"
    c.optim.name = "sgd"
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.learning_rate = 1e-2
    # Sec. 3.1: "decreased by a factor of 10 when the validation set accuracy stopped
    # improving. In total, the learning rate was decreased 3 times".
    c.optim.schedule = "plateau"
    c.optim.plateau_max_drops = 3
    c.run.log_every_steps = 100
    c.run.checkpoint_every_steps = 1000
    return c
