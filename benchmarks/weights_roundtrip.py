"""Full-size round trip of `python -m cnn_jax.weights import`: the source framework's logits
against cnn_jax's on the same images, for torchvision- and Keras-layout VGGs.

    python benchmarks/weights_roundtrip.py                       # all, 224 px, 2 images
    python benchmarks/weights_roundtrip.py --models=vgg16,keras_vgg16 --side=256

Each model is built in its framework at full width with random weights (torch: torchvision's
VGG module layout and initialisation, with random batch-norm statistics; Keras:
keras.applications.VGG16/VGG19(weights=None) itself), saved as that framework saves it,
imported into a fresh workdir by cnn_jax.weights.importer (exactly what the command line
does), read back from the workdir's checkpoint, and run by cnn_jax on the images less the
mean the checkpoint records. The source sees the same images through its own preprocessing
(torchvision's ((x / 255) - mean) / std; Keras' vgg16.preprocess_input). One JSON line per
model: max |cnn_jax - source| / max |source| over the logits, whether the top-1 classes agree,
and the times. torch and keras are optional extras; a model whose framework is missing is
skipped with a line saying so. Needs ~4 GB of memory for VGG-19.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

from cnn_jax import checkpoint, cli
from cnn_jax.models import vgg
from cnn_jax.weights import importer, metadata, torchvision

TORCH_MODELS = {
    "vgg11": ("A", False),
    "vgg13": ("B", False),
    "vgg16": ("D", False),
    "vgg19": ("E", False),
    "vgg11_bn": ("A", True),
    "vgg13_bn": ("B", True),
    "vgg16_bn": ("D", True),
    "vgg19_bn": ("E", True),
}
KERAS_MODELS = {"keras_vgg16": "VGG16", "keras_vgg19": "VGG19"}
DEFAULT = "vgg11,vgg16,vgg19,vgg16_bn,keras_vgg16"


def torch_vgg(torch, letter: str, bn: bool):
    """torchvision.models.vgg's module layout and _initialize_weights, without torchvision."""
    nn = torch.nn
    layers, maps_in = [], 3
    for block in vgg.VARIANTS[letter].blocks:
        for maps, _ in block:
            layers += [nn.Conv2d(maps_in, maps, 3, padding=1)]
            layers += [nn.BatchNorm2d(maps)] if bn else []
            layers += [nn.ReLU(inplace=True)]
            maps_in = maps
        layers.append(nn.MaxPool2d(2, 2))

    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(512 * 7 * 7, 4096),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(4096, 4096),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(4096, 1000),
            )

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    model = VGG()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.normal_(m.bias, 0, 0.01)  # torchvision: 0; nonzero so the bias fold counts
        elif isinstance(m, nn.BatchNorm2d):  # trained-looking statistics, not 0 and 1
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.normal_(m.bias, 0, 0.01)
    return model.eval()


def torch_case(name: str, images: np.ndarray, folder: str):
    import torch

    torch.manual_seed(0)
    letter, bn = TORCH_MODELS[name]
    model = torch_vgg(torch, letter, bn)
    path = os.path.join(folder, f"{name}.pth")
    torch.save(model.state_dict(), path)
    x = (images / 255.0 - np.array(torchvision.MEAN)) / np.array(torchvision.STD)
    with torch.no_grad():
        logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))).numpy()
    return "torchvision", path, logits


def keras_case(name: str, images: np.ndarray, folder: str):
    import keras

    model = getattr(keras.applications, KERAS_MODELS[name])(
        weights=None, classifier_activation=None
    )
    path = os.path.join(folder, f"{name}.weights.h5")
    model.save_weights(path)
    module = keras.applications.vgg16 if name.endswith("16") else keras.applications.vgg19
    logits = np.asarray(model(module.preprocess_input(images.copy()), training=False))
    return "keras", path, logits


def cnn_jax_logits(workdir: str, images: np.ndarray):
    """The imported checkpoint, read back from the workdir, on the images less its mean."""
    record = metadata.read(workdir)
    m = record["model"]

    def select(saved):
        return {k: checkpoint.on_one_device(saved[k]) for k in ("params", "batch_stats")}

    _, variables = checkpoint.read_newest(workdir, select, flag="--workdir")
    model = vgg.VGG(variant=m["variant"], num_classes=m["num_classes"], batch_norm=m["batch_norm"])
    variables = {k: v for k, v in variables.items() if v}
    x = np.asarray(images - np.array(record["mean_rgb"]), np.float32)
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


def measure(name: str, images: np.ndarray, folder: str) -> dict:
    began = time.perf_counter()
    case = torch_case if name in TORCH_MODELS else keras_case
    source, path, want = case(name, images, folder)
    built = time.perf_counter()
    workdir = os.path.join(folder, f"{name}_workdir")
    facts, _ = importer.import_weights(source, path, workdir)
    imported = time.perf_counter()
    got = cnn_jax_logits(workdir, images)
    done = time.perf_counter()
    diff = np.abs(got.astype(np.float64) - want)
    shutil.rmtree(workdir)
    os.remove(path)
    return {
        "model": name,
        "source": source,
        "network": facts.describe(),
        "side": images.shape[1],
        "images": len(images),
        "max_relative_logit_difference": float(diff.max() / np.abs(want).max()),
        "max_abs_logit_difference": float(diff.max()),
        "max_abs_logit": float(np.abs(want).max()),
        "top1_agrees": bool((got.argmax(-1) == want.argmax(-1)).all()),
        "seconds": {
            "source_build_and_save": round(built - began, 1),
            "import": round(imported - built, 1),
            "cnn_jax_forward": round(done - imported, 1),
        },
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=DEFAULT, help=f"comma-separated; default {DEFAULT}")
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--images", type=int, default=2)
    args = parser.parse_args(argv)
    cli.setup_runtime()
    images = np.random.default_rng(0).uniform(0, 255, (args.images, args.side, args.side, 3))
    images = images.astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            if name not in TORCH_MODELS and name not in KERAS_MODELS:
                sys.exit(f"error: unknown model {name!r}")
            framework = "torch" if name in TORCH_MODELS else "keras"
            try:
                __import__(framework)
            except ImportError:
                print(json.dumps({"model": name, "skipped": f"{framework} is not installed"}))
                continue
            print(json.dumps(measure(name, images, folder)), flush=True)


if __name__ == "__main__":
    main()
