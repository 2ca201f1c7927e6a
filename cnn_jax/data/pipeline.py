"""tf.data pipelines that turn a dataset into global, sharded jax.Array batches.

Every function takes the dataset (datasets.Source), the preprocessing (preprocess.Preprocessing)
and the few numbers it needs, as arguments.

Order of operations (the flax ImageNet example's): cache -> shuffle -> map -> batch ->
prefetch. Two choices beyond it:

- Determinism by step. Epoch e is shuffled with a seed made from (seed, e) and every
  example's augmentation is seeded with (seed, e, position), so batch number s is a pure
  function of s. A resumed run rebuilds the pipeline at its step and sees exactly the batches an
  uninterrupted run would: no iterator state needs checkpointing.
- Evaluation sees every example once: the last batch is padded with mask=0 examples, and all
  processes run the same number of eval steps.
"""

import collections
import math
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf

from cnn_jax.data import preprocess
from cnn_jax.data.datasets import Source
from cnn_jax.data.preprocess import Preprocessing
from cnn_jax.errors import UserError


def steps_per_epoch(source: Source, batch_size: int) -> int:
    return source.num_examples("train") // batch_size


def eval_steps(source: Source, batch_size: int) -> int:
    per_process = math.ceil(source.num_examples("eval") / jax.process_count())
    return math.ceil(per_process / local_batch_size(batch_size))


def local_batch_size(batch_size: int) -> int:
    return batch_size // jax.process_count()


def input_channels(source: Source, prep: Preprocessing) -> int:
    """Channels of the model input: what the op makes of the dataset's images
    (Preprocessing.channels). The pipeline, the model's initialisation, the summary and the
    benchmark all take it from here. Grey and RGB images convert to an op's fixed count;
    other counts (only synthetic data has them) are a UserError."""
    have, convertible = source.channels, preprocess.CONVERTIBLE_CHANNELS
    if prep.spec.input_channels is not None and have not in convertible:
        raise UserError(
            f"--config.input.preprocess={prep.name} takes images with "
            f"{' or '.join(map(str, convertible))} channels (dataset {source.name!r} has "
            f"{have}); use --config.input.preprocess=scale_to_unit for other counts"
        )
    return prep.channels(have)


def channel_note(source: Source, prep: Preprocessing) -> str | None:
    """The one line a run prints when its images change channels on the way in, else None."""
    have, want = source.channels, input_channels(source, prep)
    if have == want:
        return None
    into = "RGB (grey replicated)" if want == 3 else "luminance (ITU-R 601 luma)"
    return (
        f"data: {source.name} has {have} channel{'s' if have > 1 else ''}; converted to "
        f"{into} for --config.input.preprocess={prep.name}"
    )


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = 0  # share TF's pool; JAX owns the cores
    return options


def check_shuffle_buffer(shuffle_buffer: int) -> None:
    if shuffle_buffer < 0:
        raise UserError(f"--config.input.shuffle_buffer={shuffle_buffer} must be >= 0")


def train_dataset(
    source: Source,
    prep: Preprocessing,
    *,
    batch_size: int,
    seed: int,
    cache: bool,
    shuffle_buffer: int,
    start_step: int = 0,
) -> tf.data.Dataset:
    """This process's training batches from global step `start_step` on, forever.
    shuffle_buffer 0: the whole (per-process) split; cache: keep the examples in memory."""
    check_shuffle_buffer(shuffle_buffer)
    spe = steps_per_epoch(source, batch_size)
    local_batch = local_batch_size(batch_size)
    examples = source.process_examples("train")
    if cache:
        examples = examples.cache()
    buffer = shuffle_buffer or spe * local_batch
    size, channels = prep.image_size, input_channels(source, prep)

    def one_epoch(epoch):
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])

        def prepare(position, ex):
            example_seed = tf.stack([epoch_seed[0] * 1_000_003 + epoch_seed[1], position])
            image = prep.train(ex["image"], example_seed)
            return {"image": tf.ensure_shape(image, [size, size, channels]), "label": ex["label"]}

        shuffle_seed = epoch_seed[0] * 7919 + epoch_seed[1]
        ds = examples.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        if prep.spec.batched:
            ds = ds.enumerate().batch(local_batch, drop_remainder=True).take(spe)
            batched = lambda p, ex: tf.vectorized_map(lambda a: prepare(*a), (p, ex))
            return ds.map(batched, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(local_batch, drop_remainder=True).take(spe)

    start_epoch, offset = divmod(start_step, spe)
    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(one_epoch)
    return ds.skip(offset).prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_dataset(
    source: Source, prep: Preprocessing, views: dict, *, batch_size: int, cache: bool
) -> tf.data.Dataset:
    """This process's eval batches, padded with mask=0 examples to eval_steps() batches.

    `views` names the image fields: batch key -> the side of the square prep.square makes
    (ten_crop: {"image": prep.ten_crop_side}; dense: one preprocess.dense_key(q) per scale),
    or None for the op's own centre view at image_size ({"image": None})."""
    local_batch = local_batch_size(batch_size)
    channels = input_channels(source, prep)
    sides = {k: prep.image_size if side is None else side for k, side in views.items()}

    def prepare(ex):
        images = prep.views(ex["image"], views)
        images = {k: tf.ensure_shape(v, [sides[k], sides[k], channels]) for k, v in images.items()}
        return {**images, "label": ex["label"], "mask": tf.constant(1.0)}

    examples = source.process_examples("eval")
    # Squares larger than the crop take memory per image (dense at 256/384/512: 5.6 MB each):
    # with any of them, cache the examples, not the views.
    cache_views = cache and all(side is None for side in views.values())
    if cache and not cache_views:
        examples = examples.cache()
    ds = examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    padding = tf.data.Dataset.from_tensors(
        {
            **{k: tf.zeros([side, side, channels], tf.float32) for k, side in sides.items()},
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(0.0),
        }
    ).repeat()
    ds = ds.concatenate(padding).take(eval_steps(source, batch_size) * local_batch)
    if cache_views:
        ds = ds.cache()
    return ds.batch(local_batch).prefetch(tf.data.AUTOTUNE).with_options(_options())


def global_batches(ds: tf.data.Dataset, sharding, global_batch: int, depth: int = 2) -> Iterator:
    """Assemble each process's numpy batch into one global jax.Array batch (sharded over the
    mesh's data axis), keeping `depth` batches in flight on the devices ahead of the step."""

    def to_global(local):
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(
                sharding, x, (global_batch, *x.shape[1:])
            ),
            local,
        )

    queue = collections.deque()
    for local in ds.as_numpy_iterator():
        queue.append(to_global(local))
        if len(queue) > depth:
            yield queue.popleft()
    yield from queue
