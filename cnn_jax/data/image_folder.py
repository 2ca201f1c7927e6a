"""`image_folder`: the user's own images, laid out as ROOT/SPLIT/CLASS/*.{jpg,jpeg,png} and
found through TFDS's folder builder (`tfds.ImageFolder`), ROOT being --config.data.manual_dir
(`root_of`); every function here takes ROOT.

Classes are the sorted class-folder names of the `train` split: a class folder there without a
readable image, or a class folder of the evaluation split that train lacks (its images could
never be predicted right), is a UserError naming it. Training reads the `train` split;
evaluation the first of `validation`, `val`, `test` that exists. Hidden files and folders
(names starting with '.': .DS_Store, macOS's ._name.jpg, .ipynb_checkpoints) are ignored.
`check` makes the checks that need no decoding as soon as the dataset is chosen
(cnn_jax.data.datasets.Source), before anything compiles.

Bad files. A JPEG that is truncated or is not an image at all would stop a tf.data pipeline
in the middle of an epoch. So each split is scanned once, when a run first asks for it: every
file is read and decoded (in parallel, by the same TensorFlow decoder the preprocessing ops
use), and the run reads only the files that decoded. Files that cannot be read as images,
those that fail and those the folder builder does not list (.gif, .webp, .bmp, .txt, ...),
are counted and reported once with their paths. Examples carry the encoded bytes; the
preprocessing op decodes them (cnn_jax.data.preprocess.decoded), so a cache holds compressed
images.

Every process scans the whole split (its counts define steps per epoch for all of them) and
then reads its own contiguous share.
"""

import dataclasses
import functools
import os
import sys

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cnn_jax import paths
from cnn_jax.errors import UserError

EVAL_SPLIT_NAMES = ("validation", "val", "test")
# What tfds.ImageFolder lists; any other file in a class folder is reported as unreadable.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# A report lists at most this many paths (and says how many more there are).
MAX_REPORTED_PATHS = 100

_LAYOUT = "ROOT/SPLIT/CLASS/*.jpg"


@dataclasses.dataclass(frozen=True)
class ScannedSplit:
    paths: tuple[str, ...]  # files that decode, in the folder builder's fixed order
    labels: tuple[int, ...]  # indices into class_names
    bad_paths: tuple[str, ...]  # files that cannot be read as images (skipped)


def root_of(manual_dir: str) -> str:
    """The folder --config.data.manual_dir names, `~` expanded; UserError unless it is one."""
    if not manual_dir:
        raise UserError(
            "--config.data.name=image_folder needs --config.data.manual_dir=ROOT with images in "
            f"{_LAYOUT}"
        )
    return paths.existing_directory(manual_dir, "--config.data.manual_dir")


@functools.cache
def _builder(root: str) -> tfds.ImageFolder:
    return tfds.ImageFolder(root)


def _split_name(root: str, split: str) -> str:
    """'train' or 'eval' -> the folder name of that split under root."""
    found = set(_builder(root).info.splits.keys())
    wanted = ("train",) if split == "train" else EVAL_SPLIT_NAMES
    for name in wanted:
        if name in found:
            return name
    raise UserError(
        f"--config.data.manual_dir={root} has no {' / '.join(wanted)} split with images "
        f"(found: {', '.join(sorted(found)) or 'none'}); expected {_LAYOUT}"
    )


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _class_folders(root: str, split_name: str) -> list[str]:
    split_dir = os.path.join(root, split_name)
    names = os.listdir(split_dir) if os.path.isdir(split_dir) else []
    return sorted(n for n in names if _visible(n) and os.path.isdir(os.path.join(split_dir, n)))


def _class_files(root: str, split_name: str) -> list[str]:
    """Every visible file in the split's class folders: what the user expects to be read."""
    paths = []
    for name in _class_folders(root, split_name):
        folder = os.path.join(root, split_name, name)
        paths += [
            os.path.join(folder, f)
            for f in sorted(os.listdir(folder))
            if _visible(f) and os.path.isfile(os.path.join(folder, f))
        ]
    return paths


def class_names(root: str) -> list[str]:
    """The label space: the train split's class folders, sorted."""
    return _class_folders(root, "train")


def _image_count(folder: str) -> int:
    walk = os.walk(folder)
    return sum(f.lower().endswith(IMAGE_EXTENSIONS) for *_, files in walk for f in files)


def check(root: str) -> None:
    """The layout, before a run reads anything: a train split, no split folder without images
    (TFDS's folder builder fails deep inside tf.data on an empty one), an evaluation split
    (checked now, not when the first evaluation opens it, so that a wrong name stops the run
    before it trains), eval classes that train has, and at least 2 classes."""
    names = sorted(os.listdir(root))
    splits = [n for n in names if _visible(n) and os.path.isdir(os.path.join(root, n))]
    empty = [name for name in splits if not _image_count(os.path.join(root, name))]
    if "train" not in splits or empty:
        where = ", ".join(os.path.join(root, s) for s in empty) or os.path.join(root, "train")
        raise UserError(
            f"--config.data.manual_dir={root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in "
            f"{where}; expected {_LAYOUT} with a train split"
        )
    if not set(splits) & set(EVAL_SPLIT_NAMES):
        raise UserError(
            f"--config.data.manual_dir={root} has no {' / '.join(EVAL_SPLIT_NAMES)} split to "
            f"evaluate on (found: {', '.join(splits)}); expected {_LAYOUT}"
        )
    check_eval_classes(root)


