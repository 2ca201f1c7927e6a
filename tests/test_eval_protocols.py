"""VGG's evaluation protocols over whole images (Simonyan & Zisserman Sec. 3.2, 4.2, 4.3):
dense evaluation of images of mixed shapes, the 150-crop grid and their combination
(cnn_jax/evaluate.py; the WholeImage views of data/preprocess.py and data/pipeline.py).

A small VGG A (width / 16) on an image folder of mixed sizes, JPEG and PNG, one image per class
so that an image's label names it whatever order the shape groups put it in. Every protocol is
checked against the model applied to each image alone, at its own size."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import tensorflow as tf
from jax.sharding import PartitionSpec as P
from test_faults import _no_compiles, run_main

from cnn_jax import evaluate, models, parallel, train
from cnn_jax.data import datasets, pipeline, preprocess
from cnn_jax.errors import UserError
from cnn_jax.parallel import DATA_AXIS

# (height, width, format) of the evaluation images: two landscape ones of different widths
# (one shape group: padding inside a group) and a portrait one (a group of its own). The dense
# tests take the first two (each image alone at each scale is one more program to compile).
VAL_IMAGES = [(230, 300, "jpg"), (224, 290, "png"), (300, 240, "jpg")]
SCALES = (224, 256)  # Q, quoted at a 224 crop; 224 is the smallest the dense path takes


def _write_folder(root, images):
    rng = np.random.RandomState(0)
    for label, (h, w, fmt) in enumerate(images):
        for split, (height, width) in (("train", (40, 40)), ("val", (h, w))):
            folder = os.path.join(root, split, f"c{label}")
            os.makedirs(folder)
            pixels = rng.randint(0, 256, (height, width, 3)).astype(np.uint8)
            PIL.Image.fromarray(pixels).save(os.path.join(folder, f"{label}.{fmt}"))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _write_folder(str(tmp_path_factory.mktemp("mixed_sizes")), VAL_IMAGES)


@pytest.fixture(scope="module")
def landscape(tmp_path_factory):
    return _write_folder(str(tmp_path_factory.mktemp("landscape")), VAL_IMAGES[:2])


@pytest.fixture(scope="module")
def vgg_a():
    """VGG A at width / 16 with He-initialised weights drawn in numpy (no program compiled
    to initialise it); fc8 is scaled so that the posteriors of these noise images are not
    saturated, and the protocols' averages differ measurably."""
    model = models.build_model(
        "vgg", num_classes=len(VAL_IMAGES), dtype=jnp.float32, variant="A", width_divisor=16
    )
    init = functools.partial(model.init, train=False)
    shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.RandomState(1)

    def draw(path, leaf):
        if path[-1].key == "bias":
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        std = np.sqrt(2 / fan_in) / (400 if path[-2].key == "fc8" else 1)
        return (rng.standard_normal(leaf.shape) * std).astype(np.float32)

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


def _rescaled(root, label, prep, side):
    """The val image of class `label` rescaled to shorter side `side`, as model input."""
    _, _, fmt = VAL_IMAGES[label]
    path = os.path.join(root, "val", f"c{label}", f"{label}.{fmt}")
    image = preprocess.decoded(tf.io.read_file(path), 3)
    return prep._normalise()(preprocess.resize_shorter_side(image, side)).numpy()


def _softmax(scores):
    return np.asarray(jax.nn.softmax(scores, axis=-1))


def _dense_alone(model, params, image):
    """Dense evaluation of one image at its own size: the model's dense path over it and
    over its mirror image, soft-max posteriors averaged."""
    both = np.stack([image, image[:, ::-1]])
    return _softmax(jax.jit(model.apply, static_argnames=("train", "dense"))(
        params, both, train=False, dense=True)).mean(0)  # fmt: skip


def _grid_by_hand(image, crop):
    """The 5x5 grid of crops of an image and their mirror images: offsets evenly spaced
    from 0 to the far edge, rounded down."""
    tops = np.linspace(0, image.shape[0] - crop, 5).astype(int)
    lefts = np.linspace(0, image.shape[1] - crop, 5).astype(int)
    crops = [image[y : y + crop, x : x + crop] for y in tops for x in lefts]
    return np.stack(crops + [c[:, ::-1] for c in crops])


@pytest.fixture(scope="module")
def dense_alone(landscape, vgg_a):
    """{(label, Q): dense posteriors of that image of `landscape` alone at scale Q}."""
    model, params = vgg_a
    prep = preprocess.Preprocessing("vgg", 224)
    return {
        (label, q): _dense_alone(model, params, _rescaled(landscape, label, prep, q))
        for label in range(2)
        for q in SCALES
    }


def _eval_batches(folder, prep, views, batch_size):
    source = datasets.Source(name="image_folder", manual_dir=folder)
    ds = pipeline.eval_dataset(source, prep, views, batch_size=batch_size, cache=False)
    return list(ds.as_numpy_iterator())


# --- The grouped batches ----------------------------------------------------------------------


