"""A folder of ImageNet-sized JPEGs for timing the input pipeline (not tests, not data).

    python benchmarks/jpeg_folder.py --out=/tmp/imagenet_like [--train_per_class=30]

Writes OUT/train/class_K/*.jpg and OUT/validation/class_K/*.jpg: 500x375 or 375x500 pixels
(ImageNet's most common sizes), quality 90, about 110 KB each (ILSVRC-2012's training JPEGs
average ~110 KB). Content is smooth colour waves, filled shapes and Gaussian noise: noise is
what makes a camera JPEG's entropy-coded size, and the decoder's cost grows with it, so
noise-free synthetic images would decode unrealistically fast. Same flags, same bytes.
"""

import os
import sys

import numpy as np
import PIL.Image
import PIL.ImageDraw
from absl import flags

from cnn_jax import cli
from cnn_jax.errors import UserError

# Noise standard deviation (levels) that gives ~110 KB files at quality 90 for this content.
NOISE_STD = 24.0


def image(rng: np.random.Generator) -> PIL.Image.Image:
    w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    waves = np.stack(
        [
            128 + 60 * np.sin(a * x / 40 + b * y / 40 + 6 * p)
            for a, b, p in rng.uniform(-1, 1, (3, 3))
        ],
        -1,
    )
    picture = PIL.Image.fromarray(np.clip(waves, 0, 255).astype(np.uint8))
    draw = PIL.ImageDraw.Draw(picture)
    for _ in range(rng.integers(15, 30)):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(10, 200)), y0 + int(rng.integers(10, 150))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    pixels = np.asarray(picture).astype(np.float32)
    # Mostly luminance noise, as a camera's is.
    pixels += rng.normal(0, NOISE_STD, (h, w, 1)) + rng.normal(0, NOISE_STD / 3, (h, w, 3))
    return PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write(out: str, classes: int, train_per_class: int, eval_per_class: int, quality: int):
    if os.path.exists(out):
        raise UserError(f"--out={out} already exists")
    rng = np.random.default_rng(0)
    sizes = []
    for split, per_class in (("train", train_per_class), ("validation", eval_per_class)):
        for k in range(classes):
            folder = os.path.join(out, split, f"class_{k:03d}")
            os.makedirs(folder)
            for i in range(per_class):
                path = os.path.join(folder, f"{i:05d}.jpg")
                image(rng).save(path, format="JPEG", quality=quality)
                sizes.append(os.path.getsize(path))
    print(f"{len(sizes)} JPEGs in {out}, {np.mean(sizes) / 1e3:.0f} KB on average")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()
    flags.DEFINE_string(
        "out", None, "Folder to write (created; must not exist yet).", flag_values=fv
    )
    flags.DEFINE_integer("classes", 10, "Class folders per split.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer(
        "train_per_class", 30, "Training images per class.", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_integer(
        "eval_per_class", 5, "Validation images per class.", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_integer(
        "quality", 90, "JPEG quality.", lower_bound=1, upper_bound=100, flag_values=fv
    )
    if not cli.parse_tool_flags(argv, fv, __doc__):
        return

    def body():
        if not fv.out:
            raise UserError("--out=DIR is required")
        write(fv.out, fv.classes, fv.train_per_class, fv.eval_per_class, fv.quality)

    cli.run(body)


if __name__ == "__main__":
    main()