def check_eval_classes(root: str) -> None:
    """Every class folder of the evaluation split is one of train's: the model's outputs are
    train's classes, so an eval-only class's images would count as errors whatever it does."""
    split_name = _split_name(root, "eval")
    extra = sorted(set(_class_folders(root, split_name)) - set(_class_folders(root, "train")))
    if extra:
        folders = ", ".join(os.path.join(root, split_name, name) for name in extra)
        raise UserError(
            f"--config.data.manual_dir={root}: {folders} has no class folder of the same name in "
            f"{os.path.join(root, 'train')} (the classes are train's folders, so its images "
            "could never be predicted right): add it there or remove it"
        )


def _decodes(example):
    """Keeps (filename, label) of an example whose bytes decode; a failure raises, and the
    scan's ignore_errors drops the element."""
    image = tf.io.decode_image(example["image"], channels=3, expand_animations=False)
    tf.debugging.assert_positive(tf.size(image))
    return example["image/filename"], example["label"]


@functools.cache
def scan(root: str, split_name: str) -> ScannedSplit:
    """Decode every file of one split once; report the ones that cannot be read (once per
    process). Labels are indices into train's class folders."""
    if split_name != "train":
        check_eval_classes(root)
    builder = _builder(root)
    ds = builder.as_dataset(split=split_name, decoders={"image": tfds.decode.SkipDecoding()})
    ds = ds.map(_decodes, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # The builder also lists hidden files and folders; those are dropped here, unreported.
    listed = _class_files(root, split_name)
    wanted = set(listed)
    builder_names = builder.info.features["label"].names
    classes = _class_folders(root, "train")
    index = {name: i for i, name in enumerate(classes)}
    good = [
        (path.decode(), index[builder_names[label]])
        for path, label in ds.ignore_errors().as_numpy_iterator()
        if path.decode() in wanted
    ]
    paths = tuple(path for path, _ in good)
    labels = tuple(label for _, label in good)
    bad = tuple(sorted(wanted - set(paths)))
    if bad and jax.process_index() == 0:
        shown = "\n  ".join(bad[:MAX_REPORTED_PATHS])
        more = len(bad) - MAX_REPORTED_PATHS
        extra = f"\n  ... and {more} more" if more > 0 else ""
        print(
            f"image_folder: skipping {len(bad)} of {len(listed)} files in "
            f"{os.path.join(root, split_name)} that cannot be read as images (not "
            f"{'/'.join(IMAGE_EXTENSIONS)}, or do not decode):\n  {shown}{extra}",
            file=sys.stderr,
        )
    if not paths:
        raise UserError(
            f"--config.data.manual_dir={root}: split {split_name!r} has no readable images "
            f"({len(bad)} unreadable files); expected {_LAYOUT}"
        )
    if split_name == "train":
        seen = set(labels)
        empty = [os.path.join(root, split_name, c) for i, c in enumerate(classes) if i not in seen]
        if empty:
            raise UserError(
                f"--config.data.manual_dir={root}: class folder {', '.join(empty)} has no readable "
                f"image ({', '.join(IMAGE_EXTENSIONS)} that decodes): add images or remove it"
            )
    return ScannedSplit(paths, labels, bad)


def _scanned(root: str, split: str) -> ScannedSplit:
    if not sum(info.num_examples for info in _builder(root).info.splits.values()):
        raise UserError(f"--config.data.manual_dir={root} contains no images; expected {_LAYOUT}")
    return scan(root, _split_name(root, split))


def num_examples(root: str, split: str) -> int:
    """Decodable examples in the whole split (all processes together)."""
    return len(_scanned(root, split).paths)


def file_paths(root: str, split: str) -> tuple[str, ...]:
    """The readable files of the whole split in their fixed order: example i is file i
    (process_examples hands each process a contiguous run of them)."""
    return _scanned(root, split).paths


def process_keys(root: str, split: str) -> tf.data.Dataset:
    """This process's share of `split` as {'image': the file's path, 'label': int32}: what
    the training pipeline shuffles, a few dozen bytes an example, before read_example reads
    the shuffled files. Shuffling the files' bytes instead would hold the whole split in the
    shuffle buffer (ImageNet's: ~140 GB) and read all of it before the first batch."""
    scanned = _scanned(root, split)
    bounds = np.linspace(0, len(scanned.paths), jax.process_count() + 1).astype(int)
    lo, hi = bounds[jax.process_index()], bounds[jax.process_index() + 1]
    return tf.data.Dataset.from_tensor_slices(
        {
            "image": tf.constant(scanned.paths[lo:hi], tf.string, shape=[hi - lo]),
            "label": tf.constant(scanned.labels[lo:hi], tf.int32, shape=[hi - lo]),
        }
    )


def read_example(key: dict) -> dict:
    """A process_keys element -> {'image': the file's encoded bytes, 'label': int32}."""
    return {"image": tf.io.read_file(key["image"]), "label": key["label"]}


def process_examples(root: str, split: str) -> tf.data.Dataset:
    """This process's share of `split` as {'image': encoded bytes, 'label': int32}."""
    keys = process_keys(root, split)
    return keys.map(read_example, num_parallel_calls=tf.data.AUTOTUNE)
