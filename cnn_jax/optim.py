"""Optimiser and learning-rate policy from the config.

The papers' policy "divide the learning rate by 10 when validation accuracy stops improving"
(AlexNet Sec. 5, VGG Sec. 3.1) depends on evaluation results the train step never sees. It is
a host-side decision, so the optimiser carries a `plateau_factor` in its state that the loop
(cnn_jax.train) lowers after an evaluation; the step itself stays pure.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax


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


def plateau_update(state: PlateauState, accuracy: float, config) -> PlateauState:
    """The host's decision after an evaluation: lower the factor by 10 after
    `plateau_patience` evaluations without improvement, at most `plateau_max_drops` times."""
    best, bad, factor, drops = float(state.best), int(state.bad_evals), state.factor, state.drops
    if accuracy > best + config.plateau_min_delta:
        best, bad = accuracy, 0
    else:
        bad += 1
    if bad >= config.plateau_patience and int(drops) < config.plateau_max_drops:
        factor, drops, bad = factor * 0.1, drops + 1, 0
    return PlateauState(
        factor=jnp.asarray(factor, jnp.float32),
        best=jnp.asarray(best, jnp.float32),
        bad_evals=jnp.asarray(bad, jnp.int32),
        drops=jnp.asarray(drops, jnp.int32),
    )


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    base = config.learning_rate
    if config.lr_schedule in ("constant", "plateau"):
        schedule = optax.constant_schedule(base)
    elif config.lr_schedule == "step":
        boundaries = {int(e * steps_per_epoch): config.step_factor for e in config.step_epochs}
        schedule = optax.piecewise_constant_schedule(base, boundaries)
    elif config.lr_schedule == "cosine":
        warmup = int(config.warmup_epochs * steps_per_epoch)
        schedule = optax.cosine_decay_schedule(base, max(1, total_steps - warmup))
    else:  # validated in cnn_jax.validation
        raise ValueError(config.lr_schedule)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if warmup > 0:
        ramp = optax.linear_schedule(0.0, base, warmup)
        schedule = optax.join_schedules([ramp, schedule], [warmup])
    return schedule


def make_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
    if config.optimizer == "sgd":
        # AlexNet Sec. 5: v <- 0.9 v - 0.0005 eps w - eps grad. Decay enters the momentum
        # buffer with the gradient, which is add_decayed_weights before the trace.
        core = [optax.trace(decay=config.momentum, nesterov=config.nesterov)]
    else:  # adam
        core = [optax.scale_by_adam()]
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay) if config.weight_decay else optax.identity(),
        *core,
        optax.scale_by_learning_rate(schedule),
        scale_by_plateau_factor(),
    )


def find_plateau_state(opt_state) -> PlateauState:
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, PlateauState))
             if isinstance(s, PlateauState)]  # fmt: skip
    return found[0]


def replace_plateau_state(opt_state, new: PlateauState):
    return jax.tree.map(
        lambda s: new if isinstance(s, PlateauState) else s,
        opt_state,
        is_leaf=lambda s: isinstance(s, PlateauState),
    )
