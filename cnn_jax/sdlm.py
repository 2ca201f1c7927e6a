"""LeNet-5's optimiser: stochastic diagonal Levenberg-Marquardt (SDLM).

LeCun, Bottou, Bengio, Haffner 1998, Appendix C, and LeCun, Bottou, Orr, Mueller 1998,
"Efficient BackProp", Sec. 9.1. Each parameter w_k takes its own step

    w_k <- w_k - eta / (mu + h_kk) * dE/dw_k

with h_kk the diagonal of the Gauss-Newton matrix of the criterion E, averaged over a few
hundred examples and re-estimated once per pass (the paper: 500 examples, mu = 0.02, eta
0.0005, 0.0002, 0.0001, 0.00005 and then 0.00001). h_kk is the paper's formula, a back-
propagation of second derivatives that drops the off-diagonal terms and the terms in f''
(the Gauss-Newton part): for a layer a_i = sum_j w_ij x_j + b_i, x_out = f(a),

    d2E/da_i^2  = f'(a_i)^2 d2E/dx_out_i^2
    d2E/dx_j^2  = sum_i w_ij^2 d2E/da_i^2          (back through the squared weights)
    h_kk        = sum_{(i, j) shared by w_k} d2E/da_i^2 x_j^2   (x_j = 1 for a bias)

Each stage's affine map is its Flax module, so both back-propagations are one VJP of that
module at squared parameters and squared inputs (exact: the map is affine in each; a shared
weight's VJP is the sum over its connections).

The paper steps once per example; a step here takes a batch's mean gradient. How eta (and
mu) scale with the batch and how often h is re-estimated in the first pass are the optim
group's sdlm_* fields (BATCH_SCALINGS, geometric_steps); configs/lenet.py:sdlm sets the
translation measured on MNIST (docs/models.md, "The minibatch translation").

The RBF output and the MAP criterion (eq. 9, cnn_jax.losses.lenet_map). The derivatives start
at the F6 outputs x, not at the RBF distances y: E = y_D + log(e^-j + sum_i e^-y_i) with
y_i = ||x - c_i||^2. Its diagonal Gauss-Newton matrix with respect to x is

    d2E/dx_j^2 = 2 + Var_p[2 (x_j - c_.j)]

The 2 is y_D's: the Euclidean distance to the correct prototype is a sum of squared residuals
x_j - c_Dj, whose second derivative is exactly 2, however well trained the net is. The second
term is the Gauss-Newton part of the log-sum-exp (J^T H J through the RBF, H the softmax
covariance over the classes and the rubbish class, whose J is 0); what Gauss-Newton drops is
its first-order term -2 sum_i p_i, negative. Started at the scores instead, the curvature is the
softmax covariance alone, which goes to 0 as the net becomes confident (p_D -> 1, or every
p_i -> 0 behind the rubbish class) while y_D's 2 is lost (y_D is linear in y): steps
eta / (mu + ~0) then grow to eta / mu and training diverges.
"""

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cnn_jax.errors import UserError
from cnn_jax.models import layers

# The paper's eta (Appendix C) and how many passes each lasts; the last holds to the end.
PAPER_ETAS = (0.0005, 0.0002, 0.0001, 0.00005, 0.00001)
PAPER_ETA_PASSES = (2, 3, 3, 4)


class SDLMState(NamedTuple):
    curvature: Any  # h_kk per parameter (the params' tree), from the last estimate


