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
  processes run the same number of eval steps. Whole-image views (VGG's dense and multi-crop
  evaluation) come in batches of one shape group each, every group's last batch padded so.
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


def eval_steps(source: Source, batch_size: int, split: str = "eval") -> int:
    per_process = math.ceil(source.num_examples(split) / jax.process_count())
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
    if cache:  # the examples themselves, read once and kept
        examples, read = source.process_examples("train").cache(), None
    else:  # an image folder's paths: only the shuffled files are read (Source.process_keys)
        examples, read = source.process_keys("train")
    buffer = shuffle_buffer or spe * local_batch
    size, channels = prep.image_size, input_channels(source, prep)

    # Plain graph code, as the ops are (preprocess._plain_graph_code): without AutoGraph's
    # rewrite of it and of the maps inside, the pipeline is built in 0.2 s instead of 0.3 s.
    @tf.autograph.experimental.do_not_convert
    def one_epoch(epoch):
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])

        def prepare(position, ex):
            example_seed = tf.stack([epoch_seed[0] * 1_000_003 + epoch_seed[1], position])
            image = prep.train(ex["image"], example_seed)
            return {"image": tf.ensure_shape(image, [size, size, channels]), "label": ex["label"]}

        shuffle_seed = epoch_seed[0] * 7919 + epoch_seed[1]
        ds = examples.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        if read is not None:  # the same order as reading first: a shuffle's order is the seed's
            ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE)
        if prep.spec.batched:
            ds = ds.enumerate().batch(local_batch, drop_remainder=True).take(spe)
            batched = lambda p, ex: tf.vectorized_map(lambda a: prepare(*a), (p, ex))
            return ds.map(batched, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(local_batch, drop_remainder=True).take(spe)

    start_epoch, offset = divmod(start_step, spe)
    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(one_epoch)
    return ds.skip(offset).prefetch(tf.data.AUTOTUNE).with_options(_options())


# The eval batch field eval_dataset(with_index=True) adds: each example's position in this
# process's share of the split (-1 for padding). cnn_jax.features keeps it on the host
# (global_batches' host_keys) to name every row it writes.
INDEX_KEY = "index"


def eval_dataset(
    source: Source,
    prep: Preprocessing,
    views: dict,
    *,
    batch_size: int,
    cache: bool,
    split: str = "eval",
    with_index: bool = False,
) -> tf.data.Dataset:
    """This process's eval batches, padded with mask=0 examples to eval_steps() batches.

    `views` names the image fields: batch key -> the side of the square prep.square makes
    (ten_crop: {"image": prep.ten_crop_side}), None for the op's own centre view at
    image_size ({"image": None}), or a preprocess.WholeImage (dense, multi_crop: one
    preprocess.dense_key(q) per scale; batches grouped by shape, _whole_image_dataset).
    `split` 'train' gives the training examples with the same evaluation views
    (cnn_jax.features); `with_index` adds INDEX_KEY."""
    if any(isinstance(v, preprocess.WholeImage) for v in views.values()):
        return _whole_image_dataset(source, prep, views, batch_size=batch_size, cache=cache)
    local_batch = local_batch_size(batch_size)
    channels = input_channels(source, prep)
    sides = {k: prep.image_size if side is None else side for k, side in views.items()}
    padding_index = {INDEX_KEY: tf.constant(-1, tf.int32)} if with_index else {}

    def prepare(ex):
        images = prep.views(ex["image"], views)
        images = {k: tf.ensure_shape(v, [sides[k], sides[k], channels]) for k, v in images.items()}
        batch = {**images, "label": ex["label"], "mask": tf.constant(1.0)}
        return {**batch, INDEX_KEY: ex[INDEX_KEY]} if with_index else batch

    examples = source.process_examples(split)
    if with_index:
        examples = examples.enumerate().map(lambda i, ex: {**ex, INDEX_KEY: tf.cast(i, tf.int32)})
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
            **padding_index,
        }
    ).repeat()
    ds = ds.concatenate(padding).take(eval_steps(source, batch_size, split) * local_batch)
    if cache_views:
        ds = ds.cache()
    return ds.batch(local_batch).prefetch(tf.data.AUTOTUNE).with_options(_options())


# --- Whole-image views: batches grouped by shape (VGG's dense and multi-crop evaluation) -----
#
# The whole image rescaled to shorter side Q has the image's own aspect, so one batch cannot
# hold several images unpadded. Images are grouped by shape: by orientation and by the longer
# side at the largest Q, rounded up to a multiple of WholeImage.shape_step; each group's
# images are zero-padded to the group's size at every Q, and a batch holds one group. The
# padding is computed but does not count: the dense path masks it at every layer and
# averages only the image's own score cells, so the result does not depend on the grouping
# (cnn_jax.evaluate.masked_score_mean; docs/data_and_evaluation.md has the compile counts).


