"""Generated image folders for trying fine-tuning offline: one class per kind of shape.

    python -m cnn_jax.data.shapes_folder --out=/tmp/shapes [--train_per_class=100]
    python -m cnn_jax.data.shapes_folder --out=/tmp/other_shapes --classes=ring,cross,star,...

Writes OUT/train/CLASS/*.png and OUT/val/CLASS/*.png in the layout the `image_folder` dataset
reads (cnn_jax/data/image_folder.py), one folder per name in --classes (default: circle,
square, triangle; SHAPES lists all eight). Each image has one shape of a random colour, size
and place on a background of another random colour with pixel noise, so a class is its shape
alone: colour and position tell nothing. Two folders of different shapes make a source task
and a target task for transfer (docs/finetuning.md). Same flags, same files.
(benchmarks/jpeg_folder.py makes ImageNet-sized JPEGs whose classes cannot be told apart,
for timing the input pipeline; this one makes a task to learn.)
"""

import math
import os
import sys

import numpy as np
import PIL.Image
import PIL.ImageDraw
from absl import flags

from cnn_jax import cli
from cnn_jax.errors import UserError

CLASSES = ("circle", "square", "triangle")
SPLITS = ("train", "val")


def _polygon(corners: int, inner: float = 1.0, turn: float = 0.0) -> list[tuple[float, float]]:
    """The points, in the unit box, of a regular polygon with its first corner up, turned by
    `turn` of the angle between corners; a star when `inner` < 1 (a point at `inner` of the
    radius between every two corners)."""
    steps = corners * 2 if inner < 1 else corners
    points = []
    for k in range(steps):
        angle = 2 * math.pi * (k + turn) / steps
        radius = inner if inner < 1 and k % 2 else 1.0
        points.append((0.5 + radius * math.sin(angle) / 2, 0.5 - radius * math.cos(angle) / 2))
    return points


# How each shape is drawn: a kind, and for a polygon its points in the unit box.
SHAPES = {
    "circle": ("ellipse", None),
    "square": ("rectangle", None),
    "triangle": ("polygon", [(0.5, 0.0), (0.0, 1.0), (1.0, 1.0)]),
    "ring": ("ring", None),
    "cross": ("polygon", [(0.35, 0), (0.65, 0), (0.65, 0.35), (1, 0.35), (1, 0.65),
                          (0.65, 0.65), (0.65, 1), (0.35, 1), (0.35, 0.65), (0, 0.65),
                          (0, 0.35), (0.35, 0.35)]),
    "diamond": ("polygon", _polygon(4)),
    "hexagon": ("polygon", _polygon(6, turn=0.5)),
    "star": ("polygon", _polygon(5, inner=0.45)),
}  # fmt: skip


def image(shape: str, rng: np.random.Generator, side: int = 64) -> PIL.Image.Image:
    """One `side` x `side` RGB image of a filled `shape` (a key of SHAPES)."""
    background = rng.integers(0, 256, 3)
    colour = (background + rng.integers(64, 192, 3)) % 256  # never the background's
    picture = PIL.Image.new("RGB", (side, side), tuple(int(v) for v in background))
    size = rng.uniform(0.35, 0.7) * side
    x0, y0 = rng.uniform(0, side - size, 2)
    box = [x0, y0, x0 + size, y0 + size]
    fill = tuple(int(v) for v in colour)
    draw = PIL.ImageDraw.Draw(picture)
    kind, points = SHAPES[shape]
    if kind == "ellipse":
        draw.ellipse(box, fill=fill)
    elif kind == "rectangle":
        draw.rectangle(box, fill=fill)
    elif kind == "ring":
        draw.ellipse(box, outline=fill, width=max(1, round(size / 6)))
    else:
        draw.polygon([(x0 + u * size, y0 + v * size) for u, v in points], fill=fill)
    pixels = np.asarray(picture).astype(np.float32) + rng.normal(0, 8, (side, side, 3))
    return PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write(
    out: str,
    train_per_class: int,
    val_per_class: int,
    side: int = 64,
    classes=CLASSES,
    seed: int = 0,
):
    """OUT/{train,val}/CLASS/NNNN.png: `train_per_class` and `val_per_class` images of each
    of `classes` (keys of SHAPES)."""
    rng = np.random.default_rng(seed)
    for split, count in zip(SPLITS, (train_per_class, val_per_class), strict=True):
        for shape in classes:
            folder = os.path.join(out, split, shape)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                image(shape, rng, side).save(os.path.join(folder, f"{i:04d}.png"))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()
    define = lambda name, default, help, low: flags.DEFINE_integer(
        name, default, help, lower_bound=low, flag_values=fv
    )
    flags.DEFINE_string("out", None, "The folder to write (must not exist).", flag_values=fv)
    define("train_per_class", 100, "Training images per class.", 1)
    define("val_per_class", 30, "Validation images per class.", 1)
    define("side", 64, "Image side in pixels.", 8)
    flags.DEFINE_list(
        "classes", list(CLASSES), f"Shapes, from: {', '.join(SHAPES)}.", flag_values=fv
    )
    if not cli.parse_tool_flags(argv, fv, __doc__):
        return

    def body():
        if not fv.out:
            raise UserError("--out=DIR is required")
        if os.path.exists(fv.out):
            raise UserError(f"--out={fv.out} already exists")
        unknown = [c for c in fv.classes if c not in SHAPES]
        if unknown or len(set(fv.classes)) < 2:
            raise UserError(f"--classes: give two or more of {', '.join(SHAPES)}")
        write(fv.out, fv.train_per_class, fv.val_per_class, fv.side, tuple(fv.classes))
        total = (fv.train_per_class + fv.val_per_class) * len(fv.classes)
        print(f"wrote {total} images of {', '.join(fv.classes)} to {fv.out}")

    cli.run(body)


if __name__ == "__main__":
    main()
