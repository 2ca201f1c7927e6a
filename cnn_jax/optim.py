"""Optimiser and learning-rate policy.

The papers' policy "divide the learning rate by 10 when validation accuracy stops improving"
(AlexNet Sec. 5, VGG Sec. 3.1) depends on evaluation results the train step never sees. It is
a host-side decision, so the optimiser carries a `plateau_factor` in its state that the loop
(cnn_jax.train) lowers after an evaluation through `PlateauRule.after_eval`; the step itself
stays pure.

LeNet-5's stochastic diagonal Levenberg-Marquardt (`sdlm`, cnn_jax.sdlm) needs the same: its
curvature estimate reads data and the model before each pass, so the loop calls the
optimiser's `before_epoch` hook, which puts the estimate into the optimiser state.

Fine-tuning trains only some parameters (`trainable`, a mask from cnn_jax.finetune): every
optimiser here is wrapped by `train_only`, which gives the frozen ones no update at all.
"""

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cnn_jax import sdlm
from cnn_jax.errors import UserError


class PlateauState(NamedTuple):
    factor: jax.Array  # multiplies the learning rate; 1, then 0.1, 0.01, ...
    best: jax.Array  # best eval accuracy so far
    bad_evals: jax.Array  # evals since the best one
    drops: jax.Array  # times the factor was lowered


def scale_by_plateau_factor() -> optax.GradientTransformation:
    def init(params):
        del params
        return PlateauState(
            factor=jnp.ones([], jnp.float32),
            best=jnp.full([], -jnp.inf, jnp.float32),
            bad_evals=jnp.zeros([], jnp.int32),
            drops=jnp.zeros([], jnp.int32),
        )

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: u * state.factor.astype(u.dtype), updates), state

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class PlateauRule:
    """The host's decision after an evaluation: lower the factor by 10 after `patience`
    evaluations without an improvement of more than `min_delta`, at most `max_drops` times."""

    patience: int = 2
    max_drops: int = 3
    min_delta: float = 1e-4

    def next_state(self, state: PlateauState, accuracy: float) -> PlateauState:
        best, bad, factor, drops = (
            float(state.best),
            int(state.bad_evals),
            state.factor,
            state.drops,
        )
        if accuracy > best + self.min_delta:
            best, bad = accuracy, 0
        else:
            bad += 1
        if bad >= self.patience and int(drops) < self.max_drops:
            factor, drops, bad = factor * 0.1, drops + 1, 0
        return PlateauState(
            factor=jnp.asarray(factor, jnp.float32),
            best=jnp.asarray(best, jnp.float32),
            bad_evals=jnp.asarray(bad, jnp.int32),
            drops=jnp.asarray(drops, jnp.int32),
        )

    def after_eval(self, opt_state, accuracy: float, sharding):
        """opt_state with its PlateauState advanced by one evaluation, placed by `sharding`."""
        new = jax.device_put(self.next_state(find_plateau_state(opt_state), accuracy), sharding)
        return replace_plateau_state(opt_state, new)


def learning_rate_schedule(
    schedule: str,
    learning_rate: float,
    *,
    steps_per_epoch: int,
    total_steps: int,
    step_epochs=(),
    step_factor: float = 0.1,
    warmup_epochs: float = 0.0,
) -> optax.Schedule:
    if schedule in ("constant", "plateau"):
        main = optax.constant_schedule(learning_rate)
    elif schedule == "step":
        boundaries = {int(e * steps_per_epoch): step_factor for e in step_epochs}
        main = optax.piecewise_constant_schedule(learning_rate, boundaries)
    else:  # cosine
        warmup = int(warmup_epochs * steps_per_epoch)
        main = optax.cosine_decay_schedule(learning_rate, max(1, total_steps - warmup))
    warmup = int(warmup_epochs * steps_per_epoch)
    if warmup > 0:
        ramp = optax.linear_schedule(0.0, learning_rate, warmup)
        main = optax.join_schedules([ramp, main], [warmup])
    return main


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The optax transformation, its schedule (made once) and, for the papers' "divide by 10
    when validation accuracy stops improving", the plateau rule the loop applies; for SDLM,
    the hook the loop calls at the start of each pass: before_epoch(state, batches) ->
    (opt_state, batches), the batches it read ahead handed back (sdlm.EpochEstimate)."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    plateau: PlateauRule | None
    before_epoch: Callable | None = None
    trainable: Any = None  # make_optimizer's mask: None, or False where a parameter is frozen

    def learning_rate(self, step: int, opt_state) -> float:
        return float(self.schedule(step) * find_plateau_state(opt_state).factor)


