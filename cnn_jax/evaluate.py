"""Evaluation as the papers did it, beyond one centre crop.

    ten_crop   AlexNet Sec. 4.1: "the network makes a prediction by extracting five 224x224
               patches (the four corner patches and the center patch) as well as their
               horizontal reflections (hence ten patches in all), and averaging the predictions
               made by the network's softmax layer on the ten patches."
    dense      VGG Sec. 3.2: the fully-connected layers become convolutions, the net runs over
               the whole image rescaled to shorter side Q, the class score map is spatially
               averaged; the image and its mirror image at every Q in eval_scales give soft-max
               posteriors that are averaged (Sec. 4.2, multi-scale).
    center     one centre crop: cnn_jax.train.eval_step.

The eval pipeline (cnn_jax.data.preprocess.eval_views) delivers the rescaled squares; the
crops, mirrors and rescaled applications happen here, on the device. Each step is a
per-device function compiled over the mesh like train.eval_step: it returns sums over this
device's examples (padding has mask 0), summed over 'data'. The reported `loss` of these
modes is -log of the averaged posterior of the true class.

`evaluate_checkpoint` is the eval_only mode: the latest checkpoint in a workdir, evaluated and
written down.
"""

import json
import os

import jax
import jax.numpy as jnp
from jax import lax

from cnn_jax import losses, reporting
from cnn_jax.data import datasets, preprocess
from cnn_jax.errors import UserError
from cnn_jax.parallel import DATA_AXIS


def _variables(state) -> dict:
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


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


def _sums(probs: jax.Array, labels: jax.Array, mask: jax.Array, config) -> dict:
    """Metric sums of averaged posteriors, summed over 'data'."""
    true_prob = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
    sums = {
        "loss": jnp.sum(-jnp.log(jnp.maximum(true_prob, 1e-30)) * mask),
        "accuracy": jnp.sum(losses.topk_correct(probs, labels, 1) * mask),
        "count": jnp.sum(mask),
    }
    if config.num_classes > 5:  # as train.eval_step: top-5 only where it means something
        sums["top5_accuracy"] = jnp.sum(losses.topk_correct(probs, labels, 5) * mask)
    return lax.psum(sums, DATA_AXIS)


def _posteriors(scores: jax.Array) -> jax.Array:
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1)


def ten_crop_step(state, batch: dict, *, model, config) -> dict:
    """AlexNet's ten-patch evaluation; batch['image'] is the rescaled square (256 at 224)."""
    variables = _variables(state)
    views = ten_crop_views(batch["image"], config.image_size)
    # One view at a time (lax.map): activation memory of one crop batch, not ten.
    probs = lax.map(lambda v: _posteriors(model.apply(variables, v, train=False)), views)
    return _sums(jnp.mean(probs, axis=0), batch["label"], batch["mask"], config)


def dense_step(state, batch: dict, *, model, config) -> dict:
    """VGG's dense multi-scale evaluation; batch[preprocess.dense_key(q)] holds scale Q.

    The model's `dense=True` applies FC6-8 as 7x7 and 1x1 convolutions and averages the class
    score map; any input side >= 224 works.
    """
    variables = _variables(state)
    per_scale = []
    for q in config.eval_scales:
        images = batch[preprocess.dense_key(q)]
        both = jnp.concatenate([images, _mirror(images)])
        probs = _posteriors(model.apply(variables, both, train=False, dense=True))
        per_scale.append(jnp.mean(probs.reshape(2, images.shape[0], -1), axis=0))
    return _sums(jnp.mean(jnp.stack(per_scale), axis=0), batch["label"], batch["mask"], config)


# The per-device steps of the multi-view modes; "center" is train.eval_step.
EVAL_STEPS = {"ten_crop": ten_crop_step, "dense": dense_step}


def view_keys(config) -> tuple[str, ...]:
    """The image fields of an eval batch for config.eval_mode."""
    return tuple(preprocess.eval_view_sides(config))


def evaluate_checkpoint(trainer, checkpointer, workdir: str):
    """eval_only: evaluate the latest checkpoint in workdir with config.eval_mode, append the
    result to metrics.jsonl (split 'eval') and write WORKDIR/eval_results.json. Returns the
    restored state."""
    config = trainer.config
    # The newest checkpoint that restores: a corrupt newest one is reported and skipped.
    state = checkpointer.restore_newest(trainer.abstract_state())
    if state is None:
        raise UserError(
            f"--config.eval_only=True but {os.path.join(workdir, 'checkpoints')} holds no "
            "checkpoint: train first (the same command without eval_only)"
        )
    step = int(state.step)
    results = trainer.evaluate(state)
    reporter = reporting.Reporter(workdir, total_steps=step, start_step=step, progress_bar=False)
    reporter.write(step, "eval", results)
    reporter.close()
    if jax.process_index() == 0:
        summary = {
            "step": step,
            "model": config.model,
            "dataset": config.dataset,
            "eval_mode": config.eval_mode,
            "num_examples": datasets.num_examples(config, "eval"),
            **({"eval_scales": list(config.eval_scales)} if config.eval_mode == "dense" else {}),
            **{k: float(v) for k, v in results.items()},
        }
        with open(os.path.join(workdir, "eval_results.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return state
