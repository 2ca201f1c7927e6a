"""Evaluators: the papers' ways of testing a trained net, behind one interface.

    center            one centre crop.
    ten_crop          AlexNet Sec. 4.1: "the network makes a prediction by extracting five
                      224x224 patches (the four corner patches and the center patch) as well
                      as their horizontal reflections (hence ten patches in all), and averaging
                      the predictions made by the network's softmax layer on the ten patches."
    dense             VGG Sec. 3.2: the fully-connected layers become convolutions (FC6 7x7,
                      FC7 and FC8 1x1), the net runs over the whole image rescaled to shorter
                      side Q, uncropped, and the class score map is spatially averaged; the
                      image and its mirror image at every Q in `scales` give soft-max
                      posteriors that are averaged (Sec. 4.2, multi-scale).
    multi_crop        VGG Sec. 3.2: "50 crops per scale (5 x 5 regular grid with 2 flips), for
                      a total of 150 crops over 3 scales", soft-max posteriors averaged.
    dense_multi_crop  VGG Sec. 4.3, Table 5 "multi-crop & dense": the posteriors of the two
                      averaged.

An evaluator names the views an eval batch must carry (`views`: batch key -> square side,
None for the preprocessing's centre view, or a preprocess.WholeImage) and gives a per-device
`step` that returns metric sums over this device's examples (padding has mask 0), summed over
'data'. cnn_jax.train binds it to the mesh and the eval pipeline (`bind`), after which
`run(state)` evaluates the whole split. The reported `loss` of the multi-view evaluators is
-log of the averaged posterior of the true class; the centre crop's is the training loss.

The three whole-image evaluators take the same batches: every image rescaled to each Q, in
batches grouped by shape and zero-padded to the group's size (cnn_jax.data.pipeline). Dense
evaluation masks the padding at the input of every convolution, so each image's score map is
the one the net gives the image alone (masked_score_mean); the multi-crop grid is cut from
each image's own part. The dense and multi-crop posteriors of an image thus come from one
batch, and their combination needs no bookkeeping across batches.

A new evaluator is one class here and one EVALUATORS line.
"""

import dataclasses
import functools
import json
import os
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnn_jax import losses, paths, reporting
from cnn_jax.data import preprocess
from cnn_jax.errors import UserError
from cnn_jax.models import layers, vgg
from cnn_jax.parallel import DATA_AXIS


def variables(state) -> dict:
    """The Flax variables of a TrainState: its params, and batch statistics where it has them."""
    found = {"params": state.params}
    if state.batch_stats:
        found["batch_stats"] = state.batch_stats
    return found


def metric_sums(scores, labels, mask, per_example_loss, *, top5: bool) -> dict:
    """Sums of loss, top-1 (and top-5, where there are more than 5 classes) over the unmasked
    examples of this device, summed over 'data'."""
    sums = {
        "loss": jnp.sum(per_example_loss * mask),
        "accuracy": jnp.sum(losses.topk_correct(scores, labels, 1) * mask),
        "count": jnp.sum(mask),
    }
    if top5:
        sums["top5_accuracy"] = jnp.sum(losses.topk_correct(scores, labels, 5) * mask)
    return lax.psum(sums, DATA_AXIS)


def _posterior_sums(probs, batch, top5: bool) -> dict:
    true_prob = jnp.take_along_axis(probs, batch["label"][:, None], axis=-1)[:, 0]
    nll = -jnp.log(jnp.maximum(true_prob, 1e-30))
    return metric_sums(probs, batch["label"], batch["mask"], nll, top5=top5)


def _posteriors(scores: jax.Array) -> jax.Array:
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1)


def _mirror(images: jax.Array) -> jax.Array:
    return images[:, :, ::-1, :]


