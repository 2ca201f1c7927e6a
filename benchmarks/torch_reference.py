"""cnn_jax against PyTorch: `python -m cnn_jax.benchmark` with the PyTorch reference beside it.

    python benchmarks/torch_reference.py --config=configs/lenet.py --config.input.batch_size=128
    python benchmarks/torch_reference.py --config=configs/alexnet.py --input_steps=0 --rounds=3

The reference has the same layers as the cnn_jax models, trained the way a PyTorch user would
(eager mode, NCHW, torch.optim.SGD), on the same synthetic batch shape, so the two throughputs
compare the frameworks and nothing else. The JSON line adds torch_images_per_sec,
torch_step_ms and ratio (cnn_jax's images/s over PyTorch's) to the benchmark's fields; the
flags are the benchmark's.

torch is an optional extra (`pip install -e '.[torch]'`) and is imported only when a
TorchTrainer is made: the rest of cnn_jax, and its tests, never need it.
"""

import functools
import time
from collections.abc import Mapping

import numpy as np

from cnn_jax.errors import UserError
from cnn_jax.models import layers


def _torch():
    try:
        import torch
    except ImportError:
        raise UserError(
            "the PyTorch reference needs PyTorch: pip install -e '.[torch]' (a CPU build is enough)"
        ) from None
    return torch


def _lecun_tanh(torch, x):
    return 1.7159 * torch.tanh(x * (2.0 / 3.0))


def _lenet5(torch, *, channels, num_classes, image_size):
    """LeNet-5 as cnn_jax.models.lenet.LeNet5 builds it: trainable subsampling, Table I C3
    (its 60 kernels scattered into a dense kernel each step), Euclidean RBF output (ten
    classes: the RBF prototypes are the ten digits' bitmaps)."""
    del num_classes, image_size
    nn = torch.nn
    f = torch.nn.functional
    mask = layers.connection_matrix(layers.LENET5_C3_TABLE, 6)
    in_idx, out_idx = (torch.as_tensor(i) for i in np.nonzero(mask))
    prototypes = torch.as_tensor(layers.rbf_prototypes())

    class Subsampling(nn.Module):
        def __init__(self, maps):
            super().__init__()
            self.coefficient = nn.Parameter(torch.empty(maps).uniform_(-0.6, 0.6))
            self.bias = nn.Parameter(torch.zeros(maps))

        def forward(self, x):
            block_sum = f.avg_pool2d(x, 2) * 4.0
            y = block_sum * self.coefficient[:, None, None] + self.bias[:, None, None]
            return _lecun_tanh(torch, y)

    class LeNet5(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(channels, 6, 5)
            self.s2 = Subsampling(6)
            self.c3_kernel = nn.Parameter(torch.empty(len(in_idx), 5, 5).uniform_(-0.03, 0.03))
            self.c3_bias = nn.Parameter(torch.zeros(16))
            self.s4 = Subsampling(16)
            self.c5 = nn.Conv2d(16, 120, 5)
            self.f6 = nn.Linear(120, 84)

        def forward(self, x):
            x = self.s2(_lecun_tanh(torch, self.c1(x)))
            dense = self.c3_kernel.new_zeros(16, 6, 5, 5)
            dense = dense.index_put((out_idx, in_idx), self.c3_kernel)
            x = self.s4(_lecun_tanh(torch, f.conv2d(x, dense, self.c3_bias)))
            x = _lecun_tanh(torch, self.c5(x)).flatten(1)
            x = _lecun_tanh(torch, self.f6(x))
            w = prototypes
            distances = (x * x).sum(-1, keepdim=True) - 2.0 * x @ w.T + (w * w).sum(-1)
            return -distances

    return LeNet5()


def _lenet5_modern(torch, *, channels, num_classes, image_size):
    del image_size
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 120, 5), nn.ReLU(), nn.Flatten(),
        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes),
    )  # fmt: skip