def scale_by_sdlm(mu: float) -> optax.GradientTransformation:
    """updates / (mu + h): the Levenberg-Marquardt part of the step; h lives in the state and
    is set between steps (`with_curvature`), so the step stays pure and a checkpoint has it."""

    def init(params):
        return SDLMState(curvature=jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        scaled = jax.tree.map(lambda u, h: u / (mu + h).astype(u.dtype), updates, state.curvature)
        return scaled, state

    return optax.GradientTransformation(init, update)


def paper_schedule(etas: Sequence[float], passes: Sequence[int], steps_per_epoch: int):
    """eta per step: etas[i] for passes[i] passes, the last eta from then on."""
    if len(etas) != len(passes) + 1 or any(not e > 0 for e in etas) or any(p < 1 for p in passes):
        raise UserError(
            f"--config.optim.sdlm_etas={tuple(etas)} and sdlm_eta_passes={tuple(passes)}: give "
            "positive etas, one more than the (>= 1) numbers of passes each but the last lasts"
        )
    ends = [steps_per_epoch * p for p in itertools.accumulate(passes)]
    return optax.join_schedules([optax.constant_schedule(e) for e in etas], ends)


# How a step on a batch's averaged gradient scales the paper's per-example eta (App. C steps
# once per example): "none", the paper's eta per step; "sqrt", x sqrt(batch_size), each step's
# movement as noisy as one of the paper's per-example steps (the square-root rule, Krizhevsky
# 2014, "One weird trick", Sec. 5); "linear", x batch_size, the same mean movement per pass
# as the paper's (the batch's per-example steps taken at once).
BATCH_SCALINGS = ("none", "sqrt", "linear")


def batch_factor(scaling: str, batch_size: int) -> float:
    if scaling not in BATCH_SCALINGS:
        raise UserError(
            f"--config.optim.sdlm_batch_scaling={scaling!r} is not one of: "
            + ", ".join(BATCH_SCALINGS)
        )
    return {"none": 1.0, "sqrt": math.sqrt(batch_size), "linear": float(batch_size)}[scaling]


def per_batch_step(eta: optax.Schedule, factor: float, warmup_steps: int) -> optax.Schedule:
    """eta x factor per step on a batch's averaged gradient, reached linearly from the
    paper's eta over `warmup_steps` (0: from the first step)."""
    if warmup_steps <= 0 or factor == 1:
        return lambda step: eta(step) * factor
    ramp = optax.linear_schedule(1.0, factor, warmup_steps)
    return lambda step: eta(step) * ramp(step)


def geometric_steps(count: int, steps_per_epoch: int) -> frozenset:
    """Up to `count` steps in (0, steps_per_epoch), spaced geometrically from step 1: h
    changes fastest in the first steps, when the paper's small initial weights (App. A: +-2.4
    / fan-in) grow by orders of magnitude, and more slowly as they settle."""
    steps = (round(steps_per_epoch ** (k / count)) for k in range(count))
    return frozenset(s for s in steps if 0 < s < steps_per_epoch)


def find_sdlm_state(opt_state) -> SDLMState:
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, SDLMState))
    return next(s for s in leaves if isinstance(s, SDLMState))


def with_curvature(opt_state, curvature):
    """opt_state with its SDLM curvature replaced."""
    return jax.tree.map(
        lambda s: SDLMState(curvature) if isinstance(s, SDLMState) else s,
        opt_state,
        is_leaf=lambda s: isinstance(s, SDLMState),
    )