def ten_crop_views(images: jax.Array, crop: int) -> jax.Array:
    """[B, S, S, C] -> [10, B, crop, crop, C]: the four corners and the centre (its offset
    rounds down, as preprocess.central_crop), then the same five mirrored."""
    side = images.shape[1]
    far, mid = side - crop, (side - crop) // 2
    corners = [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]
    five = [images[:, y : y + crop, x : x + crop, :] for y, x in corners]
    return jnp.stack(five + [_mirror(v) for v in five])


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """The shared part: what every evaluator is built from, and `run` once bound."""

    model: object
    loss: Callable | None
    prep: preprocess.Preprocessing
    top5: bool
    scales: tuple[int, ...] = ()  # the whole-image evaluators' test scales Q, at a 224 crop
    shape_step: int = 64  # ... and their shape groups' step (preprocess.WholeImage)
    name = ""
    needs_dense_path = False  # runs the model's dense=True path (VGG's), checked by name
    groups_by_shape = False  # takes WholeImage views: batches differ in shape (one process)
    _run: Callable | None = None

    @property
    def views(self) -> dict:
        raise NotImplementedError

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The fields of an eval batch the step reads."""
        return (*self.views, "label", "mask")

    def step(self, state, batch: dict) -> dict:
        raise NotImplementedError

    def bind(self, compile_step: Callable, batches: Callable) -> "Evaluator":
        """This evaluator with `run`: compile_step(step, batch_keys) gives the step compiled
        over the mesh; batches(views) the global eval batches."""
        compiled = []  # compiled at the first run, on the mesh of that moment

        def run(state) -> dict:
            if not compiled:
                compiled.append(compile_step(self.step, self.batch_keys))
            totals, shapes = None, set()
            for batch in batches(self.views):
                shapes.add(tuple(batch[k].shape for k in self.views))
                sums = compiled[0](state, batch)
                totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            totals = jax.device_get(totals)
            count = totals.pop("count")
            if self.groups_by_shape and jax.process_index() == 0:
                # Each shape is one compiled program: the line says what the pass cost.
                print(f"eval {self.name}: {int(count)} images in {len(shapes)} shape group(s)")
            return {k: float(v / count) for k, v in totals.items()}

        return dataclasses.replace(self, _run=run)

    def run(self, state) -> dict:
        if self._run is None:
            raise RuntimeError("Evaluator.run before bind")
        return self._run(state)

    def _needs_multi_view(self) -> None:
        if self.prep.spec.normalise is None:
            raise UserError(
                f"--config.eval.evaluators={self.name} needs --config.input.preprocess in: "
                f"{', '.join(preprocess.MULTI_VIEW_PREPROCESSORS)} (not {self.prep.name!r})"
            )


@dataclasses.dataclass(frozen=True)
class CenterCrop(Evaluator):
    name = "center"

    @property
    def views(self):
        return {"image": None}

    def step(self, state, batch):
        scores = self.model.apply(variables(state), batch["image"], train=False)
        per_example = self.loss(scores, batch["label"])
        return metric_sums(scores, batch["label"], batch["mask"], per_example, top5=self.top5)


@dataclasses.dataclass(frozen=True)
class TenCrop(Evaluator):
    """AlexNet's ten-patch evaluation; batch['image'] is the rescaled square (256 at 224)."""

    name = "ten_crop"

    def __post_init__(self):
        self._needs_multi_view()

    @property
    def views(self):
        return {"image": self.prep.ten_crop_side}

    def step(self, state, batch):
        v = variables(state)
        crops = ten_crop_views(batch["image"], self.prep.image_size)
        # One view at a time (lax.map): activation memory of one crop batch, not ten.
        probs = lax.map(lambda x: _posteriors(self.model.apply(v, x, train=False)), crops)
        return _posterior_sums(jnp.mean(probs, axis=0), batch, self.top5)


# --- VGG's whole-image evaluation (Sec. 3.2, 4.2, 4.3) --------------------------------------

# The layers whose inputs the dense path masks: the convolutions every model is built from
# (layers.Kernels' conv: layers.Conv on CPU, nn.Conv elsewhere) and FC6 sliding as a 7x7
# convolution (vgg.WindowDense). FC7 and FC8 act on each position alone.
MASKED_LAYERS = (nn.Conv, layers.Conv, vgg.WindowDense)
# Sec. 3.2: "50 crops per scale (5 x 5 regular grid with 2 flips)".
GRID = 5


