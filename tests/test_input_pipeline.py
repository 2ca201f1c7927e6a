"""The training input path of docs/input_pipeline.md: AlexNet's and VGG's views computed from
only the source window they need (cnn_jax/data/preprocess.py: rescaled_patch), equal to
resize-then-crop; batches a pure function of the seed; the fixed-side cache
(cnn_jax/data/cache.py) and the one-line errors of its command."""

import contextlib
import functools
import io
import os

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import tensorflow as tf

from cnn_jax.data import cache, pipeline, preprocess
from cnn_jax.data.datasets import Source
from cnn_jax.data.preprocess import Preprocessing

# The decode-the-window ops match resize-then-crop to float rounding (measured: at most 0.0072
# of a level on 500x375 JPEGs at 224); this bound leaves room for other CPUs' rounding.
SAME_VIEW_LEVELS = 0.02


def _photo(w: int, h: int, seed: int) -> np.ndarray:
    """Photo-like content: colour waves, filled shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    waves = [
        128 + 60 * np.sin(a * x / 20 + b * y / 20 + 6 * p) for a, b, p in rng.uniform(-1, 1, (3, 3))
    ]
    picture = PIL.Image.fromarray(np.clip(np.stack(waves, -1), 0, 255).astype(np.uint8))
    draw = PIL.ImageDraw.Draw(picture)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(4, w // 2)), y0 + int(rng.integers(4, h // 2))]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(picture).astype(np.float32) + rng.normal(0, 16, (h, w, 1))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _encoded(pixels: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    image = PIL.Image.fromarray(pixels)
    image = image.convert(mode) if mode else image
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


# ImageNet's common sizes, a small image (upsampled), one whose shorter side is already 256
# (no resampling: the patch is sliced), grey and CMYK JPEGs, and a PNG (decoded whole).
SOURCES = {
    "jpeg_500x375": _encoded(_photo(500, 375, 0)),
    "jpeg_375x500": _encoded(_photo(375, 500, 1)),
    "jpeg_200x150": _encoded(_photo(200, 150, 2)),
    "jpeg_341x256": _encoded(_photo(341, 256, 3)),
    "jpeg_grey": _encoded(_photo(400, 300, 4), mode="L"),
    "jpeg_cmyk": _encoded(_photo(300, 400, 5), mode="CMYK"),
    "png_330x260": _encoded(_photo(330, 260, 6), "PNG"),
}
OPS = {
    "alexnet": Preprocessing("alexnet", 224),
    "vgg": Preprocessing("vgg", 224, train_scale_min=256, train_scale_max=512),
    "vgg_fixed_384": Preprocessing("vgg", 224, train_scale_min=384, train_scale_max=384),
}


@pytest.mark.parametrize("op_name", sorted(OPS))
def test_views_from_the_decoded_window_equal_resize_then_crop(op_name):
    """The same seed gives the same patch, mirror and colour shift as the whole-image form of
    the op, to float rounding: for JPEG bytes (window decoded), PNG bytes (decoded whole, then
    windowed) and decoded images alike, in training and evaluation."""
    prep = OPS[op_name]
    op = prep.op
    params = {p: getattr(prep, p) for p in prep.spec.params}
    reference = functools.partial(prep.spec.reference, image_size=224, **params)
    for i, (source, data) in enumerate(sorted(SOURCES.items())):
        decoded = preprocess.decoded(tf.constant(data), 3)
        for train in (True, False):
            seed = tf.constant([11, i], tf.int64)
            want = reference(tf.constant(data), seed, train=train).numpy()
            for given in (tf.constant(data), decoded):
                got = op(given, seed, train=train).numpy()
                assert got.shape == (224, 224, 3) and got.dtype == np.float32
                np.testing.assert_allclose(got, want, atol=SAME_VIEW_LEVELS, err_msg=source)


def _ramp(h: int, w: int) -> np.ndarray:
    """R = row, G = column, B = 0: a pixel's value says where it is."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)