def _alexnet(
    torch,
    *,
    channels,
    num_classes,
    image_size,
    towers=2,
    dropout_rate=0.5,
    width_divisor=1,
    init="paper",
):
    """AlexNet as cnn_jax.models.alexnet builds it on one device: conv2, conv4 and conv5 as
    grouped convolutions (each tower reads its own maps), the paper's LRN within each tower
    (PyTorch divides alpha by the window, so alpha * size is passed), overlapping 3/2 pools,
    cuda-convnet's conv1 arithmetic (3 zero rows/columns bottom/right: 224 -> 55) and
    dropout on fc6/fc7."""
    from cnn_jax.models import alexnet

    del init  # the initialisation does not change a step's time
    nn = torch.nn
    f = torch.nn.functional
    maps = [m * alexnet.TOWERS // width_divisor for m in alexnet.TOWER_MAPS]
    fc_units = alexnet.FC_UNITS // width_divisor
    side = image_size
    (_, pad_end) = alexnet.conv1_padding(side)
    groups = towers

    class TowerLRN(nn.Module):
        def __init__(self):
            super().__init__()
            self.lrn = nn.LocalResponseNorm(size=5, alpha=1e-4 * 5, beta=0.75, k=2.0)

        def forward(self, x):
            return torch.cat([self.lrn(t) for t in x.chunk(groups, dim=1)], dim=1)

    class Conv1Pad(nn.Module):
        def forward(self, x):
            return f.pad(x, (0, pad_end, 0, pad_end))

    features = nn.Sequential(
        Conv1Pad(), nn.Conv2d(channels, maps[0], 11, stride=4), nn.ReLU(), TowerLRN(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(maps[0], maps[1], 5, padding=2, groups=groups), nn.ReLU(), TowerLRN(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(maps[1], maps[2], 3, padding=1), nn.ReLU(),
        nn.Conv2d(maps[2], maps[3], 3, padding=1, groups=groups), nn.ReLU(),
        nn.Conv2d(maps[3], maps[4], 3, padding=1, groups=groups), nn.ReLU(), nn.MaxPool2d(3, 2),
    )  # fmt: skip
    with torch.no_grad():
        flat = features(torch.zeros(1, channels, side, side)).numel()
    p = dropout_rate
    return nn.Sequential(
        features, nn.Flatten(),
        nn.Linear(flat, fc_units), nn.ReLU(), nn.Dropout(p),
        nn.Linear(fc_units, fc_units), nn.ReLU(), nn.Dropout(p),
        nn.Linear(fc_units, num_classes),
    )  # fmt: skip


def _vgg(
    torch, *, channels, num_classes, image_size, variant, batch_norm, dropout_rate, width_divisor
):
    """VGG as cnn_jax.models.vgg builds it for training (`dense=False`): one column of Table 1,
    3x3 convolutions with padding 1 (1x1 with none) and ReLU, batch norm in place of the bias
    where asked, A-LRN's LRN after conv1_1, 2x2 max-pools, the last map averaged to 7x7 (the
    identity at 224), then FC6-FC8 with dropout on FC6 and FC7."""
    del image_size
    from cnn_jax.models import vgg

    nn = torch.nn
    spec = vgg.VARIANTS[vgg.resolve_variant(variant)]
    stack, maps = [], channels
    for b, block in enumerate(spec.blocks, 1):
        for i, (features, kernel) in enumerate(block, 1):
            width = features // width_divisor
            stack.append(nn.Conv2d(maps, width, kernel, padding=kernel // 2, bias=not batch_norm))
            stack += [nn.BatchNorm2d(width, momentum=0.1)] if batch_norm else []
            stack.append(nn.ReLU())
            if spec.lrn_after_first_conv and (b, i) == (1, 1):
                stack.append(nn.LocalResponseNorm(size=5, alpha=1e-4 * 5, beta=0.75, k=2.0))
            maps = width
        stack.append(nn.MaxPool2d(2, 2))
    fc, window = vgg.FC_WIDTH // width_divisor, vgg.FC6_WINDOW
    p = dropout_rate
    return nn.Sequential(
        *stack, nn.AdaptiveAvgPool2d(window), nn.Flatten(),
        nn.Linear(maps * window * window, fc), nn.ReLU(), nn.Dropout(p),
        nn.Linear(fc, fc), nn.ReLU(), nn.Dropout(p),
        nn.Linear(fc, num_classes),
    )  # fmt: skip


# Model name (cnn_jax.models.MODELS) -> builder of the PyTorch module with the same layers:
# builder(torch, *, channels, num_classes, image_size, **the model's own fields).
TORCH_MODELS = {
    "lenet5": _lenet5,
    "lenet5_modern": _lenet5_modern,
    "alexnet": _alexnet,
    "alexnet_single_tower": functools.partial(_alexnet, towers=1),
    "vgg": _vgg,
}


def _loss_fn(torch, loss: str, lenet_map_j: float):
    if loss == "lenet_map":

        def lenet_map(scores, labels):  # cnn_jax.losses.lenet_map
            y_correct = -scores.gather(1, labels[:, None])[:, 0]
            rubbish = scores.new_full((scores.shape[0], 1), -lenet_map_j)
            return (y_correct + torch.logsumexp(torch.cat([rubbish, scores], 1), 1)).mean()

        return lenet_map
    return torch.nn.functional.cross_entropy


class TorchTrainer:
    """One eager training step of the reference model on a fixed random batch.

    `model` names a cnn_jax model and `model_fields` are its own fields (the config's model
    group without `name`); the optimiser is SGD with cnn_jax.optim's momentum, Nesterov and
    weight-decay settings; `loss` is cross_entropy or lenet_map (with its constant j).
    """

    def __init__(
        self,
        model: str,
        *,
        channels: int,
        image_size: int,
        batch_size: int,
        num_classes: int,
        model_fields: Mapping | None = None,
        seed: int = 0,
        optimizer: str = "sgd",
        learning_rate: float = 0.01,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        loss: str = "cross_entropy",
        lenet_map_j: float = 1.0,
    ):
        torch = _torch()
        try:
            build = TORCH_MODELS[model]
        except KeyError:
            raise UserError(
                f"no PyTorch reference for model {model!r}; choose one of: "
                f"{', '.join(sorted(TORCH_MODELS))}"
            ) from None
        if optimizer != "sgd":
            raise UserError(
                f"the PyTorch reference trains with SGD only, not --config.optim.name={optimizer}"
            )
        torch.manual_seed(seed)
        self.torch = torch
        self.model = build(
            torch,
            channels=channels,
            num_classes=num_classes,
            image_size=image_size,
            **(model_fields or {}),
        )
        self.model.train()
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
        )
        self.loss = _loss_fn(torch, loss, lenet_map_j)
        self.images = torch.randn(batch_size, channels, image_size, image_size)
        self.labels = torch.randint(0, num_classes, (batch_size,))

    def step(self) -> float:
        """One step; returns its wall time in seconds (eager: done when the call returns)."""
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.model(self.images), self.labels)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start

    def threads(self) -> int:
        return self.torch.get_num_threads()


def from_trainer(trainer) -> TorchTrainer:
    """The reference of a built cnn_jax.train.Trainer's model, optimiser and batch."""
    config = trainer.config  # the resolved copy the trainer was built from
    return TorchTrainer(
        config.model.name,
        channels=trainer.input_shape[-1],
        image_size=config.input.image_size,
        batch_size=config.input.batch_size,
        num_classes=config.data.num_classes,
        model_fields={
            k: v for k, v in config.model.items() if k not in ("name", "warm_start_from")
        },
        seed=config.run.seed,
        optimizer=config.optim.name,
        learning_rate=config.optim.learning_rate,
        momentum=config.optim.momentum,
        nesterov=config.optim.nesterov,
        weight_decay=config.optim.weight_decay,
        loss=config.loss.name,
        lenet_map_j=config.loss.lenet_map_j,
    )


if __name__ == "__main__":
    from cnn_jax import benchmark

    benchmark.main(reference=from_trainer, doc=__doc__)