# --- The paper's back-propagated diagonal --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """One layer: x_out = activation(affine(params[name], x)), affine in each argument.
    name None: a map without parameters (a reshape); activation None: none."""

    name: str | None
    affine: Callable[[Any, jax.Array], jax.Array]
    activation: Callable[[jax.Array], jax.Array] | None = None


def forward(stages: Sequence[Stage], params, x: jax.Array) -> jax.Array:
    for s in stages:
        a = s.affine(params[s.name] if s.name else {}, x)
        x = a if s.activation is None else s.activation(a)
    return x


def diagonal_gauss_newton(
    stages: Sequence[Stage], params, x: jax.Array, output_curvature: Callable
) -> dict:
    """The paper's h_kk, summed over the examples of x, for each named stage's parameters.

    output_curvature(out) -> d2E/d out^2 per element (the criterion's Gauss-Newton diagonal
    at the last stage's output), per example."""
    seen = []
    for s in stages:
        p = params[s.name] if s.name else {}
        a = s.affine(p, x)
        seen.append((s, p, x, a))
        x = a if s.activation is None else s.activation(a)
    d2 = output_curvature(x)
    h = {}
    for index, (s, p, x_in, a) in reversed(list(enumerate(seen))):
        if s.activation is not None:  # Gauss-Newton: f'(a)^2, no f'' term
            slope = jax.jvp(s.activation, (a,), (jnp.ones_like(a),))[1]
            d2 = jnp.square(slope) * d2
        p2 = jax.tree.map(jnp.square, p)
        x2 = jnp.square(x_in)
        if s.name:
            _, vjp_params = jax.vjp(lambda q: s.affine(q, x2), p2)  # noqa: B023
            h[s.name] = vjp_params(d2)[0]
        if index:
            _, vjp_inputs = jax.vjp(lambda v: s.affine(p2, v), x2)  # noqa: B023
            d2 = vjp_inputs(d2)[0]
    return h


def rbf_map_curvature(x: jax.Array, *, j: float | None) -> jax.Array:
    """d2E/dx^2 at the F6 outputs x (batch, 84) under the MAP criterion with rubbish-class
    constant j (j None: softmax cross-entropy over the scores -y, no rubbish class); the
    module docstring says why: 2 from y_D, plus the Gauss-Newton part of the log-sum-exp."""
    x = x.astype(jnp.float32)
    centres = jnp.asarray(layers.rbf_prototypes())  # (classes, features)
    jac = 2.0 * (x[:, None, :] - centres[None])  # dy_i/dx_j: (batch, classes, features)
    y = jnp.sum(jnp.square(x[:, None, :] - centres[None]), axis=-1)
    logits = -y
    if j is not None:
        logits = jnp.concatenate([jnp.full((x.shape[0], 1), -j, y.dtype), logits], axis=-1)
    p = jax.nn.softmax(logits, axis=-1)[:, -y.shape[1] :, None]  # the classes' p_i
    mean = jnp.sum(p * jac, axis=1)
    return 2.0 + jnp.sum(p * jnp.square(jac), axis=1) - jnp.square(mean)


def lenet5_stages(model) -> tuple[Stage, ...]:
    """cnn_jax.models.lenet.LeNet5 up to its F6 outputs, layer by layer, in float32, on the
    model's own kernels (tests check it computes the model's F6 outputs)."""

    def apply(module):
        return lambda p, x: module.apply({"params": p}, x)

    def conv(features):
        return apply(model.conv(features, (5, 5), activation=None, dtype=jnp.float32))

    def flatten(_, x):
        return x.reshape(x.shape[0], -1)

    tanh = layers.lecun_tanh
    subsampling = apply(layers.TrainableSubsampling(activation=False))
    c3 = layers.SparseConv(layers.LENET5_C3_TABLE, num_inputs=6, activation=None)
    f6 = nn.Dense(84, dtype=jnp.float32, dot_general=model.dot_general)
    return (
        Stage("C1", conv(6), tanh),
        Stage("S2", subsampling, tanh),
        Stage("C3", apply(c3), tanh),
        Stage("S4", subsampling, tanh),
        Stage("C5", conv(120), tanh),
        Stage(None, flatten),
        Stage("F6", apply(f6), tanh),
    )


def make_curvature(model, model_name: str, loss_name: str, lenet_map_j: float) -> Callable:
    """curvature(params, images) -> h_kk averaged over the images, for `model`."""
    if model_name != "lenet5":
        raise UserError(
            f"--config.optim.name=sdlm back-propagates the paper's second derivatives through "
            f"LeNet-5's layers: it takes --config.model.name=lenet5, not {model_name!r}"
        )
    stages = lenet5_stages(model)
    j = lenet_map_j if loss_name == "lenet_map" else None
    output_curvature = functools.partial(rbf_map_curvature, j=j)

    def curvature(params, images):
        params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        h = diagonal_gauss_newton(stages, params, images.astype(jnp.float32), output_curvature)
        return jax.tree.map(lambda v: v / images.shape[0], h)

    return curvature


@dataclasses.dataclass(frozen=True)
class EpochEstimate:
    """The loop's hook before each pass (Optimizer.before_epoch): h_kk from the first
    `samples` examples of the pass, at the pass's starting parameters, into the optimiser
    state. Those batches are read ahead and handed back for training, so the estimate is a
    function of the step and the state, and a resumed run repeats it exactly."""

    curvature: Callable  # (params, images) -> h
    samples: int
    batch_size: int
    every_steps: int  # steps_per_epoch: the paper's once per pass
    extra_steps: frozenset = frozenset()  # more estimates, before these steps

    def due(self, step: int) -> bool:
        """Whether the loop calls the hook before `step`."""
        return step % self.every_steps == 0 or step in self.extra_steps

    @property
    def num_batches(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    @functools.cached_property
    def _estimate(self):
        def estimate(params, images):
            return self.curvature(params, jnp.concatenate(images)[: self.samples])

        return jax.jit(estimate)

    def __call__(self, state, batches: Iterator) -> tuple[Any, Iterator]:
        ahead = [next(batches) for _ in range(self.num_batches)]
        h = self._estimate(state.params, [b["image"] for b in ahead])
        old = find_sdlm_state(state.opt_state).curvature
        h = jax.device_put(h, jax.tree.map(lambda a: a.sharding, old))
        return with_curvature(state.opt_state, h), itertools.chain(ahead, batches)