@pytest.mark.parametrize(
    "hw,side,size",
    [
        ((75, 100), 51, 44),  # ImageNet's 375 -> 256 ratio: 3 taps per sample
        ((190, 150), 40, 32),  # shrunk ~3.7x, by a different step per axis: 8 taps
        ((30, 45), 64, 56),  # upsampled: half-width 1
    ],
)
def test_tap_resampling_equals_resize_then_crop(hw, side, size):
    """rescaled_patch's resampling (preprocess._resample: each pass a gathered, weighted
    batch of rows, 2-D transposes between them) against tf.image.resize of the whole image
    and a slice, at opposite corners and mirrored, for shrink factors with 3 and 8 taps per
    sample and for upsampling (2 taps)."""
    pixels = np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3)).astype(np.uint8)
    image = tf.constant(pixels)
    rescaled = preprocess.resize_shorter_side(image, side).numpy()
    free = np.array(rescaled.shape[:2]) - size
    for top, left in ((0, 0), (free[0], free[1]), (free[0] // 2, 1)):
        for mirror in (False, True):
            at = lambda new_hw, corner=(top, left): tf.constant(corner)
            got = preprocess.rescaled_patch(image, side, at, size, tf.constant(mirror)).numpy()
            want = rescaled[top : top + size, left : left + size]
            want = want[:, ::-1] if mirror else want
            np.testing.assert_allclose(got, want, atol=SAME_VIEW_LEVELS, err_msg=(top, left))


def test_window_geometry_puts_every_sample_where_the_full_resize_does():
    """A 74x100 ramp halved to AlexNet's 37 (image_size=32): the rescaled pixel r samples the
    source at 2r + 1 (pixel centres at k + 0.5) with a triangle over sources 2r-1 .. 2r+2, so on
    a ramp its value is 2r + 0.5. The patch at rescaled (top, left) must read exactly those
    sources, with the centre square's offset (100 -> 50 columns: (50 - 37) // 2 = 6) included.
    Rows and columns whose triangle is cut by the image border are checked by the reference."""
    op = dict(image_size=32, pca_lighting_std=0.0)
    image = tf.constant(_ramp(74, 100))
    offsets, mirrors = set(), set()
    for i in range(16):
        out = preprocess.alexnet(image, tf.constant([2, i], tf.int64), train=True, **op)
        pixels = out.numpy() + preprocess.IMAGENET_MEAN_RGB
        top = (pixels[1, 5, 0] - 0.5) / 2 - 1  # row 1: its triangle is inside the image
        mirrored = pixels[5, 0, 1] > pixels[5, -1, 1]
        columns = pixels[5, ::-1, 1] if mirrored else pixels[5, :, 1]
        left = (columns[1] - 0.5) / 2 - 1
        assert top == int(top) and left == int(left), (top, left)
        top, left = int(top), int(left)
        assert 0 <= top <= 5 and 6 <= left <= 6 + 5  # a 32 patch of the central 37 square
        inner = slice(1, 31)
        want_rows, want_columns = (2 * (at + np.arange(32)[inner]) + 0.5 for at in (top, left))
        np.testing.assert_allclose(pixels[inner, 5, 0], want_rows, atol=1e-3)
        np.testing.assert_allclose(columns[inner], want_columns, atol=1e-3)
        reference = preprocess.alexnet_resize_then_crop(
            image, tf.constant([2, i], tf.int64), train=True, **op
        )
        np.testing.assert_allclose(out.numpy(), reference.numpy(), atol=SAME_VIEW_LEVELS)
        offsets.add((top, left))
        mirrors.add(bool(mirrored))
    assert len(offsets) > 6 and mirrors == {True, False}


def test_a_jpeg_is_decoded_only_where_its_patch_lies(monkeypatch):
    """AlexNet's centre patch of a 500x375 JPEG, by hand: rescaled to 341x256 (steps 375/256 and
    500/341 source pixels), central square at column 42, its centre patch at rescaled (16, 58).
    Samples run from (16.5 * 1.4648, 58.5 * 1.4663) = (24.17, 85.78) to 223 steps further,
    (350.83, 412.76); each reads sources within its triangle's half-width (the step) less 0.5,
    and one pixel more on each side: rows 21 .. 353, columns 82 .. 415, 59% of the image. The
    decoded window starts at column 80, the 16-pixel iMCU boundary where libjpeg-turbo starts
    decoding a cropped row anyway (preprocess._JPEG_IMCU_WIDTH)."""
    windows = []
    decode_and_crop = tf.image.decode_and_crop_jpeg

    def recording(contents, crop_window, **kwargs):
        windows.append(crop_window.numpy().tolist())
        return decode_and_crop(contents, crop_window, **kwargs)

    monkeypatch.setattr(tf.image, "decode_and_crop_jpeg", recording)
    prep = Preprocessing("alexnet", 224)
    prep.center(tf.constant(SOURCES["jpeg_500x375"]))
    assert windows == [[21, 80, 333, 336]]
    prep.center(tf.constant(SOURCES["png_330x260"]))
    assert len(windows) == 1  # a PNG is decoded whole


def _write_folder(root, sizes=((120, 90), (90, 120), (40, 30), (130, 100)), classes=("a", "b")):
    """ROOT/{train,validation}/CLASS/*.jpg of photo-like JPEGs; returns their paths."""
    paths = []
    for split, count in (("train", 3), ("validation", 1)):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name))
            for i in range(count):
                w, h = sizes[(i + c) % len(sizes)]
                path = os.path.join(root, split, name, f"{i:03d}.jpg")
                with open(path, "wb") as f:
                    f.write(_encoded(_photo(w, h, 100 * c + i + (split == "train"))))
                paths.append(path)
    return paths