def valid_extent(sizes: jax.Array, padded_hw, map_hw) -> jax.Array:
    """[b, 2]: the top-left part of an [h, w] map that comes from each image's own pixels,
    for images of sizes[b] = [height, width] zero-padded to padded_hw. The padded sides halve
    exactly at every 2x2 pool (preprocess.WHOLE_IMAGE_MULTIPLE), and a pool keeps
    floor(n / 2) of n rows, so the image's part is floor(size * map / padded)."""
    return sizes * jnp.array(map_hw, sizes.dtype) // jnp.array(padded_hw, sizes.dtype)


def inside(extent: jax.Array, map_hw) -> jax.Array:
    """[b, h, w] bool: the top-left extent[b] of an [h, w] map."""
    rows = jnp.arange(map_hw[0])[None, :, None] < extent[:, 0, None, None]
    cols = jnp.arange(map_hw[1])[None, None, :] < extent[:, 1, None, None]
    return rows & cols


def masked_score_mean(model, variables_: dict, images: jax.Array, sizes: jax.Array):
    """[b, classes]: each image's class score map, spatially averaged (Sec. 3.2), computed as
    if the image were alone at its own size, from a batch of images zero-padded to one shape.

    The padding is set to zero at the input of every convolution (MASKED_LAYERS, through a
    Flax method interceptor, so the model needs no mask argument), which is what the layer's
    own zero padding would read there: the image's part of every map is then exactly the
    unpadded net's. FC6 (a 7x7 window) shrinks the map by 6 cells, and the image's part of the
    score map with it; only those cells are averaged."""
    padded_hw = images.shape[1:3]
    masked = []  # (map size, image's extent) at each masked layer input, in order

    def zero_the_padding(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, MASKED_LAYERS):
            return next_fun(*args, **kwargs)
        x, *rest = args
        extent = valid_extent(sizes, padded_hw, x.shape[1:3])
        masked.append((x.shape[1:3], extent))
        keep = inside(extent, x.shape[1:3])[..., None]
        return next_fun(jnp.where(keep, x, jnp.zeros((), x.dtype)), *rest, **kwargs)

    with nn.intercept_methods(zero_the_padding):
        maps = model.apply(variables_, images, train=False, method="score_map")
    (fc6_hw, fc6_extent) = masked[-1]  # FC6's input: the last masked layer
    shrink = jnp.array([fc6_hw[0] - maps.shape[1], fc6_hw[1] - maps.shape[2]], sizes.dtype)
    cells = fc6_extent - shrink
    keep = inside(cells, maps.shape[1:3])[..., None]
    total = jnp.sum(jnp.where(keep, maps, 0.0), axis=(1, 2))
    return total / jnp.prod(cells, axis=-1, keepdims=True).astype(maps.dtype)


def mirror_images(images: jax.Array, sizes: jax.Array) -> jax.Array:
    """Each zero-padded image mirrored left-right within its own width (the padding stays on
    the right)."""
    columns = sizes[:, 1, None] - 1 - jnp.arange(images.shape[2])[None, :]  # [b, W]
    mirrored = jnp.take_along_axis(images, jnp.maximum(columns, 0)[:, None, :, None], axis=2)
    return jnp.where((columns >= 0)[:, None, :, None], mirrored, jnp.zeros((), images.dtype))


def grid_offsets(extent: jax.Array, crop: int) -> jax.Array:
    """[GRID, b]: the offsets along one axis of a regular grid of crops over images of that
    extent: the first at 0, the last flush with the far edge, the rest evenly between
    (rounded down)."""
    return jnp.arange(GRID)[:, None] * (extent[None, :] - crop) // (GRID - 1)


def grid_crop(images: jax.Array, sizes: jax.Array, crop: int, row, column) -> jax.Array:
    """[b, crop, crop, C]: the crop at grid position (row, column) of every image."""
    top = grid_offsets(sizes[:, 0], crop)[row]
    left = grid_offsets(sizes[:, 1], crop)[column]
    channels = images.shape[-1]
    cut = lambda image, y, x: lax.dynamic_slice(image, (y, x, 0), (crop, crop, channels))
    return jax.vmap(cut)(images, top, left)


