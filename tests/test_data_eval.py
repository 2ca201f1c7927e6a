"""Per-paper preprocessing, evaluation modes, folder datasets, eval_only, the plateau policy and
the pictures (cnn_jax/data/preprocess.py, data/image_folder.py, evaluate.py, visualize.py)."""

import contextlib
import io
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import tensorflow as tf

from cnn_jax import defaults, evaluate, experiment, optim, parallel, train, visualize
from cnn_jax.data import preprocess
from cnn_jax.errors import UserError
from cnn_jax.parallel import DATA_AXIS


def _prep(name, image_size, **params):
    return preprocess.Preprocessing(name=name, image_size=image_size, **params)


def _config(model="lenet5_modern", **groups):
    """The defaults for `model`; `groups` override fields, as input={"image_size": 32}."""
    c = defaults.get_default_config(model)
    for group, fields in groups.items():
        c[group].update(fields)
    return c


def _built(config):
    """What a run on the 8 test devices builds from config, each part checked."""
    return experiment.build(experiment.resolve(config, 8), 8)


def _rgb(h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _jpeg_bytes(image):
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# --- Preprocessing ops ----------------------------------------------------------------------

OP_CASES = [
    ("alexnet", _rgb(40, 50), {}),
    ("alexnet", _jpeg_bytes(_rgb(40, 50)), {}),  # encoded input: the op decodes
    ("vgg", _rgb(50, 40), {}),
    ("vgg", _rgb(50, 40), {"train_scale_min": 384, "train_scale_max": 384}),
    ("lenet", _rgb(28, 28)[..., :1], {"lenet_distortions": True}),
    ("scale_to_unit", _rgb(40, 40), {}),
]


@pytest.mark.parametrize("name,image,overrides", OP_CASES)
def test_op_gives_the_same_result_eagerly_and_in_tf_data(name, image, overrides):
    op = _prep(name, 32, **overrides).op
    for train_mode in (True, False):
        seeds = [tf.constant([7, i], tf.int64) for i in range(3)]
        eager = [op(tf.constant(image), s, train=train_mode).numpy() for s in seeds]
        ds = tf.data.Dataset.from_tensor_slices(tf.stack(seeds)).map(
            lambda s, train_mode=train_mode: op(tf.constant(image), s, train=train_mode)
        )
        mapped = list(ds.as_numpy_iterator())
        for a, b in zip(eager, mapped, strict=True):
            assert a.shape == (32, 32, 3 if name != "lenet" else 1) and a.dtype == np.float32
            np.testing.assert_allclose(a, b, atol=1e-4)
        if train_mode and name != "scale_to_unit":
            assert not np.allclose(eager[0], eager[1]), "different seeds, same augmentation"


def _coordinate_image(side):
    """R = row, G = column, B = 0: a pixel says where it came from."""
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    return np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)


def test_alexnet_crops_are_windows_of_the_256_square_and_flips_mirror_them():
    prep = _prep("alexnet", 224, pca_lighting_std=0.0)
    image = tf.constant(_coordinate_image(256))
    corners, flips = set(), set()
    for i in range(12):
        out = prep.train(image, tf.constant([1, i], tf.int64))
        pixels = np.rint(out.numpy() + preprocess.IMAGENET_MEAN_RGB).astype(int)
        top, left = pixels[0, 0, 0], pixels[0, :, 1].min()
        rows = np.broadcast_to((top + np.arange(224))[:, None], (224, 224))
        np.testing.assert_array_equal(pixels[:, :, 0], rows)
        cols = left + np.arange(224)
        flipped = pixels[0, 0, 1] != left
        np.testing.assert_array_equal(pixels[0, :, 1], cols[::-1] if flipped else cols)
        assert 0 <= top <= 32 and 0 <= left <= 32
        corners.add((top, left))
        flips.add(flipped)
    assert len(corners) > 6 and flips == {True, False}
    centre = prep.center(image)
    pixels = np.rint(centre.numpy() + preprocess.IMAGENET_MEAN_RGB).astype(int)
    assert pixels[0, 0, 0] == 16 and pixels[0, 0, 1] == 16 and pixels[-1, -1, 1] == 239


