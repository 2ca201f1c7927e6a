"""Stopping a run whose numbers stopped being finite, before it can checkpoint that state.

Cost. The train step's metrics (loss, grad_norm) stay on the devices and the loop fetches
them together at log points, so checking them there is free. Before each checkpoint save the
loop checks the steps since the last log point too (a fetch of a few scalars at a moment the
save synchronises anyway), and that the state about to be saved is finite (one reduction over
it, per save). A NaN is therefore caught at the next log point or save, at most
log_every_steps steps late, and no checkpoint ever holds a non-finite state. Checking every
step would name it a few steps sooner at the price of a host sync per step, which stalls the
device queue.

Steps are numbered as in --config.run.debug_inject_nan_at_step: step s is the update that turns
the state after s steps (checkpoint step s) into the state after s + 1.
"""

import math

import jax
import jax.numpy as jnp

from cnn_jax.errors import RunFailure

# In the order they are reported: the loss goes bad first, gradients follow from it.
WATCHED_METRICS = ("loss", "grad_norm")


def check_metrics(fetched: list[dict], first_step: int, last_checkpoint: int | None) -> None:
    """`fetched`: host metrics of steps first_step, first_step + 1, ... Raises RunFailure
    naming the first step and quantity that is NaN or Inf."""
    for offset, metrics in enumerate(fetched):
        for name in WATCHED_METRICS:
            if name in metrics and not math.isfinite(float(metrics[name])):
                _stop(first_step + offset, f"the {name} is {float(metrics[name])}", last_checkpoint)


def check_state(state, steps_done: int, last_checkpoint: int | None) -> None:
    """Raises RunFailure if a parameter or batch statistic is NaN or Inf, or an optimiser
    value is NaN (Inf is legitimate there: the plateau policy's "best so far" starts at -Inf)."""
    if not bool(_state_ok(state.params, state.batch_stats, state.opt_state)):
        _stop(steps_done - 1, "the parameters or optimiser state are not finite", last_checkpoint)


@jax.jit
def _state_ok(params, batch_stats, opt_state) -> jax.Array:
    def floats(tree):
        return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]

    flags = [jnp.all(jnp.isfinite(x)) for x in floats((params, batch_stats))]
    flags += [~jnp.any(jnp.isnan(x)) for x in floats(opt_state)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def _stop(step: int, what: str, last_checkpoint: int | None) -> None:
    kept = (
        f"the last checkpoint (step {last_checkpoint}) is intact and a rerun resumes from it"
        if last_checkpoint is not None
        else "no checkpoint was saved"
    )
    raise RunFailure(
        f"training diverged at step {step}: {what}; nothing after it was saved, {kept} "
        "(lower --config.optim.learning_rate if it happens again)"
    )