def make_optimizer(
    name: str,
    *,
    learning_rate: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    schedule: str,
    step_epochs,
    step_factor: float,
    warmup_epochs: float,
    plateau_patience: int,
    plateau_max_drops: int,
    plateau_min_delta: float,
    steps_per_epoch: int,
    total_steps: int,
    trainable=None,
    batch_size: int = 1,
    curvature: Callable | None = None,
    **sdlm_fields,
) -> Optimizer:
    """The optimiser of the config's optim group (its fields, as keywords; check_fields
    checks them, as a run does before it opens the data). `trainable`: None (every parameter
    trains; so does the group's own "all") or a tree of bools shaped like the parameters,
    False where one is frozen (cnn_jax.finetune.Trainable.mask, from the group's rule).
    `sdlm_fields`, `batch_size` and `curvature` are SDLM's (`_make_sdlm`)."""
    plateau = plateau_rule(schedule, plateau_patience, plateau_max_drops, plateau_min_delta)
    trainable = _trainable_mask(trainable)
    if name == "sdlm":
        return _make_sdlm(
            weight_decay=weight_decay,
            trainable=trainable,
            plateau=plateau,
            steps_per_epoch=steps_per_epoch,
            batch_size=batch_size,
            curvature=curvature,
            **{k.removeprefix("sdlm_"): v for k, v in sdlm_fields.items()},
        )
    lr = learning_rate_schedule(
        schedule,
        learning_rate,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        step_epochs=step_epochs,
        step_factor=step_factor,
        warmup_epochs=warmup_epochs,
    )
    if name == "sgd":
        # AlexNet Sec. 5: v <- 0.9 v - 0.0005 eps w - eps grad. Decay enters the momentum
        # buffer with the gradient, which is add_decayed_weights before the trace.
        core = optax.trace(decay=momentum, nesterov=nesterov)
    else:  # adam
        core = optax.scale_by_adam()
    tx = optax.chain(
        add_decayed_weights(weight_decay, trainable),
        core,
        optax.scale_by_learning_rate(lr),
        scale_by_plateau_factor(),
    )
    return Optimizer(
        tx=train_only(tx, trainable), schedule=lr, plateau=plateau, trainable=trainable
    )


def _trainable_mask(trainable):
    """make_optimizer's `trainable`: a mask, None, or the rule "all" (the group's default)."""
    if not isinstance(trainable, str):
        return trainable
    if parse_trainable(trainable)[0] != "all":
        raise ValueError(f"trainable={trainable!r}: give its mask (cnn_jax.finetune.trainable)")
    return None


def train_only(tx: optax.GradientTransformation, trainable) -> optax.GradientTransformation:
    """`tx` for the parameters `trainable` marks (None: all): a frozen one gets a zero gradient
    in and a zero update out, so it stays as it is under momentum and weight decay (which
    add_decayed_weights leaves off it), and its momentum or Adam moments stay zero.

    Not optax.masked or multi_transform: their state holds entries shaped by the mask
    (MaskedNode), so a checkpoint would restore only under the same `trainable`, and
    optax.tree_map_params (cnn_jax.train.state_specs) cannot map multi_transform's. This
    state is `tx`'s own whatever is frozen: a run can train its classifier, then resume with
    every layer training, its new layers' momentum starting from zero."""
    if trainable is None:
        return tx

    def frozen_to_zero(tree):
        return jax.tree.map(lambda x, trains: x if trains else jnp.zeros_like(x), tree, trainable)

    def update(updates, state, params=None):
        updates, state = tx.update(frozen_to_zero(updates), state, params)
        return frozen_to_zero(updates), state

    return optax.GradientTransformation(tx.init, update)