def test_alexnet_rescales_the_shorter_side_and_keeps_the_central_square():
    prep = _prep("alexnet", 224)
    square = preprocess.rescaled_square(tf.constant(_rgb(300, 600)), 256)
    assert square.shape == (256, 256, 3)
    resized = preprocess.resize_shorter_side(tf.constant(_rgb(300, 600)), 256)
    assert resized.shape == (256, 512, 3)
    # small images (CIFAR-10 into a 224 net) are upsampled by the same resize
    out = prep.train(tf.constant(_rgb(32, 32)), tf.zeros([2], tf.int64))
    assert out.shape == (224, 224, 3)


def test_vgg_draws_the_training_scale_from_its_range():
    """A vertical ramp rescaled to S has a slope that identifies S: the crops reveal the S
    drawn for each image."""
    prep = _prep("vgg", 32, pca_lighting_std=0.0, train_scale_min=256, train_scale_max=512)
    # S in [37, 73]
    side = 80
    ramp = np.repeat(np.arange(side, dtype=np.uint8)[:, None], side, 1)
    image = tf.constant(np.stack([ramp] * 3, -1))

    def slope(x):
        return np.median(np.diff(np.asarray(x)[:, 5, 0]))

    slope_of = {s: slope(preprocess.resize_shorter_side(image, s)) for s in range(30, 90)}
    scales = set()
    for i in range(24):
        out = prep.train(image, tf.constant([3, i], tf.int64))
        measured = slope(out)
        scales.add(min(slope_of, key=lambda s, m=measured: abs(slope_of[s] - m)))
    assert min(scales) >= 37 and max(scales) <= 73 and len(scales) >= 8, scales


def test_pca_colour_shift_has_the_stated_mean_and_covariance():
    """alpha_i ~ N(0, 0.1): offset = 255 V (alpha * lambda), so its mean is 0 and its
    covariance 255^2 0.01 V diag(lambda^2) V^T."""
    n = 20000
    shifts = next(
        iter(
            tf.data.Dataset.range(n)
            .map(
                lambda i: preprocess.pca_colour_shift(tf.stack([tf.constant(5, tf.int64), i]), 0.1)
            )
            .batch(n)
        )
    ).numpy()
    vecs, vals = preprocess.IMAGENET_PCA_EIGENVECTORS, preprocess.IMAGENET_PCA_EIGENVALUES
    want_cov = 255.0**2 * 0.01 * vecs @ np.diag(vals**2) @ vecs.T
    std = np.sqrt(np.diag(want_cov))
    assert np.all(np.abs(shifts.mean(0)) < 4 * std / np.sqrt(n))
    np.testing.assert_allclose(np.cov(shifts.T), want_cov, rtol=0.05, atol=0.05 * std.max() ** 2)
    # The op adds one offset per image: on a flat grey image train - eval is that constant.
    prep = _prep("alexnet", 32)
    grey = tf.constant(np.full((40, 40, 3), 128, np.uint8))
    diff = prep.train(grey, tf.constant([0, 1], tf.int64)) - prep.center(grey)
    np.testing.assert_allclose(
        diff.numpy(), np.broadcast_to(diff.numpy()[0, 0], diff.shape), atol=1e-3
    )
    assert np.abs(diff.numpy()[0, 0]).max() > 0


def test_lenet_distortions_only_in_training_and_background_fills_the_border():
    prep = _prep("lenet", 32, lenet_distortions=True)
    digit = np.zeros((28, 28, 1), np.uint8)
    digit[8:20, 12:16] = 255
    plain = prep.center(digit).numpy()
    bent = prep.train(digit, tf.constant([0, 3], tf.int64)).numpy()
    assert not np.allclose(plain, bent)
    np.testing.assert_allclose(bent[0], preprocess.LENET_BACKGROUND, atol=1e-6)
    assert bent.max() > 1.0  # the stroke survives the transform


