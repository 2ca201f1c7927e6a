"""Where examples come from: a registry of datasets (DATASETS), each read through TFDS, and
`Source`, one of them with its fields (the config's data group) bound.

Every dataset yields {'image': uint8 [H, W, C], 'label': int} examples for one split, already
restricted to this process's shard (each host of a multi-host job reads only its part).
"""

import contextlib
import dataclasses
import io
import os
import socket
from collections.abc import Callable

import jax
import tensorflow as tf
import tensorflow_datasets as tfds

from cnn_jax import paths
from cnn_jax.data import bundled_digits, image_folder
from cnn_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    tfds_name: str  # empty for datasets made in-graph (synthetic)
    train_split: str
    eval_split: str
    channels: int
    num_classes: int
    needs_download: bool = True  # False: prepared from a local or manual source
    note: str = ""
    # True: examples carry the encoded JPEG bytes and the preprocessing op decodes them
    # (cnn_jax.data.preprocess.decoded): a cache then holds compressed images.
    encoded: bool = False


DATASETS: dict[str, DatasetSpec] = {
    "bundled_digits": DatasetSpec("bundled_digits", "train", "test", 1, 10, needs_download=False),
    "mnist": DatasetSpec("mnist", "train", "test", 1, 10),
    "cifar10": DatasetSpec("cifar10", "train", "test", 3, 10),
    "imagenette": DatasetSpec(
        "imagenette/full-size-v2", "train", "validation", 3, 10, encoded=True
    ),
    "imagenet2012": DatasetSpec(
        "imagenet2012",
        "train",
        "validation",
        3,
        1000,
        needs_download=False,
        note="download ILSVRC2012_img_{train,val}.tar from image-net.org into "
        "--config.data.manual_dir (tfds prepares it once)",
        encoded=True,
    ),
    "synthetic": DatasetSpec("", "train", "test", 3, 0, needs_download=False),
    # The user's own images, --config.data.manual_dir=ROOT/SPLIT/CLASS/*.jpg (image_folder.py);
    # classes come from the folder names.
    "image_folder": DatasetSpec("", "train", "eval", 3, 0, needs_download=False, encoded=True),
}

# A host TFDS downloads from; probing it first turns a minutes-long retry loop on a machine
# without network into an immediate, clear error.
_DOWNLOAD_PROBE_HOST = ("storage.googleapis.com", 443)


