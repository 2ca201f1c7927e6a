"""Evaluators: the papers' ways of testing a trained net, behind one interface.

    center     one centre crop.
    ten_crop   AlexNet Sec. 4.1: "the network makes a prediction by extracting five 224x224
               patches (the four corner patches and the center patch) as well as their
               horizontal reflections (hence ten patches in all), and averaging the predictions
               made by the network's softmax layer on the ten patches."
    dense      VGG Sec. 3.2: the fully-connected layers become convolutions, the net runs over
               the whole image rescaled to shorter side Q, the class score map is spatially
               averaged; the image and its mirror image at every Q in dense_scales give
               soft-max posteriors that are averaged (Sec. 4.2, multi-scale).

An evaluator names the views an eval batch must carry (`views`: batch key -> square side, or
None for the preprocessing's centre view) and gives a per-device `step` that returns metric
sums over this device's examples (padding has mask 0), summed over 'data'. cnn_jax.train
binds it to the mesh and the eval pipeline (`bind`), after which `run(state)` evaluates the
whole split. The reported `loss` of the multi-view evaluators is -log of the averaged
posterior of the true class; the centre crop's is the training loss.

A new evaluator is one class here and one EVALUATORS line.
"""

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from cnn_jax import losses, paths, reporting
from cnn_jax.data import preprocess
from cnn_jax.errors import UserError
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
    dense_model: bool = False  # the model has VGG's dense=True path
    dense_scales: tuple[int, ...] = ()
    name = ""
    _run: Callable | None = None

    @property
    def views(self) -> dict[str, int | None]:
        raise NotImplementedError

    def step(self, state, batch: dict) -> dict:
        raise NotImplementedError

    def bind(self, compile_step: Callable, batches: Callable) -> "Evaluator":
        """This evaluator with `run`: compile_step(step, batch_keys) gives the step compiled
        over the mesh; batches(views) the global eval batches."""
        compiled = []  # compiled at the first run, on the mesh of that moment

        def run(state) -> dict:
            if not compiled:
                compiled.append(compile_step(self.step, (*self.views, "label", "mask")))
            totals = None
            for batch in batches(self.views):
                sums = compiled[0](state, batch)
                totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            totals = jax.device_get(totals)
            count = totals.pop("count")
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


# FC6 slides as a 7x7 convolution over the last feature map of 1/32 the input side.
DENSE_MIN_IMAGE_SIZE = 224


@dataclasses.dataclass(frozen=True)
class Dense(Evaluator):
    """VGG's dense multi-scale evaluation; batch[preprocess.dense_key(q)] holds scale Q. The
    model's `dense=True` applies FC6-8 as 7x7 and 1x1 convolutions and averages the class
    score map; any input side >= 224 works."""

    name = "dense"

    def __post_init__(self):
        self._needs_multi_view()
        crop = preprocess.PAPER_CROP
        if not self.dense_scales or min(self.dense_scales) < crop:
            raise UserError(
                f"--config.eval.dense_scales={self.dense_scales} must be non-empty, each >= "
                f"{crop} (VGG Sec. 3.2)"
            )
        if not self.dense_model:
            raise UserError(
                "--config.eval.evaluators=dense needs a model that runs convolutionally (vgg)"
            )
        if self.prep.image_size < DENSE_MIN_IMAGE_SIZE:
            raise UserError(
                f"--config.eval.evaluators=dense needs --config.input.image_size >= "
                f"{DENSE_MIN_IMAGE_SIZE} (got {self.prep.image_size}): FC6 slides as a 7x7 "
                "convolution over the last feature map (VGG Sec. 3.2)"
            )

    @property
    def views(self):
        return {preprocess.dense_key(q): self.prep.scaled_side(q) for q in self.dense_scales}

    def step(self, state, batch):
        v = variables(state)
        per_scale = []
        for key in self.views:
            images = batch[key]
            both = jnp.concatenate([images, _mirror(images)])
            probs = _posteriors(self.model.apply(v, both, train=False, dense=True))
            per_scale.append(jnp.mean(probs.reshape(2, images.shape[0], -1), axis=0))
        return _posterior_sums(jnp.mean(jnp.stack(per_scale), axis=0), batch, self.top5)


EVALUATORS: dict[str, type[Evaluator]] = {
    CenterCrop.name: CenterCrop,
    TenCrop.name: TenCrop,
    Dense.name: Dense,
}


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
