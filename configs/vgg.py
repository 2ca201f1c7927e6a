"""VGG (Simonyan & Zisserman, ICLR 2015): the argument picks a column of Table 1.

    python -m cnn_jax.main --config=configs/vgg.py:D --workdir=runs/vgg_d --config.manual_dir=DIR
    python -m cnn_jax.main --config=configs/vgg.py:vgg16 ...          # the same network
    python -m cnn_jax.main --config=configs/vgg.py:D --workdir=runs/vgg_d \\
        --config.warm_start_from=runs/vgg_a                             # Sec. 3.1 warm start

Arguments: A, A-LRN, B, C, D (the default), E, or vgg11 / vgg11_lrn / vgg13 / vgg16 / vgg19.
The training recipe is Sec. 3.1's: batch 256, SGD with momentum 0.9, weight decay 5e-4,
dropout 0.5 on FC6/FC7, learning rate 1e-2 divided by 10 when validation accuracy stops
improving (three times in the paper), 74 epochs, 224x224 crops.
"""

from cnn_jax import defaults
from cnn_jax.models import vgg


def get_config(arg=None):
    c = defaults.get_default_config()
    c.model = "vgg"
    c.vgg_variant = vgg.resolve_variant(arg or "D")
    c.batch_norm = False  # the paper has none; --config.batch_norm=True for the modern variant
    c.dataset = "imagenet2012"
    c.num_classes = 1000
    c.image_size = 224
    # Sec. 3.1: isotropic rescale to a training scale S drawn per image from [256, 512] (scale
    # jittering, the paper's best setting), a random 224x224 crop, random mirror, AlexNet's
    # RGB colour shift, mean RGB subtracted. Evaluation is a centre crop here;
    # --config.eval_mode=dense is the paper's dense multi-scale evaluation (Sec. 3.2).
    c.preprocess = "vgg"
    c.train_scale_min = 256
    c.train_scale_max = 512
    c.batch_size = 256
    c.num_epochs = 74.0  # Sec. 3.1: "stopped after 370K iterations (74 epochs)"
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.dropout_rate = 0.5
    c.learning_rate = 1e-2
    # Sec. 3.1: "decreased by a factor of 10 when the validation set accuracy stopped
    # improving. In total, the learning rate was decreased 3 times".
    c.lr_schedule = "plateau"
    c.plateau_max_drops = 3
    c.cache = False  # ImageNet does not fit in memory
    c.log_every_steps = 100
    c.checkpoint_every_steps = 1000
    return c