def _network_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(_DOWNLOAD_PROBE_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


@dataclasses.dataclass(frozen=True)
class Source:
    """A dataset with its fields bound: the config's data group (cnn_jax/defaults.py), plus
    the side synthetic images are made at. Construction makes the checks that need no
    download or decoding, so a bad field is one UserError line before anything compiles."""

    name: str
    data_dir: str = ""  # TFDS data_dir; empty: $TFDS_DATA_DIR or ~/tensorflow_datasets
    manual_dir: str = ""  # TFDS manual_dir (imagenet2012), or an image_folder's root
    num_classes: int = 10  # synthetic data's classes (real datasets have their own)
    synthetic_train_size: int = 1024
    synthetic_eval_size: int = 256
    synthetic_channels: int = 3
    image_size: int = 32  # synthetic images' side

    def __post_init__(self):
        if self.name not in DATASETS:
            raise UserError(f"unknown dataset {self.name!r}; choose one of: {', '.join(DATASETS)}")
        if self.data_dir:
            paths.existing_directory(self.data_dir, "--config.data.data_dir")
        manual_dir = os.path.expanduser(self.manual_dir)
        if manual_dir and os.path.isfile(manual_dir):  # a missing one: where it is needed
            raise UserError(f"--config.data.manual_dir={manual_dir} is a file, not a directory")
        if self.name == "synthetic":
            for field in ("synthetic_train_size", "synthetic_eval_size", "synthetic_channels"):
                if not getattr(self, field) > 0:
                    raise UserError(f"--config.data.{field}={getattr(self, field)} must be > 0")
            if not self.image_size > 0:
                raise UserError(f"--config.input.image_size={self.image_size} must be > 0")
        if self.name == "image_folder":
            image_folder.check(image_folder.root_of(self.manual_dir))
        if self.name in ("synthetic", "image_folder") and self.classes < 2:
            raise UserError(
                f"{self.classes_flag}: a classifier needs at least 2 classes (with 1, every "
                "prediction is right whatever the model learns)"
            )

    @property
    def spec(self) -> DatasetSpec:
        return DATASETS[self.name]

    @property
    def channels(self) -> int:
        """The dataset's image channels; the model's are cnn_jax.data.pipeline.input_channels
        (preprocessing converts grey to RGB or RGB to luminance where its op needs it)."""
        return self.synthetic_channels if self.name == "synthetic" else self.spec.channels

    @property
    def classes(self) -> int:
        """The dataset's own class count: its spec's, an image folder's class folders, or
        num_classes for synthetic data."""
        if self.spec.num_classes:
            return self.spec.num_classes
        if self.name == "image_folder":
            return len(image_folder.class_names(self._root))
        return self.num_classes

    @property
    def classes_flag(self) -> str:
        """What sets the class count, as the start of an error line about it."""
        if self.name == "synthetic":
            return f"--config.data.num_classes={self.num_classes}"
        if self.name == "image_folder":
            return (
                f"--config.data.manual_dir={self.manual_dir} holds {self.classes} class folder(s)"
            )
        return f"--config.data.name={self.name} has {self.classes} classes"

    @property
    def _root(self) -> str:
        return image_folder.root_of(self.manual_dir)

    def _data_dir(self) -> str | None:
        return (
            os.path.expanduser(self.data_dir)
            if self.data_dir
            else os.environ.get("TFDS_DATA_DIR") or None
        )

    def prepared_builder(self) -> tfds.core.DatasetBuilder:
        """The TFDS builder of this dataset, prepared (downloaded and converted) if needed.

        Raises UserError with one actionable line when the data cannot be had.
        """
        spec, data_dir = self.spec, self._data_dir()
        if spec.tfds_name == "bundled_digits":
            builder = bundled_digits.BundledDigits(data_dir=data_dir)
        else:
            builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
        if builder.is_prepared():
            return builder
        where = builder.data_dir
        if spec.needs_download and not _network_reachable():
            raise UserError(
                f"dataset {self.name!r} is not in {where} and cannot be downloaded (no network): "
                "use --config.data.name=bundled_digits (ships with the package) or synthetic, or "
                "point --config.data.data_dir at a prepared TFDS copy"
            )
        manual_dir = os.path.expanduser(self.manual_dir)
        if spec.note and not (os.path.isdir(manual_dir) and os.listdir(manual_dir)):
            given = (
                f" (--config.data.manual_dir={manual_dir} is empty or missing)"
                if manual_dir
                else ""
            )
            raise UserError(f"dataset {self.name!r} is not prepared in {where}{given}: {spec.note}")
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
        if jax.process_index() == 0:
            print(f"data: preparing {self.name!r} in {where} (once; later runs reuse it)")
        made = _missing_dirs(where)
        try:
            # TFDS prints its own progress bars and banners on stdout; the line above says it.
            tfds.disable_progress_bar()
            with contextlib.redirect_stdout(io.StringIO()):
                builder.download_and_prepare(download_config=download_config)
        except Exception as e:  # any failure to fetch or convert is a data problem, not a bug
            for path in made:  # leave no empty dataset folders behind that look prepared
                with contextlib.suppress(OSError):
                    os.rmdir(path)  # only if empty
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"could not prepare dataset {self.name!r} in {where}: {first}") from e
        return builder

    def num_examples(self, split: str) -> int:
        """Examples in the whole split ('train' or 'eval'; all processes together)."""
        if self.name == "synthetic":
            return self.synthetic_train_size if split == "train" else self.synthetic_eval_size
        if self.name == "image_folder":
            return image_folder.num_examples(self._root, split)
        return self.prepared_builder().info.splits[self._split_name(split)].num_examples

    def _split_name(self, split: str) -> str:
        return self.spec.train_split if split == "train" else self.spec.eval_split

    def example_names(self, split: str) -> list[str]:
        """What identifies each example of the whole `split`, in its fixed order (the order
        process_examples' shares follow, process 0's first): an image folder's file paths;
        elsewhere "SPLIT[i]", the TFDS split and the example's index in it
        (`tfds.load(name, split="test[17:18]")` reads "test[17]")."""
        if self.name == "image_folder":
            return list(image_folder.file_paths(self._root, split))
        name = self._split_name(split)
        return [f"{name}[{i}]" for i in range(self.num_examples(split))]

    def process_examples(self, split: str) -> tf.data.Dataset:
        """This process's shard of `split` ('train' or 'eval') as image / int32 label dicts, in
        a fixed order (shuffling is the pipeline's job, seeded per epoch). The image is uint8
        [H, W, C], or its encoded bytes for datasets whose spec says `encoded`."""
        if self.name == "synthetic":
            return self._synthetic(split)
        if self.name == "image_folder":
            return image_folder.process_examples(self._root, split)
        builder = self.prepared_builder()
        split_name = tfds.split_for_jax_process(self._split_name(split), drop_remainder=False)
        read_config = tfds.ReadConfig(shuffle_seed=0, interleave_cycle_length=1)
        decoders = {"image": tfds.decode.SkipDecoding()} if self.spec.encoded else None
        ds = builder.as_dataset(
            split=split_name, shuffle_files=False, read_config=read_config, decoders=decoders
        )
        return ds.map(
            lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)},
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    def process_keys(self, split: str) -> tuple[tf.data.Dataset, Callable | None]:
        """What the training pipeline shuffles: (keys, read), process_examples(split) being
        keys.map(read) in the same order. An image folder's keys are its file paths, so the
        shuffle buffer holds paths and only the shuffled files are read; elsewhere the keys
        are the examples themselves and read is None."""
        if self.name == "image_folder":
            return image_folder.process_keys(self._root, split), image_folder.read_example
        return self.process_examples(split), None

    def _synthetic(self, split: str) -> tf.data.Dataset:
        """Random images and labels of any shape, made in-graph from the example index: the
        same index always gives the same example, on any host."""
        total = self.num_examples(split)
        per_process = total // jax.process_count()
        start = jax.process_index() * per_process
        size, channels, classes = self.image_size, self.synthetic_channels, self.num_classes
        split_seed = 0 if split == "train" else 1

        @tf.autograph.experimental.do_not_convert  # plain tf ops; nothing for AutoGraph to rewrite
        def make(i):
            seed = tf.stack([tf.cast(split_seed, tf.int64), i])
            image = tf.random.stateless_uniform(
                [size, size, channels], seed=seed, minval=0, maxval=256, dtype=tf.int32
            )
            label = tf.random.stateless_uniform(
                [], seed=seed + 1, minval=0, maxval=classes, dtype=tf.int32
            )
            return {"image": tf.cast(image, tf.uint8), "label": label}

        return tf.data.Dataset.range(start, start + per_process).map(make)


def _missing_dirs(path: str) -> list[str]:
    """`path` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while path and not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing
