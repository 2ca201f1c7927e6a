"""A fixed-resolution copy of an image folder, written once, that training then reads instead.

    python -m cnn_jax.data.cache --config=configs/alexnet.py --config.data.name=image_folder \\
        --config.data.manual_dir=DIR --out=CACHE_DIR
    python -m cnn_jax.main --config=configs/alexnet.py --config.data.name=image_folder \\
        --config.data.manual_dir=CACHE_DIR --workdir=...

Every image of every split (ROOT/SPLIT/CLASS/*) whose shorter side is longer than the side the
run's views need (cache_side: AlexNet's 256, VGG's largest S or Q, scaled by image_size / 224
as preprocess.scaled_side does) is rescaled to that shorter side by the pipeline's own
resize (preprocess.resize_shorter_side), rounded to uint8 and re-encoded as a JPEG of quality
95; a smaller one is copied byte for byte (the op upsamples it at training time, as it would
from the source). The cache IS an image folder: same splits, class folders and file names
(a resized non-JPEG gets `.jpg` appended), so the classes, the labels and the folder
builder's example order are the source's, and nothing else in the pipeline changes. Files
that cannot be read are reported once and left out, as a run would skip them.

Why re-encoded JPEGs, not uint8 arrays: a 256x341 RGB array is 262 KB, the JPEG about a fifth
of that, so an ImageNet cache stays in the size class of the source (~1.28M images) and reads
from disk as fast; decoding the small JPEG is what is left (docs/input_pipeline.md). Quality
95 costs ~1 level of RMS error on top of the uint8 rounding. For AlexNet (and VGG at a fixed
S of 256) the cached image is at the training scale already, so the op only crops it.

The write is deterministic (same source and preprocessing, identical bytes, manifest included) and
atomic: it fills CACHE_DIR.partial and renames it when done, so an interrupted write never
leaves a folder that looks like a cache; a rerun replaces the partial one.
"""

import json
import os
import shutil
import sys

from absl import flags

from cnn_jax import cli
from cnn_jax.errors import UserError

JPEG_QUALITY = 95
CHROMA_DOWNSAMPLING = False
MANIFEST = "cnn_jax_cache.json"  # at the root, where the folder builder looks for no images
_PARTIAL_MARK = ".cnn_jax_cache_partial"


def cache_side(prep, view_sides: dict) -> int:
    """The largest shorter side any view rescales to: training's (AlexNet's 256, VGG's
    train_scale_max) and evaluation's (`view_sides`: eval batch key -> square side, None for
    the centre view at image_size, or a preprocess.WholeImage), scaled to image_size. A cache
    at a smaller side would make those views from upsampled pixels."""
    if not prep.spec.cacheable:
        from cnn_jax.data import preprocess

        cacheable = [name for name, spec in preprocess.PREPROCESSORS.items() if spec.cacheable]
        raise UserError(
            f"--config.input.preprocess={prep.name} takes whole images, not patches of a "
            f"rescaled one: a cache serves {' and '.join(cacheable)} only"
        )
    from cnn_jax.data import preprocess

    sides = [preprocess.view_side(view, prep.image_size) for view in view_sides.values()]
    return max(prep.largest_train_side, *sides)


def _check_out(out: str, source: str) -> str:
    if not out or not out.strip():
        raise UserError("--out=CACHE_DIR is required: the folder to write the cache to")
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out={out} is a file, not a directory")
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"--out={out} is not empty: give a new folder (the cache is written once)")
    source = os.path.abspath(source)
    if out == source or out.startswith(source + os.sep) or source.startswith(out + os.sep):
        raise UserError(
            f"--out={out} must be outside --config.data.manual_dir={source} and not hold it"
        )
    return out


def _split_names(root: str) -> list[str]:
    from cnn_jax.data import image_folder

    return sorted(image_folder._builder(root).info.splits.keys())


def _encoded_at_side(side: int, quality: int):
    """path -> (bytes to write, whether they are a rescaled JPEG), as a tf.data map."""
    import tensorflow as tf

    from cnn_jax.data import preprocess

    @tf.autograph.experimental.do_not_convert  # plain tf ops
    def encode(path):
        data = tf.io.read_file(path)
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        larger = tf.reduce_min(tf.shape(image)[:2]) > side

        def rescaled():
            pixels = preprocess.resize_shorter_side(image, side)
            pixels = tf.saturate_cast(tf.round(pixels), tf.uint8)
            return tf.io.encode_jpeg(
                pixels, quality=quality, chroma_downsampling=CHROMA_DOWNSAMPLING
            )

        return tf.cond(larger, rescaled, lambda: data), larger

    return encode