ALEXNET_32 = Preprocessing("alexnet", 32)


def _folder(root) -> Source:
    return Source("image_folder", manual_dir=str(root), image_size=32)


def _batches(root, count, start_step=0, seed=0, cache=True):
    source = _folder(root)
    options = dict(batch_size=2, seed=seed, cache=cache, shuffle_buffer=0, start_step=start_step)
    ds = pipeline.train_dataset(source, ALEXNET_32, **options)
    return list(ds.take(count).as_numpy_iterator())


def test_same_seed_same_batches_and_a_resumed_run_sees_the_same_ones(tmp_path):
    _write_folder(str(tmp_path))
    first, again = _batches(tmp_path, 5), _batches(tmp_path, 5)
    resumed = _batches(tmp_path, 2, start_step=3)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    for a, b in zip(first[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    other = _batches(tmp_path, 5, seed=1)
    assert not all(
        np.array_equal(a["image"], b["image"]) for a, b in zip(first, other, strict=True)
    )


def test_an_image_folder_is_shuffled_as_paths_then_read_into_the_same_batches(tmp_path):
    """Without input.cache the shuffle buffer holds the files' paths, not their bytes (a
    whole split's, for ImageNet ~140 GB), and the files are read after it: the batches are
    those of shuffling the bytes read first (input.cache), resumed runs' included."""
    paths = _write_folder(str(tmp_path))
    keys, read = _folder(tmp_path).process_keys("train")
    shuffled = [k["image"].decode() for k in keys.as_numpy_iterator()]
    assert sorted(shuffled) == sorted(p for p in paths if "/train/" in p)
    key = next(iter(keys))
    with open(key["image"].numpy().decode(), "rb") as f:
        assert read(key)["image"].numpy() == f.read()
    from_paths, from_bytes = _batches(tmp_path, 5, cache=False), _batches(tmp_path, 5)
    resumed = _batches(tmp_path, 2, start_step=3, cache=False)
    for a, b in zip(from_paths, from_bytes, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    for a, b in zip(from_paths[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def _tree(root):
    """{relative path: bytes} of every file under root."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


def test_the_cache_is_an_image_folder_at_the_training_scale_written_deterministically(tmp_path):
    source = tmp_path / "source"
    _write_folder(str(source))
    # A large PNG is re-encoded (its name gets .jpg); an unreadable file is left out.
    with open(source / "train" / "a" / "big.png", "wb") as f:
        f.write(_encoded(_photo(80, 64, 9), "PNG"))
    with open(source / "train" / "b" / "broken.jpg", "wb") as f:
        f.write(b"not a JPEG")
    centre = {"image": None}  # AlexNet at image_size=32: shorter side 37
    with contextlib.redirect_stderr(io.StringIO()) as report:
        manifest = cache.write(
            _folder(source), ALEXNET_32, str(tmp_path / "one"), view_sides=centre
        )
        cache.write(_folder(source), ALEXNET_32, str(tmp_path / "two"), view_sides=centre)
    assert "broken.jpg" in report.getvalue()
    one, two = _tree(tmp_path / "one"), _tree(tmp_path / "two")
    assert one == two, "the same source written twice differs"
    assert cache.MANIFEST in one and manifest["classes"] == ["a", "b"]
    assert manifest["shorter_side"] == 37 and manifest["splits"]["train"]["images"] == 7
    assert "train/a/big.png.jpg" in one and not any("broken" in p for p in one)
    for path, data in one.items():
        if path == cache.MANIFEST:
            continue
        h, w = tf.image.extract_jpeg_shape(data).numpy()[:2]
        original = (
            source / path.removesuffix(".jpg") if path.endswith(".png.jpg") else source / path
        )
        ow, oh = PIL.Image.open(original).size
        if min(ow, oh) > 37:  # rescaled: the longer side as the op's resize makes it
            assert min(h, w) == 37 and max(h, w) == round(max(ow, oh) * 37 / min(ow, oh))
        else:  # the 40x30 images: copied byte for byte, not upsampled
            assert data == original.read_bytes()


def test_training_reads_the_cache_as_it_read_the_source(tmp_path):
    """Same seed: the cache's batches hold the same images and labels in the same order with
    the same crops, mirrors and colour shifts as the source's, up to the cache's uint8 rounding
    and JPEG quality 95; and two reads of the cache are identical."""
    source, out = tmp_path / "source", tmp_path / "cache"
    _write_folder(str(source))
    cache.write(_folder(source), ALEXNET_32, str(out), view_sides={"image": None})
    from_source = _batches(source, 6)
    from_cache, again = _batches(out, 6), _batches(out, 6)
    other_seed = _batches(source, 6, seed=1)
    for s, c, a, o in zip(from_source, from_cache, again, other_seed, strict=True):
        np.testing.assert_array_equal(c["image"], a["image"])
        np.testing.assert_array_equal(s["label"], c["label"])
        # Measured on these 37-pixel images: mean 1.5-3, 99th percentile 10 levels (tiny JPEGs
        # have large blocking errors; at 256 the mean is 2.2, docs/input_pipeline.md). A wrong
        # crop or order differs like another seed's batch: a mean of tens of levels.
        diff = np.abs(s["image"] - c["image"])
        assert diff.mean() < 4.0 and np.percentile(diff, 99) < 16.0, (diff.mean(), diff.max())
        assert np.abs(o["image"] - c["image"]).mean() > 10.0


@pytest.mark.parametrize(
    "prep,view_sides,side",
    [
        (Preprocessing("alexnet", 224), {"image": None}, 256),
        (Preprocessing("alexnet", 32), {"image": None}, 37),
        (Preprocessing("vgg", 224, train_scale_min=256, train_scale_max=512), {"image": 224}, 512),
        (Preprocessing("vgg", 224, train_scale_min=256, train_scale_max=256), {"image": None}, 256),
        # Dense evaluation at Q = 384 needs a larger side than training's fixed S = 256.
        (
            Preprocessing("vgg", 224, train_scale_min=256, train_scale_max=256),
            {preprocess.dense_key(256): 256, preprocess.dense_key(384): 384},
            384,
        ),
    ],
)
def test_the_cache_side_is_the_largest_side_a_view_needs(prep, view_sides, side):
    assert cache.cache_side(prep, view_sides) == side


def _run_cache(argv):
    out, err = io.StringIO(), io.StringIO()
    status = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cache.main(["cnn_jax.data.cache", *argv])
    except SystemExit as e:
        status = e.code
    return status, out.getvalue(), err.getvalue()


def test_cache_command_errors_are_one_line_and_it_says_how_to_train(tmp_path):
    source = tmp_path / "source"
    _write_folder(str(source))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    base = [
        "--config=configs/alexnet.py",
        "--config.data.name=image_folder",
        "--config.input.image_size=32",
    ]
    cases = {
        "does not exist": [
            f"--config.data.manual_dir={tmp_path / 'missing'}",
            f"--out={tmp_path / 'o'}",
        ],
        "no images": [f"--config.data.manual_dir={tmp_path / 'empty'}", f"--out={tmp_path / 'o'}"],
        "is a file": [f"--config.data.manual_dir={source}", f"--out={tmp_path / 'a_file'}"],
        "is not empty": [f"--config.data.manual_dir={source}", f"--out={tmp_path / 'full'}"],
        "must be outside": [f"--config.data.manual_dir={source}", f"--out={source / 'cache'}"],
        "--out=CACHE_DIR is required": [f"--config.data.manual_dir={source}"],
        "serves alexnet and vgg only": [
            f"--config.data.manual_dir={source}",
            "--config.input.preprocess=lenet",
            f"--out={tmp_path / 'o'}",
        ],
    }
    for message, argv in cases.items():
        status, _, err = _run_cache(base + argv)
        assert status == 2 and message in err, (message, err)
        assert err.count("\n") == 1 and err.startswith("error: "), err
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "o.partial")
    vgg = ["--config=configs/vgg.py", "--config.data.name=image_folder"]
    status, out, _ = _run_cache(
        [*vgg, f"--config.data.manual_dir={source}", f"--out={tmp_path / 'o'}"]
    )
    assert status == 0 and f"--config.data.manual_dir={tmp_path / 'o'}" in out, out
    assert sorted(os.listdir(tmp_path / "o")) == [cache.MANIFEST, "train", "validation"]
