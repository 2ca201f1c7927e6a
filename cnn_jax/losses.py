"""Losses over a model's class scores (higher is better), per example.

The step averages them; keeping them per-example lets evaluation weight padded examples 0.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from cnn_jax.errors import UserError


def cross_entropy(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy. For LeNet-5 the scores are negative RBF distances."""
    log_probs = jax.nn.log_softmax(scores.astype(jnp.float32))
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def lenet_map(scores: jax.Array, labels: jax.Array, *, j: float) -> jax.Array:
    """LeNet-5's maximum a posteriori criterion (paper Sec. II-C, eq. 9):

        E = y_D + log(exp(-j) + sum_i exp(-y_i))

    with y_i the RBF distances (= -scores) and y_D the correct class's. The first term pulls the
    correct prototype closer; the second pushes the others away. The exp(-j) term, a
    "rubbish class" of fixed penalty j, stops the push once every wrong distance is large, so
    the RBF centres cannot collapse together (the reason the paper adds it).
    """
    scores = scores.astype(jnp.float32)
    y_correct = -jnp.take_along_axis(scores, labels[:, None], axis=-1)[:, 0]
    rubbish = jnp.full((*scores.shape[:-1], 1), -j, scores.dtype)
    return y_correct + jax.nn.logsumexp(jnp.concatenate([rubbish, scores], axis=-1), axis=-1)


LOSSES = {"cross_entropy": cross_entropy, "lenet_map": lenet_map}


def make_loss(name: str, *, lenet_map_j: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The per-example loss `name` with its parameters bound: loss(scores, labels)."""
    if name not in LOSSES:
        raise UserError(f"--config.loss.name={name!r} is not one of: {', '.join(LOSSES)}")
    if not lenet_map_j > 0:
        raise UserError(f"--config.loss.lenet_map_j={lenet_map_j} must be > 0")
    if name == "lenet_map":
        return functools.partial(lenet_map, j=lenet_map_j)
    return LOSSES[name]


def topk_correct(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k highest scores, per example."""
    # Rank of the true class = number of classes scored strictly higher.
    true_score = jnp.take_along_axis(scores, labels[:, None], axis=-1)
    return (jnp.sum(scores > true_score, axis=-1) < k).astype(jnp.float32)