def test_lenet_preprocessing_of_images_known_only_at_run_time():
    """A folder's JPEGs have no static size: larger ones are shrunk to the input side, the
    28x28 digits padded, both inside tf.data.map."""
    prep = _prep("lenet", 32)
    spec = tf.TensorSpec([None, None, 3], tf.uint8)
    images = [np.full((80, 60, 3), 255, np.uint8), np.full((28, 28, 3), 255, np.uint8)]
    ds = tf.data.Dataset.from_generator(lambda: iter(images), output_signature=spec)
    large, small = ds.map(prep.center)
    assert large.shape == small.shape == (32, 32, 1)  # RGB -> luminance: LeNet-5 reads grey
    np.testing.assert_allclose(large.numpy(), preprocess.LENET_INK, atol=1e-5)  # all ink
    small = small.numpy()
    np.testing.assert_allclose(small[:2], preprocess.LENET_BACKGROUND, atol=1e-6)  # padding
    np.testing.assert_allclose(small[2:30, 2:30], preprocess.LENET_INK, atol=1e-5)


# --- Evaluation -----------------------------------------------------------------------------


class _Scores(nn.Module):
    """A stand-in classifier: a 3x3 conv whose score map is averaged (not mirror-symmetric,
    so flips matter). With dense=False it only accepts image_size inputs, like the real nets."""

    classes: int = 7
    size: int = 12

    @nn.compact
    def __call__(self, x, *, train=False, dense=False):
        del train
        if not dense:
            assert x.shape[1] == self.size, x.shape
        return jnp.mean(nn.Conv(self.classes, (3, 3), padding="VALID")(x), axis=(1, 2))


def _state(params):
    return train.TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats={},
        opt_state=(),
        rng=jax.random.key(0),
    )


def _run_step(evaluator, params, batch):
    mesh = parallel.make_mesh(-1, 1)
    state = _state(params)
    specs = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), state)
    batch_spec = {k: jax.sharding.PartitionSpec(DATA_AXIS) for k in batch}
    step = parallel.compile_per_device(
        evaluator.step,
        mesh,
        (specs, batch_spec),
        jax.sharding.PartitionSpec(),
    )
    return jax.device_get(step(state, batch))


def _expected_sums(probs, labels, mask):
    true = probs[np.arange(len(labels)), labels]
    return {
        "loss": np.sum(-np.log(true) * mask),
        "count": mask.sum(),
        "accuracy": np.sum((probs.argmax(-1) == labels) * mask),
    }


def test_ten_crop_views_are_the_corners_the_centre_and_their_mirrors():
    images = jnp.arange(2 * 7 * 7).reshape(2, 7, 7, 1).astype(jnp.float32)
    views = np.asarray(evaluate.ten_crop_views(images, 4))
    assert views.shape == (10, 2, 4, 4, 1)
    x = np.asarray(images)
    want = [x[:, :4, :4], x[:, :4, 3:], x[:, 3:, :4], x[:, 3:, 3:], x[:, 1:5, 1:5]]
    for i, w in enumerate(want):
        np.testing.assert_array_equal(views[i], w)
        np.testing.assert_array_equal(views[5 + i], w[:, :, ::-1])


def test_ten_crop_step_averages_the_softmax_of_the_ten_views():
    model = _Scores(size=12)
    ten_crop = evaluate.TenCrop(model=model, loss=None, prep=_prep("alexnet", 12), top5=True)
    images = np.random.RandomState(0).normal(size=(8, 14, 14, 3)).astype(np.float32)
    labels = np.arange(8, dtype=np.int32) % 7
    mask = np.array([1, 1, 1, 1, 1, 1, 1, 0], np.float32)
    params = model.init(jax.random.key(1), images[:, :12, :12])["params"]
    batch = {"image": images, "label": labels, "mask": mask}
    got = _run_step(ten_crop, params, batch)

    views = evaluate.ten_crop_views(jnp.asarray(images), 12)
    probs = np.mean([jax.nn.softmax(model.apply({"params": params}, v)) for v in views], 0)
    want = _expected_sums(probs, labels, mask)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-4)
    assert "top5_accuracy" in got