def add_decayed_weights(weight_decay: float, trainable) -> optax.GradientTransformation:
    """optax.add_decayed_weights on the parameters `trainable` marks (None: all), with the
    same (empty) state, so a checkpoint does not depend on which parameters train."""
    if not weight_decay:
        return optax.identity()
    decay = optax.add_decayed_weights(weight_decay)
    if trainable is None:
        return decay

    def update(updates, state, params=None):
        decayed, state = decay.update(updates, state, params)
        keep = lambda d, u, trains: d if trains else u
        return jax.tree.map(keep, decayed, updates, trainable), state

    return optax.GradientTransformation(decay.init, update)


def plateau_rule(schedule: str, patience: int, max_drops: int, min_delta: float):
    return PlateauRule(patience, max_drops, min_delta) if schedule == "plateau" else None


def _make_sdlm(
    *,
    weight_decay,
    trainable,
    plateau,
    steps_per_epoch,
    batch_size,
    curvature,
    mu=0.02,
    samples=500,
    every_steps=0,
    etas=sdlm.PAPER_ETAS,
    eta_passes=sdlm.PAPER_ETA_PASSES,
    batch_scaling="none",
    scale_mu=False,
    warmup_passes=0.0,
    first_pass_estimates=0,
) -> Optimizer:
    """sdlm: the paper's steps eta / (mu + h) * g (learning_rate, momentum and the schedule
    fields do not apply; the plateau factor does), eta from `etas`, each for its
    `eta_passes`; h re-estimated before each pass on `samples` examples by
    `curvature(params, images)` (sdlm.make_curvature), and `first_pass_estimates` times
    more in the first pass (sdlm.geometric_steps). A step on a batch's averaged gradient
    scales eta by `batch_scaling` (sdlm.BATCH_SCALINGS), reached over `warmup_passes`;
    `scale_mu`: mu by the same factor, so that where h is small the step stays the paper's
    eta / mu."""
    if curvature is None:
        raise ValueError("make_optimizer('sdlm') needs curvature= (sdlm.make_curvature)")
    eta = sdlm.paper_schedule(tuple(etas), tuple(eta_passes), steps_per_epoch)
    scale = sdlm.batch_factor(batch_scaling, batch_size)
    eta = sdlm.per_batch_step(eta, scale, int(warmup_passes * steps_per_epoch))
    tx = optax.chain(
        add_decayed_weights(weight_decay, trainable),
        sdlm.scale_by_sdlm(mu * scale if scale_mu else mu),
        optax.scale_by_learning_rate(eta),
        scale_by_plateau_factor(),
    )
    every = min(every_steps, steps_per_epoch) if every_steps > 0 else steps_per_epoch
    hook = sdlm.EpochEstimate(
        curvature,
        samples,
        batch_size,
        every_steps=every,
        extra_steps=sdlm.geometric_steps(first_pass_estimates, steps_per_epoch),
    )
    return Optimizer(
        tx=train_only(tx, trainable),
        schedule=eta,
        plateau=plateau,
        before_epoch=hook,
        trainable=trainable,
    )


NAMES = ("sgd", "adam", "sdlm")
SCHEDULES = ("constant", "step", "cosine", "plateau")