def test_whole_image_batches_hold_one_shape_group_each_and_every_image_once(folder):
    prep = preprocess.Preprocessing("vgg", 224)
    dense = evaluate.Dense(model=None, loss=None, prep=prep, top5=False, scales=SCALES)
    batches = _eval_batches(folder, prep, dense.views, batch_size=8)
    assert len(batches) == 2  # landscape, portrait: both partial, filled with mask=0 copies
    seen = []
    for batch in batches:
        assert batch["mask"].shape == (8,) and batch["mask"].sum() >= 1
        for key in dense.views:
            images, sizes = batch[key], batch[preprocess.size_key(key)]
            assert images.shape[1] % 32 == 0 and images.shape[2] % 32 == 0
            for image, size, label in zip(images, sizes, batch["label"], strict=True):
                h, w = size
                want = _rescaled(folder, label, prep, int(key.removeprefix("image_q")))
                np.testing.assert_allclose(image[:h, :w], want, atol=1e-4)
                assert not image[h:].any() and not image[:, w:].any()  # zero padding
        seen += list(batch["label"][batch["mask"] == 1])
    assert sorted(seen) == list(range(len(VAL_IMAGES)))
    portrait = [b for b in batches if b["image_q256"].shape[1] > b["image_q256"].shape[2]]
    assert [list(b["label"][b["mask"] == 1]) for b in portrait] == [[2]]


def test_a_group_is_padded_to_hold_every_image_of_it_at_every_scale():
    """padded_size's bound (pipeline.py) over many shapes: at each scale, each image's
    rescaled size fits its group's padded size, a multiple of 32."""
    rng = np.random.RandomState(3)
    sides, step = (224, 256, 288, 384, 512), 64
    for hw in [*rng.randint(100, 2000, (60, 2)).tolist(), [500, 375], [375, 500], [333, 500]]:
        group = pipeline.shape_group(tf.constant(hw), max(sides), step)
        for side in sides:
            size = preprocess.rescaled_size(tf.constant(hw), side).numpy()
            padded = pipeline.padded_size(group, side, max(sides), step).numpy()
            assert (size <= padded).all() and (padded % 32 == 0).all(), (hw, side, padded)
            assert (padded - size).max() < step + 32, (hw, side, padded)


# --- Dense evaluation over the whole image ----------------------------------------------------


def _state(params):
    return train.TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats={},
        opt_state=(),
        rng=jax.random.key(0),
    )


def test_dense_over_whole_images_of_mixed_shapes_equals_each_image_alone(
    landscape, vgg_a, dense_alone, capsys
):
    """Bound and run like cnn_jax.train does (8 devices, a batch of 8 holding two images of
    different sizes and six mask=0 copies): the metrics equal those of the model applied to
    each image alone at each scale, and to its mirror image."""
    model, params = vgg_a
    prep = preprocess.Preprocessing("vgg", 224)
    dense = evaluate.Dense(model=model, loss=None, prep=prep, top5=False, scales=SCALES)
    mesh = parallel.make_mesh(-1, 1)
    state = _state(params["params"])
    state_specs = jax.tree.map(lambda _: P(), state)

    def compile_step(step, keys):
        in_specs = (state_specs, {k: P(DATA_AXIS) for k in keys})
        return parallel.compile_per_device(step, mesh, in_specs, P())

    def batches(views):
        source = datasets.Source(name="image_folder", manual_dir=landscape)
        ds = pipeline.eval_dataset(source, prep, views, batch_size=8, cache=False)
        return pipeline.global_batches(ds, parallel.batch_sharding(mesh), 8)

    got = dense.bind(compile_step, batches).run(state)
    labels = np.arange(2)
    probs = np.stack([np.mean([dense_alone[(i, q)] for q in SCALES], 0) for i in labels])
    want_loss = np.mean(-np.log(probs[labels, labels]))
    np.testing.assert_allclose(got["loss"], want_loss, rtol=1e-5)
    assert got["accuracy"] == pytest.approx(np.mean(probs.argmax(-1) == labels))
    assert "eval dense: 2 images in 1 shape group(s)" in capsys.readouterr().out
    assert evaluate.settings([dense]) == {"scales": [224, 256]}  # eval_results.json's
    # The scales and mirrors average differing posteriors: none of them alone gives these.
    assert not np.allclose(dense_alone[(0, 224)], dense_alone[(0, 256)], atol=1e-4)


# --- Multi-crop, and its combination with dense -----------------------------------------------