def dense_posteriors(model, variables_: dict, images: jax.Array, sizes: jax.Array):
    """[b, classes]: the soft-max posteriors of each image and its mirror image, averaged
    (Sec. 3.2). One forward pass per view keeps memory at one pass over the batch."""
    views = (images, mirror_images(images, sizes))
    return sum(_posteriors(masked_score_mean(model, variables_, x, sizes)) for x in views) / 2


def multi_crop_posteriors(model, variables_: dict, images, sizes, crop: int):
    """[b, classes]: the soft-max posteriors of the 5x5 grid of crop x crop crops of each
    image and of their mirror images, averaged (Sec. 3.2). One grid position at a time
    (lax.map): memory of one forward pass over the batch's crops, not of 50."""

    def at(position):
        crops = grid_crop(images, sizes, crop, position // GRID, position % GRID)
        return sum(
            _posteriors(model.apply(variables_, x, train=False)) for x in (crops, _mirror(crops))
        )

    return jnp.sum(lax.map(at, jnp.arange(GRID * GRID)), axis=0) / (2 * GRID * GRID)


@dataclasses.dataclass(frozen=True)
class WholeImageEvaluator(Evaluator):
    """The shared part of VGG's whole-image protocols: batch[preprocess.dense_key(q)] holds
    every image rescaled to shorter side Q (scaled with image_size), zero-padded to its shape
    group's size, and batch[preprocess.size_key(...)] its own [height, width]."""

    groups_by_shape = True

    def __post_init__(self):
        self._needs_multi_view()
        crop = preprocess.PAPER_CROP
        if not self.scales or min(self.scales) < crop:
            raise UserError(
                f"--config.eval.scales={tuple(self.scales)} must be non-empty, each >= {crop} "
                "(the whole image's shorter side Q, VGG Sec. 3.2, quoted at a 224 crop)"
            )
        multiple = preprocess.WHOLE_IMAGE_MULTIPLE
        if self.shape_step <= 0 or self.shape_step % multiple:
            raise UserError(
                f"--config.eval.shape_step={self.shape_step} must be a positive multiple of "
                f"{multiple} (pixels of the longer side at the largest scale)"
            )

    @property
    def views(self):
        step = self.shape_step
        return {
            preprocess.dense_key(q): preprocess.WholeImage(self.prep.scaled_side(q), step)
            for q in self.scales
        }

    @property
    def batch_keys(self):
        return (*self.views, *map(preprocess.size_key, self.views), "label", "mask")

    def _over_scales(self, posteriors: Callable, batch: dict) -> jax.Array:
        """posteriors(images, sizes) -> [b, classes] at every scale, averaged (Sec. 4.2)."""
        at = [posteriors(batch[k], batch[preprocess.size_key(k)]) for k in self.views]
        return jnp.mean(jnp.stack(at), axis=0)

    def posteriors(self, variables_: dict, batch: dict) -> jax.Array:
        """[b, classes]: the soft-max posteriors of each image of the batch."""
        raise NotImplementedError

    def step(self, state, batch):
        return _posterior_sums(self.posteriors(variables(state), batch), batch, self.top5)


@dataclasses.dataclass(frozen=True)
class Dense(WholeImageEvaluator):
    """VGG's dense multi-scale evaluation over the whole image (Sec. 3.2, 4.2)."""

    name = "dense"
    needs_dense_path = True

    def __post_init__(self):
        super().__post_init__()
        if self.prep.image_size < vgg.DENSE_MIN_IMAGE_SIZE:
            raise UserError(
                f"--config.eval.evaluators={self.name} needs --config.input.image_size >= "
                f"{vgg.DENSE_MIN_IMAGE_SIZE} (got {self.prep.image_size}): FC6 slides as a 7x7 "
                "convolution over the last feature map (VGG Sec. 3.2)"
            )

    def posteriors(self, variables_, batch):
        dense = functools.partial(dense_posteriors, self.model, variables_)
        return self._over_scales(dense, batch)


@dataclasses.dataclass(frozen=True)
class MultiCrop(WholeImageEvaluator):
    """VGG's 150-crop evaluation: a 5x5 grid of image_size crops and their mirror images at
    every scale (Sec. 3.2, 4.3)."""

    name = "multi_crop"

    def posteriors(self, variables_, batch):
        crops = functools.partial(
            multi_crop_posteriors, self.model, variables_, crop=self.prep.image_size
        )
        return self._over_scales(crops, batch)


@dataclasses.dataclass(frozen=True)
class DenseMultiCrop(Dense):
    """Table 5's "multi-crop & dense": each image's dense and multi-crop posteriors,
    averaged (Sec. 4.3: "averaging their soft-max outputs"). Both come from the same batch,
    so one pass also reports each part alone (dense_accuracy, multi_crop_accuracy, ...):
    Table 5's three rows."""

    name = "dense_multi_crop"

    def parts(self, variables_, batch) -> dict[str, jax.Array]:
        """{'dense': ..., 'multi_crop': ...}: each part's [b, classes] posteriors."""
        return {
            Dense.name: Dense.posteriors(self, variables_, batch),
            MultiCrop.name: MultiCrop.posteriors(self, variables_, batch),
        }

    def posteriors(self, variables_, batch):
        return sum(self.parts(variables_, batch).values()) / 2

    def step(self, state, batch):
        parts = self.parts(variables(state), batch)
        sums = _posterior_sums(sum(parts.values()) / 2, batch, self.top5)
        for part, posteriors in parts.items():
            alone = _posterior_sums(posteriors, batch, self.top5)
            sums.update({f"{part}_{k}": v for k, v in alone.items() if k != "count"})
        return sums


EVALUATORS: dict[str, type[Evaluator]] = {
    CenterCrop.name: CenterCrop,
    TenCrop.name: TenCrop,
    Dense.name: Dense,
    MultiCrop.name: MultiCrop,
    DenseMultiCrop.name: DenseMultiCrop,
}


def names(listed: str) -> tuple[str, ...]:
    """The evaluator names of --config.eval.evaluators, each one of EVALUATORS."""
    found = tuple(n.strip() for n in str(listed).split(",") if n.strip())
    unknown = [n for n in found if n not in EVALUATORS]
    if not found or unknown:
        raise UserError(
            f"--config.eval.evaluators={listed!r}: give comma-separated names from: "
            f"{', '.join(EVALUATORS)}"
        )
    return found


def check_names(listed: str, *, dense_model: bool, process_count: int) -> None:
    """--config.eval.evaluators, checked before any data is opened: every name known, a
    dense path where an evaluator needs one, one process where one groups by shape."""
    for name in names(listed):
        kind = EVALUATORS[name]
        if kind.needs_dense_path and not dense_model:
            raise UserError(
                f"--config.eval.evaluators={name} needs a model that runs convolutionally (vgg)"
            )
        if kind.groups_by_shape and process_count > 1:
            raise UserError(
                f"--config.eval.evaluators={name} batches images grouped by shape, which one "
                f"process does (this run has {process_count}): evaluate on one host"
            )


def settings(evaluators) -> dict:
    """What eval_results.json records of how the evaluators ran beyond their names: the test
    scales Q (quoted at a 224 crop) of the whole-image ones."""
    scales = {tuple(e.scales) for e in evaluators if e.groups_by_shape}
    return {"scales": list(next(iter(scales)))} if scales else {}


def write_eval_results(workdir: str, step: int, results: dict, facts: dict) -> None:
    """WORKDIR/eval_results.json: what eval_only found, with the facts that say what it was."""
    if jax.process_index() != 0:
        return
    summary = {"step": step, **facts, **{k: float(v) for k, v in results.items()}}
    with open(os.path.join(workdir, paths.EVAL_RESULTS_FILE), "w") as f:
        json.dump(summary, f, indent=2)


def report(reporter: reporting.Reporter, step: int, results: list[tuple[str, dict]]) -> None:
    """One metrics.jsonl record per evaluator: split 'eval' for the first, eval_NAME after."""
    for i, (name, metrics) in enumerate(results):
        reporter.write(step, "eval" if i == 0 else f"eval_{name}", metrics)