def check_fields(
    *,
    name: str,
    learning_rate: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    schedule: str,
    step_epochs,
    step_factor: float,
    warmup_epochs: float,
    plateau_patience: int,
    plateau_max_drops: int,
    plateau_min_delta: float,
    trainable: str = "all",
    sdlm_mu: float = 0.02,
    sdlm_samples: int = 500,
    sdlm_every_steps: int = 0,
    sdlm_etas=sdlm.PAPER_ETAS,
    sdlm_eta_passes=sdlm.PAPER_ETA_PASSES,
    sdlm_batch_scaling: str = "none",
    sdlm_scale_mu: bool = False,
    sdlm_warmup_passes: float = 0.0,
    sdlm_first_pass_estimates: int = 0,
) -> None:
    """The optim group's fields, each in its range; one line naming the first that is not.
    (make_optimizer checks them too; a run checks them before it opens the data.)"""
    del nesterov  # any bool
    _check_choices(name, schedule, step_epochs)
    parse_trainable(trainable)
    _check_ranges(
        sdlm_mu=(sdlm_mu, ">0"),
        sdlm_samples=(sdlm_samples, ">=1"),
        sdlm_every_steps=(sdlm_every_steps, ">=0"),
        sdlm_warmup_passes=(sdlm_warmup_passes, ">=0"),
        sdlm_first_pass_estimates=(sdlm_first_pass_estimates, ">=0"),
    )
    sdlm.paper_schedule(tuple(sdlm_etas), tuple(sdlm_eta_passes), steps_per_epoch=1)
    sdlm.batch_factor(sdlm_batch_scaling, batch_size=1)
    _check_ranges(
        learning_rate=(learning_rate, ">0"),
        step_factor=(step_factor, ">0"),
        momentum=(momentum, "[0,1)"),
        weight_decay=(weight_decay, ">=0"),
        warmup_epochs=(warmup_epochs, ">=0"),
        plateau_min_delta=(plateau_min_delta, ">=0"),
        plateau_max_drops=(plateau_max_drops, ">=0"),
        plateau_patience=(plateau_patience, ">=1"),
    )


def _check_choices(name: str, schedule: str, step_epochs) -> None:
    if name not in NAMES:
        raise UserError(f"--config.optim.name={name!r} is not one of: {', '.join(NAMES)}")
    if schedule not in SCHEDULES:
        raise UserError(
            f"--config.optim.schedule={schedule!r} is not one of: {', '.join(SCHEDULES)}"
        )
    epochs = tuple(step_epochs)
    if any(e < 0 for e in epochs) or any(a >= b for a, b in itertools.pairwise(epochs)):
        raise UserError(
            f"--config.optim.step_epochs={epochs} must be non-negative and increasing (the "
            "epochs at which the learning rate is multiplied by step_factor)"
        )


TRAINABLE = ("all", "classifier", "last:K")


def parse_trainable(rule: str) -> tuple[str, int]:
    """("all", 0), ("classifier", 0) or ("last", K) from the optim group's `trainable`: all,
    classifier (the fully-connected layers at the end) or last:K (the last K layers with
    parameters); cnn_jax.finetune finds those layers in the model."""
    text = str(rule).strip()
    if text in ("all", "classifier"):
        return text, 0
    kind, _, count = text.partition(":")
    if kind == "last" and count.strip().isdigit() and int(count) >= 1:
        return "last", int(count)
    raise UserError(
        f"--config.optim.trainable={rule!r} is not one of: {', '.join(TRAINABLE)} (K >= 1)"
    )


_RANGES = {
    ">0": (lambda v: v > 0, "must be > 0"),
    ">=0": (lambda v: v >= 0, "must be >= 0"),
    ">=1": (lambda v: v >= 1, "must be >= 1"),
    "[0,1)": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
}


def _check_ranges(**fields) -> None:
    """Each optim field in its range; one line naming the first that is not."""
    for field, (value, allowed) in fields.items():
        inside, message = _RANGES[allowed]
        if not inside(value):
            raise UserError(f"--config.optim.{field}={value} {message}")


def find_plateau_state(opt_state) -> PlateauState:
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, PlateauState))
        if isinstance(s, PlateauState)
    ]
    return found[0]


def replace_plateau_state(opt_state, new: PlateauState):
    return jax.tree.map(
        lambda s: new if isinstance(s, PlateauState) else s,
        opt_state,
        is_leaf=lambda s: isinstance(s, PlateauState),
    )