def test_the_grid_is_cut_from_each_image_of_a_padded_batch_first_at_0_last_at_the_edge():
    sizes = np.array([[9, 13], [7, 7]], np.int32)
    images = np.zeros((2, 16, 16, 1), np.float32)
    for b, (h, w) in enumerate(sizes):
        images[b, :h, :w, 0] = np.arange(h * w).reshape(h, w) + 1000 * b
    crop = 4
    grid_crop = jax.jit(evaluate.grid_crop, static_argnums=2)
    for b, (h, w) in enumerate(sizes):
        by_hand = _grid_by_hand(images[b, :h, :w], crop)
        for position in range(25):
            row, column = divmod(position, 5)
            cut = grid_crop(images, sizes, crop, row, column)
            np.testing.assert_array_equal(cut[b], by_hand[position])
    np.testing.assert_array_equal(evaluate.grid_offsets(jnp.array([9]), 4)[:, 0], [0, 1, 2, 3, 5])
    mirrored = np.asarray(evaluate.mirror_images(jnp.asarray(images), jnp.asarray(sizes)))
    for b, (h, w) in enumerate(sizes):
        np.testing.assert_array_equal(mirrored[b, :h, :w], images[b, :h, :w][:, ::-1])
        assert not mirrored[b, h:].any() and not mirrored[b, :, w:].any()


def test_multi_crop_averages_50_crops_per_scale_of_each_image(landscape, vgg_a):
    """At image_size 32 (crops of 32 from images rescaled to Q = 32 and 37): the posteriors
    equal those of the grid cut by hand from each image alone, with its mirror images."""
    model, params = vgg_a
    prep = preprocess.Preprocessing("vgg", 32)
    multi_crop = evaluate.MultiCrop(model=model, loss=None, prep=prep, top5=False, scales=SCALES)
    posteriors = jax.jit(multi_crop.posteriors)
    apply = jax.jit(model.apply, static_argnames="train")
    for batch in _eval_batches(landscape, prep, multi_crop.views, batch_size=4):
        got = np.asarray(posteriors(params, batch))
        for row in np.flatnonzero(batch["mask"]):
            label = batch["label"][row]
            crops = [_grid_by_hand(_rescaled(landscape, label, prep, s), 32) for s in (32, 37)]
            want = _softmax(apply(params, np.concatenate(crops), train=False)).mean(0)
            assert len(crops[0]) == 50
            np.testing.assert_allclose(got[row], want, rtol=1e-4, atol=1e-6)


def test_dense_multi_crop_averages_the_dense_and_the_multi_crop_posteriors(
    landscape, vgg_a, dense_alone
):
    """At Q = 224 (one scale: 50 crops of 224 per image is the cost here)."""
    model, params = vgg_a
    prep = preprocess.Preprocessing("vgg", 224)
    both = evaluate.DenseMultiCrop(model=model, loss=None, prep=prep, top5=False, scales=(224,))
    (batch,) = _eval_batches(landscape, prep, both.views, batch_size=2)
    got = np.asarray(jax.jit(both.posteriors)(params, batch))
    apply = jax.jit(model.apply, static_argnames="train")
    for row, label in enumerate(batch["label"]):
        crops = _grid_by_hand(_rescaled(landscape, label, prep, 224), 224)
        multi_crop = _softmax(apply(params, crops, train=False)).mean(0)
        dense = dense_alone[(label, 224)]
        np.testing.assert_allclose(got[row], (dense + multi_crop) / 2, rtol=1e-4, atol=1e-6)
        assert np.abs(dense - multi_crop).max() > 1e-3  # two different protocols


# --- Names and fields, checked before anything compiles ---------------------------------------

VGG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/vgg.py")
SYNTHETIC = ["--config.data.name=synthetic", "--config.model.width_divisor=16"]
NAMES = "center, ten_crop, dense, multi_crop, dense_multi_crop"


@pytest.mark.parametrize(
    "overrides,error",
    [
        (["--config.eval.evaluators=dense,multicrop"],
         f"--config.eval.evaluators='dense,multicrop': give comma-separated names from: {NAMES}"),
        (["--config.model.name=alexnet_single_tower", "--config.input.preprocess=vgg",
          "--config.eval.evaluators=center,dense_multi_crop"],
         "--config.eval.evaluators=dense_multi_crop needs a model that runs convolutionally (vgg)"),
        (["--config.eval.evaluators=multi_crop", "--config.eval.scales=(192,256)"],
         "--config.eval.scales=(192, 256) must be non-empty, each >= 224 (the whole image's "
         "shorter side Q, VGG Sec. 3.2, quoted at a 224 crop)"),
        (["--config.eval.evaluators=dense", "--config.eval.shape_step=48"],
         "--config.eval.shape_step=48 must be a positive multiple of 32 (pixels of the longer "
         "side at the largest scale)"),
        (["--config.eval.dense_scales=(256,)"],
         "--config.eval.dense_scales is now --config.eval.scales (renamed; see "
         "cnn_jax/defaults.py)"),
    ],
)  # fmt: skip
def test_evaluator_mistakes_are_one_line_before_compiling(tmp_path, overrides, error):
    argv = [f"--config={VGG}:A", f"--workdir={tmp_path}/w", *SYNTHETIC, *overrides]
    with _no_compiles():
        status, _, err = run_main(argv)
    assert (status, err) == (2, f"error: {error}\n")


def test_only_the_whole_image_evaluators_need_one_process():
    evaluate.check_names("center,ten_crop", dense_model=False, process_count=2)
    with pytest.raises(UserError, match=r"evaluators=multi_crop batches images grouped by shape"):
        evaluate.check_names("center,multi_crop", dense_model=True, process_count=2)
