"""tf.data pipelines that turn a dataset into global, sharded jax.Array batches.

Order of operations (the flax ImageNet example's): cache -> shuffle -> map -> batch ->
prefetch. Two choices beyond it:

- Determinism by step. Epoch e is shuffled with a seed made from (config.seed, e) and every
  example's augmentation is seeded with (config.seed, e, position), so batch number s is a pure
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

from cnn_jax.data import datasets, preprocess
from cnn_jax.errors import UserError


def steps_per_epoch(config) -> int:
    return datasets.num_examples(config, "train") // config.batch_size


def eval_steps(config) -> int:
    per_process = math.ceil(datasets.num_examples(config, "eval") / jax.process_count())
    return math.ceil(per_process / local_batch_size(config))


def local_batch_size(config) -> int:
    return config.batch_size // jax.process_count()


def input_channels(config) -> int:
    """Channels of the model input: what config.preprocess makes of the dataset's images
    (preprocess.input_channels). The pipeline, the model's initialisation, the summary and the
    benchmark all take it from here."""
    _preprocess_fn(config)  # an unknown op is a UserError here
    return preprocess.input_channels(config.preprocess, datasets.num_channels(config))


def channel_note(config) -> str | None:
    """The one line a run prints when its images change channels on the way in, else None."""
    have, want = datasets.num_channels(config), input_channels(config)
    if have == want:
        return None
    into = "RGB (grey replicated)" if want == 3 else "luminance (ITU-R 601 luma)"
    return (
        f"data: {config.dataset} has {have} channel{'s' if have > 1 else ''}; converted to "
        f"{into} for --config.preprocess={config.preprocess}"
    )


def _preprocess_fn(config):
    try:
        op = preprocess.PREPROCESSORS[config.preprocess]
    except KeyError:
        raise UserError(
            f"unknown preprocess {config.preprocess!r}; choose one of: "
            f"{', '.join(preprocess.PREPROCESSORS)}"
        ) from None
    return op


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = 0  # share TF's pool; JAX owns the cores
    return options


# Training ops applied to whole batches: tf.vectorized_map turns the per-example op into
# batched tensor ops (the same values, seeds included), ~9x the images/s of a per-example map
# for LeNet-5 (tf.data's per-element overhead dominates its tiny op). Not for ops that decode
# or give each example its own intermediate shape (AlexNet, VGG): those stay a parallel map.
_BATCHED_PREPROCESSORS = ("lenet",)


def train_dataset(config, start_step: int = 0) -> tf.data.Dataset:
    """This process's training batches from global step `start_step` on, forever."""
    op = _preprocess_fn(config)
    spe = steps_per_epoch(config)
    local_batch = local_batch_size(config)
    examples = datasets.process_examples(config, "train")
    if config.cache:
        examples = examples.cache()
    buffer = config.shuffle_buffer or spe * local_batch
    size, channels = config.image_size, input_channels(config)

    def one_epoch(epoch):
        epoch_seed = tf.stack([tf.constant(config.seed, tf.int64), epoch])

        def prepare(position, ex):
            seed = tf.stack([epoch_seed[0] * 1_000_003 + epoch_seed[1], position])
            image = op(ex["image"], seed, train=True, config=config)
            return {"image": tf.ensure_shape(image, [size, size, channels]), "label": ex["label"]}

        shuffle_seed = epoch_seed[0] * 7919 + epoch_seed[1]
        ds = examples.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        if config.preprocess in _BATCHED_PREPROCESSORS:
            ds = ds.enumerate().batch(local_batch, drop_remainder=True).take(spe)
            batched = lambda p, ex: tf.vectorized_map(lambda a: prepare(*a), (p, ex))
            return ds.map(batched, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(local_batch, drop_remainder=True).take(spe)

    start_epoch, offset = divmod(start_step, spe)
    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(one_epoch)
    return ds.skip(offset).prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_dataset(config) -> tf.data.Dataset:
    """This process's eval batches, padded with mask=0 examples to eval_steps() batches.

    The image fields depend on config.eval_mode (preprocess.eval_view_sides): `image`, the
    centre crop or the square ten crops come from, or one `image_qQ` per dense scale Q."""
    _preprocess_fn(config)  # an unknown op is a UserError here
    local_batch = local_batch_size(config)
    channels = input_channels(config)
    sides = preprocess.eval_view_sides(config)

    def prepare(ex):
        views = preprocess.eval_views(ex["image"], config)
        views = {k: tf.ensure_shape(v, [sides[k], sides[k], channels]) for k, v in views.items()}
        return {**views, "label": ex["label"], "mask": tf.constant(1.0)}

    examples = datasets.process_examples(config, "eval")
    # ten_crop and dense carry one or more squares larger than the crop per image (dense at
    # 256/384/512: 5.6 MB each): cache the examples, not those.
    cache_views = config.cache and config.eval_mode == "center"
    if config.cache and not cache_views:
        examples = examples.cache()
    ds = examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    padding = tf.data.Dataset.from_tensors(
        {
            **{k: tf.zeros([side, side, channels], tf.float32) for k, side in sides.items()},
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(0.0),
        }
    ).repeat()
    ds = ds.concatenate(padding).take(eval_steps(config) * local_batch)
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
