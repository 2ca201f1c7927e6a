"""Where examples come from: a registry of datasets, each read through TFDS.

Every dataset yields {'image': uint8 [H, W, C], 'label': int} examples for one split, already
restricted to this process's shard (each host of a multi-host job reads only its part).
"""

import contextlib
import dataclasses
import io
import os
import socket

import jax
import tensorflow as tf
import tensorflow_datasets as tfds

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
        "--config.manual_dir (tfds prepares it once)",
        encoded=True,
    ),
    "synthetic": DatasetSpec("", "train", "test", 3, 0, needs_download=False),
    # The user's own images, --config.manual_dir=ROOT/SPLIT/CLASS/*.jpg (see image_folder.py);
    # classes come from the folder names.
    "image_folder": DatasetSpec("", "train", "eval", 3, 0, needs_download=False, encoded=True),
}

# A host TFDS downloads from; probing it first turns a minutes-long retry loop on a machine
# without network into an immediate, clear error.
_DOWNLOAD_PROBE_HOST = ("storage.googleapis.com", 443)


def dataset_spec(config) -> DatasetSpec:
    try:
        return DATASETS[config.dataset]
    except KeyError:
        raise UserError(
            f"unknown dataset {config.dataset!r}; choose one of: {', '.join(DATASETS)}"
        ) from None


def num_channels(config) -> int:
    """The dataset's image channels; the model's are pipeline.input_channels (preprocessing
    converts grey to RGB or RGB to luminance where its op needs it)."""
    spec = dataset_spec(config)
    return config.synthetic_channels if config.dataset == "synthetic" else spec.channels


def _network_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(_DOWNLOAD_PROBE_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def _data_dir(config) -> str | None:
    return config.data_dir or os.environ.get("TFDS_DATA_DIR") or None


def prepared_builder(config) -> tfds.core.DatasetBuilder:
    """The TFDS builder for config.dataset, prepared (downloaded and converted) if needed.

    Raises UserError with one actionable line when the data cannot be had.
    """
    spec = dataset_spec(config)
    data_dir = _data_dir(config)
    if config.data_dir and not os.path.isdir(config.data_dir):
        raise UserError(f"--config.data_dir={config.data_dir} does not exist")
    if spec.tfds_name == "bundled_digits":
        builder = bundled_digits.BundledDigits(data_dir=data_dir)
    else:
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    where = builder.data_dir
    if spec.needs_download and not _network_reachable():
        raise UserError(
            f"dataset {config.dataset!r} is not in {where} and cannot be downloaded (no network): "
            "use --config.dataset=bundled_digits (ships with the package) or synthetic, or point "
            "--config.data_dir at a prepared TFDS copy"
        )
    manual_dir = config.manual_dir  # `~` already expanded (paths.expand_config_paths)
    if spec.note and not (os.path.isdir(manual_dir) and os.listdir(manual_dir)):
        given = f" (--config.manual_dir={manual_dir} is empty or missing)" if manual_dir else ""
        raise UserError(
            f"dataset {config.dataset!r} is not prepared in {where}{given}: {spec.note}"
        )
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    if jax.process_index() == 0:
        print(f"data: preparing {config.dataset!r} in {where} (once; later runs reuse it)")
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
        raise UserError(f"could not prepare dataset {config.dataset!r} in {where}: {first}") from e
    return builder


def _missing_dirs(path: str) -> list[str]:
    """`path` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while path and not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def num_examples(config, split: str) -> int:
    """Examples in the whole split (all processes together)."""
    if config.dataset == "synthetic":
        return config.synthetic_train_size if split == "train" else config.synthetic_eval_size
    if config.dataset == "image_folder":
        return image_folder.num_examples(config, split)
    return prepared_builder(config).info.splits[_split_name(config, split)].num_examples


def _split_name(config, split: str) -> str:
    spec = dataset_spec(config)
    return spec.train_split if split == "train" else spec.eval_split


def process_examples(config, split: str) -> tf.data.Dataset:
    """This process's shard of `split` ('train' or 'eval') as image / int32 label dicts, in a
    fixed order (shuffling is the pipeline's job, seeded per epoch). The image is uint8
    [H, W, C], or its encoded bytes for datasets whose spec says `encoded`."""
    if config.dataset == "synthetic":
        return _synthetic(config, split)
    if config.dataset == "image_folder":
        return image_folder.process_examples(config, split)
    builder = prepared_builder(config)
    split_name = tfds.split_for_jax_process(_split_name(config, split), drop_remainder=False)
    read_config = tfds.ReadConfig(shuffle_seed=0, interleave_cycle_length=1)
    decoders = {"image": tfds.decode.SkipDecoding()} if dataset_spec(config).encoded else None
    ds = builder.as_dataset(
        split=split_name, shuffle_files=False, read_config=read_config, decoders=decoders
    )
    return ds.map(
        lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)},
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def _synthetic(config, split: str) -> tf.data.Dataset:
    """Random images and labels of any shape, made in-graph from the example index: the same
    index always gives the same example, on any host."""
    total = num_examples(config, split)
    per_process = total // jax.process_count()
    start = jax.process_index() * per_process
    size, channels, classes = config.image_size, config.synthetic_channels, config.num_classes
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


def resolve_dataset_fields(config) -> None:
    """Fill the fields a real dataset defines (num_classes) into the config, in place."""
    spec = dataset_spec(config)
    if spec.num_classes:
        config.num_classes = spec.num_classes
    elif config.dataset == "image_folder":
        config.num_classes = len(image_folder.class_names(config))