def shape_group(hw, largest_side: int, shape_step: int):
    """The group (int64) of an image of size `hw` rescaled to shorter side `largest_side`:
    2**32 for portrait images, plus the longer side in units of shape_step, rounded up."""
    new_hw = preprocess.rescaled_size(hw, largest_side)
    portrait = tf.cast(new_hw[0] > new_hw[1], tf.int64)
    steps = (tf.cast(tf.reduce_max(new_hw), tf.int64) + shape_step - 1) // shape_step
    return portrait * 2**32 + steps


def padded_size(group, side: int, largest_side: int, shape_step: int):
    """[height, width] (int32) that every image of `group` is padded to at shorter side `side`.

    An image whose longer side at largest_side L is at most k * shape_step has aspect at most
    (k * shape_step + 1/2) / L, so at side Q <= L its longer side, round(Q * aspect), is at
    most ceil(k * shape_step * Q / L) (the margin (1 - Q / L) / 2 absorbs the rounding)."""
    multiple = preprocess.WHOLE_IMAGE_MULTIPLE
    steps, portrait = group % 2**32, group // 2**32
    longer = (steps * shape_step * side + largest_side - 1) // largest_side
    longer, shorter = (-(-v // multiple) * multiple for v in (longer, tf.constant(side, tf.int64)))
    return tf.cast(tf.where(portrait > 0, [longer, shorter], [shorter, longer]), tf.int32)


def _whole_image_dataset(source, prep, views, *, batch_size: int, cache: bool):
    """eval_dataset for WholeImage views: each batch one shape group; each group's last batch
    filled with mask=0 copies of one of its images. Every process groups only its own images,
    so the batches of processes would differ in shape: one process only
    (cnn_jax.evaluate.check_names)."""
    if not all(isinstance(v, preprocess.WholeImage) for v in views.values()):
        raise ValueError(f"WholeImage views cannot share a batch with other views: {views}")
    local_batch = local_batch_size(batch_size)
    channels = input_channels(source, prep)
    largest = max(v.side for v in views.values())
    (step,) = {v.shape_step for v in views.values()}
    sides = {k: v.side for k, v in views.items()}

    def grouped(ex):
        group = shape_group(preprocess.source_size(ex["image"]), largest, step)
        return {**ex, "group": group, "mask": tf.constant(1.0)}

    def filled(group, window):
        del group
        copy = window.take(1).map(lambda ex: {**ex, "mask": tf.constant(0.0)}).repeat()
        return window.concatenate(copy).take(local_batch)

    def prepare(ex):
        padded = {s: padded_size(ex["group"], s, largest, step) for s in set(sides.values())}
        made = prep.whole_images(ex["image"], padded)
        images = {k: tf.ensure_shape(made[s][0], [None, None, channels]) for k, s in sides.items()}
        sizes = {preprocess.size_key(k): made[s][1] for k, s in sides.items()}
        return {**images, **sizes, "label": ex["label"], "mask": ex["mask"]}

    examples = source.process_examples("eval")
    if cache:  # the encoded examples; the views are large (5.6 MB per image at Q=512)
        examples = examples.cache()
    ds = examples.map(grouped, num_parallel_calls=tf.data.AUTOTUNE)
    # Grouped before decoding: a group waiting for its batch holds compressed images.
    ds = ds.group_by_window(lambda ex: ex["group"], filled, window_size=local_batch)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(local_batch).prefetch(tf.data.AUTOTUNE).with_options(_options())


def global_batches(
    ds: tf.data.Dataset, sharding, global_batch: int, depth: int = 2, host_keys: tuple = ()
) -> Iterator:
    """Assemble each process's numpy batch into one global jax.Array batch (sharded over the
    mesh's data axis), keeping `depth` batches in flight on the devices ahead of the step.
    The fields named in `host_keys` stay this process's numpy arrays."""

    def to_global(local):
        on_devices = {k: x for k, x in local.items() if k not in host_keys}
        made = jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(
                sharding, x, (global_batch, *x.shape[1:])
            ),
            on_devices,
        )
        return {**made, **{k: x for k, x in local.items() if k in host_keys}}

    queue = collections.deque()
    for local in ds.as_numpy_iterator():
        queue.append(to_global(local))
        if len(queue) > depth:
            yield queue.popleft()
    yield from queue