def _cached_name(name: str, resized: bool) -> str:
    jpeg = name.lower().endswith((".jpg", ".jpeg"))
    return name if jpeg or not resized else name + ".jpg"


def write(source, prep, out: str, *, view_sides: dict, quality: int = JPEG_QUALITY) -> dict:
    """Write the cache of image folder `source` (a datasets.Source) for the views of `prep`
    (a preprocess.Preprocessing) and `view_sides` (see cache_side) to `out`; returns the
    manifest."""

    from cnn_jax.data import image_folder

    if source.name != "image_folder":
        raise UserError(
            f"the cache reads --config.data.name=image_folder (ROOT/SPLIT/CLASS/*.jpg), not "
            f"{source.name!r}"
        )
    side = cache_side(prep, view_sides)
    root = image_folder.root_of(source.manual_dir)  # checked by Source: layout, splits, classes
    out = _check_out(out, root)
    partial = out + ".partial"
    if os.path.lexists(partial):
        if not os.path.isfile(os.path.join(partial, _PARTIAL_MARK)):
            raise UserError(f"{partial} exists and is not a partial cache: move it away")
        shutil.rmtree(partial)  # an earlier write of ours that did not finish
    os.makedirs(partial)
    open(os.path.join(partial, _PARTIAL_MARK), "w").close()

    manifest = {
        "source": os.path.abspath(root),
        "preprocess": prep.name,
        "image_size": prep.image_size,
        "shorter_side": side,
        "jpeg_quality": quality,
        "classes": image_folder.class_names(root),
        "splits": {s: _write_split(root, s, partial, side, quality) for s in _split_names(root)},
    }
    with open(os.path.join(partial, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    os.remove(os.path.join(partial, _PARTIAL_MARK))
    if os.path.isdir(out):
        os.rmdir(out)  # empty (checked above)
    os.rename(partial, out)
    return manifest


def _write_split(root: str, split: str, partial: str, side: int, quality: int) -> dict:
    """One split's images into `partial`, rescaled where larger than `side`; its counts."""
    import tensorflow as tf

    from cnn_jax.data import image_folder

    scanned = image_folder.scan(root, split)  # reports unreadable files once
    paths = tf.constant(scanned.paths, tf.string, shape=[len(scanned.paths)])
    ds = tf.data.Dataset.from_tensor_slices(paths).map(
        _encoded_at_side(side, quality), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    resized = 0
    names = set()
    for path, (data, larger) in zip(scanned.paths, ds.as_numpy_iterator(), strict=True):
        folder, name = os.path.split(os.path.relpath(path, root))
        target = os.path.join(folder, _cached_name(name, bool(larger)))
        if target in names:
            raise UserError(f"{os.path.join(root, target)} and {path} would share a name")
        names.add(target)
        os.makedirs(os.path.join(partial, folder), exist_ok=True)
        with open(os.path.join(partial, target), "wb") as f:
            f.write(data)
        resized += bool(larger)
    return {
        "images": len(scanned.paths),
        "rescaled": resized,
        "copied": len(scanned.paths) - resized,
        "unreadable_skipped": len(scanned.bad_paths),
    }


def main(argv: list[str] | None = None) -> None:
    """Command line; takes argv (program name first) so tests can call it in-process."""
    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()
    cli.define_config_flag(fv, argv)
    flags.DEFINE_string(
        "out", None, "The folder to write the cache to (new or empty).", flag_values=fv
    )
    flags.DEFINE_integer(
        "quality",
        JPEG_QUALITY,
        "JPEG quality of rescaled images.",
        lower_bound=1,
        upper_bound=100,
        flag_values=fv,
    )
    if not cli.parse_tool_flags(argv, fv, __doc__):
        return

    def body():
        if fv.config is None:
            raise UserError("--config=configs/X.py[:arg] is required")
        if fv.out is None:
            raise UserError("--out=CACHE_DIR is required: the folder to write the cache to")
        from cnn_jax import experiment

        source, prep = experiment.source(fv.config), experiment.preprocessing(fv.config)
        views = {}  # every square the config's evaluators take
        for evaluator in experiment.evaluators(fv.config, model_module=None, loss=None):
            views.update(evaluator.views)
        manifest = write(source, prep, fv.out, view_sides=views, quality=fv.quality)
        out = os.path.abspath(os.path.expanduser(fv.out))
        counts = manifest["splits"].values()
        print(
            f"cache: {sum(s['images'] for s in counts)} images in {out} "
            f"({sum(s['rescaled'] for s in counts)} rescaled to shorter side "
            f"{manifest['shorter_side']}, {sum(s['copied'] for s in counts)} copied); train "
            f"with --config.data.name=image_folder --config.data.manual_dir={out}"
        )

    cli.run(body)


if __name__ == "__main__":
    main()