def test_evaluators_are_checked_before_anything_compiles():
    synthetic = {"name": "synthetic"}
    with pytest.raises(UserError, match="evaluators=dense needs a model"):
        _built(_config("alexnet_single_tower", input={"preprocess": "vgg", "image_size": 224},
                       data=synthetic, eval={"evaluators": "dense"}))  # fmt: skip
    with pytest.raises(UserError, match=r"evaluators=ten_crop needs --config\.input\.preprocess"):
        _built(_config(data=synthetic, eval={"evaluators": "center,ten_crop"}))
    with pytest.raises(UserError, match="evaluators='centre'"):
        _built(_config(data=synthetic, eval={"evaluators": "centre"}))
    with pytest.raises(UserError, match=r"preprocess=alexnet takes images with 1 or 3"):
        _built(_config(input={"preprocess": "alexnet"},
                       data={"name": "synthetic", "synthetic_channels": 2}))  # fmt: skip
    with pytest.raises(UserError, match="train_scale_min"):
        _built(_config(input={"preprocess": "vgg", "train_scale_min": 600}, data=synthetic))


# --- Folder datasets, eval_only, pictures ---------------------------------------------------


def _write_folder(root, corrupt=True):
    rng = np.random.RandomState(0)
    for split, per_class in (("train", 8), ("val", 4)):
        for c, name in enumerate(("cat", "dog")):
            os.makedirs(os.path.join(root, split, name))
            for i in range(per_class):
                image = (rng.rand(36, 44, 3) * 80 + 120 * c).astype(np.uint8)
                PIL.Image.fromarray(image).save(os.path.join(root, split, name, f"{i}.jpg"))
    bad = []
    if corrupt:
        with open(os.path.join(root, "train", "cat", "0.jpg"), "rb") as f:
            good = f.read()
        bad = [
            os.path.join(root, "train", "cat", "truncated.jpg"),
            os.path.join(root, "train", "dog", "not_an_image.jpg"),
        ]
        for path, content in zip(bad, [good[: len(good) // 2], b"this is not a JPEG"], strict=True):
            with open(path, "wb") as f:
                f.write(content)
    return bad


def _folder_config(root, eval_only=False):
    return _config(
        data={"name": "image_folder", "manual_dir": root},
        input={"image_size": 32, "preprocess": "alexnet", "batch_size": 8},
        eval={"evaluators": "ten_crop", "every_epochs": 1000.0, "only": eval_only},
        run={"num_train_steps": 4, "log_every_steps": 2, "progress_bar": False},
    )


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """AlexNet's augmentation and ten-crop evaluation on a folder of JPEGs with two bad files,
    trained by train_and_evaluate (LeNet-sized model on 32x32 crops: the data path is tested)."""
    root = str(tmp_path_factory.mktemp("folder"))
    bad = _write_folder(root)
    workdir = str(tmp_path_factory.mktemp("run"))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        state = train.train_and_evaluate(_folder_config(root), workdir)
    return {
        "root": root,
        "bad": bad,
        "workdir": workdir,
        "stderr": stderr.getvalue(),
        "state": state,
    }


def test_folder_with_corrupt_jpegs_trains_and_reports_them_once(folder_run):
    assert int(folder_run["state"].step) == 4
    report = folder_run["stderr"]
    assert report.count("image_folder: skipping 2 of 18 files") == 1, report
    for path in folder_run["bad"]:
        assert report.count(path) == 1
    records = _read_jsonl(os.path.join(folder_run["workdir"], "metrics.jsonl"))
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) == 1 and 0.0 <= evals[0]["accuracy"] <= 1.0
    config = _read_json(os.path.join(folder_run["workdir"], "config.json"))
    assert config["data"]["num_classes"] == 2


def test_eval_only_writes_results_and_needs_a_checkpoint(folder_run, tmp_path):
    workdir = folder_run["workdir"]
    train.train_and_evaluate(_folder_config(folder_run["root"], eval_only=True), workdir)
    results = _read_json(os.path.join(workdir, "eval_results.json"))
    assert results["step"] == 4 and results["evaluators"] == ["ten_crop"]
    assert results["num_examples"] == 8 and 0.0 <= results["accuracy"] <= 1.0
    records = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    last = [r for r in records if r["split"] == "eval"][-1]
    assert last["accuracy"] == results["accuracy"]
    with pytest.raises(UserError, match="no checkpoint"):
        train.train_and_evaluate(
            _folder_config(folder_run["root"], eval_only=True), str(tmp_path / "empty")
        )


def test_folder_without_images_is_one_clear_error(tmp_path):
    os.makedirs(tmp_path / "train" / "cat")
    with pytest.raises(UserError, match="no images"):
        train.build_trainer(_folder_config(str(tmp_path)))
    with pytest.raises(UserError, match=r"needs --config\.data\.manual_dir"):
        train.build_trainer(_folder_config(""))


def test_folder_without_an_eval_split_fails_before_training(tmp_path):
    for split in ("train", "eval"):  # "eval" is not one of the names evaluation looks for
        os.makedirs(tmp_path / split / "cat")
        (tmp_path / split / "cat" / "a.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="no validation / val / test split"):
        train.build_trainer(_folder_config(str(tmp_path)))


def test_eval_pipeline_carries_the_ten_crop_square(folder_run):
    built = _built(_folder_config(folder_run["root"]))
    batch = next(built.eval_batches(built.evaluators[0].views).as_numpy_iterator())
    side = built.prep.ten_crop_side
    assert side == 37 and batch["image"].shape == (8, side, side, 3)


def test_visualize_writes_curves_and_feature_maps(folder_run, tmp_path):
    written = visualize.write_pictures(folder_run["workdir"], str(tmp_path))
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["curves.png", "lenet_feature_maps.png"]
    for path in written:
        assert PIL.Image.open(path).size[0] > 300 and os.path.getsize(path) < 200_000


def test_alexnet_conv1_picture_has_one_panel_per_tower(tmp_path):
    kernel = np.random.RandomState(0).normal(size=(11, 11, 3, 96)).astype(np.float32)
    mosaic = visualize._mosaic(kernel[..., :48], 16)
    assert mosaic.shape == (3 * 12 + 1, 16 * 12 + 1, 3) and 0 <= mosaic.min() <= mosaic.max() <= 1
    path = str(tmp_path / "conv1.png")
    visualize.plot_alexnet_conv1({"conv1": {"kernel": kernel}}, 2, path, step=0)
    assert os.path.getsize(path) > 1000


# --- The papers' learning-rate policy -------------------------------------------------------


def test_plateau_policy_divides_by_ten_after_patience_at_most_three_times():
    fields = _config().optim
    fields.update(schedule="plateau", plateau_patience=2, plateau_max_drops=3, learning_rate=0.1)
    optimizer = optim.make_optimizer(**fields, steps_per_epoch=10, total_steps=100)
    tx, rule = optimizer.tx, optimizer.plateau
    params = {"w": jnp.ones(3)}
    opt_state = tx.init(params)
    plateau = optim.find_plateau_state(opt_state)
    factors = []
    for accuracy in [0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]:
        plateau = rule.next_state(plateau, accuracy)
        factors.append(float(plateau.factor))
    # improves, improves, flat, flat -> /10; improves; then flat pairs -> /10 twice more, no more
    np.testing.assert_allclose(
        factors, [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3], rtol=1e-5
    )
    assert int(plateau.drops) == 3
    # The factor scales the update the optimiser makes.
    grads = {"w": jnp.ones(3)}
    full, _ = tx.update(grads, opt_state, params)
    lowered, _ = tx.update(grads, optim.replace_plateau_state(opt_state, plateau), params)
    np.testing.assert_allclose(lowered["w"], full["w"] * 1e-3, rtol=1e-5)
    assert float(jnp.abs(full["w"]).min()) > 0
