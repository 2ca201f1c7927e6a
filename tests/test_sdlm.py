"""LeNet-5's stochastic diagonal Levenberg-Marquardt (cnn_jax.sdlm): the curvature estimate
against jacfwd/jacrev and a direct computation of the paper's formula, and the step."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import optim, sdlm
from cnn_jax.errors import UserError
from cnn_jax.models import layers, lenet

J = 1.0


def _map_curvature_at_x(x):
    """The generalised Gauss-Newton matrix of the MAP criterion at the F6 outputs x (one
    example): y_D's exact Hessian 2I plus J_y^T H J_y of the log-sum-exp (H its Hessian)."""
    c = jnp.asarray(layers.rbf_prototypes())
    rbf = lambda v: jnp.sum(jnp.square(v[None] - c), axis=-1)
    lse = lambda y: jax.nn.logsumexp(jnp.concatenate([jnp.full((1,), -J), -y]))
    jy = jax.jacfwd(rbf)(x)
    return 2.0 * jnp.eye(x.shape[0]) + jy.T @ jax.hessian(lse)(rbf(x)) @ jy


def test_rbf_curvature_is_the_gauss_newton_diagonal_and_positive():
    x = jax.random.uniform(jax.random.key(0), (3, 84), minval=-1.7, maxval=1.7)
    got = sdlm.rbf_map_curvature(x, j=J)
    want = jax.jit(jax.vmap(lambda v: jnp.diag(_map_curvature_at_x(v))))(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(got.min()) >= 2.0  # y_D's 2: never the near-0 curvature of the scores


def test_single_layer_diagonal_equals_gauss_newton_from_jacobians():
    """A dense layer into the RBF and the MAP criterion: no weight is shared, so the
    back-propagated diagonal is exactly diag(J^T G J), G the criterion's Gauss-Newton
    matrix at the layer's outputs and J = d outputs / d params (jacrev)."""
    dense = nn.Dense(84)
    u = jax.random.normal(jax.random.key(1), (4, 12))
    params = dense.init(jax.random.key(2), u)["params"]
    stages = (sdlm.Stage("F6", lambda p, x: dense.apply({"params": p}, x), layers.lecun_tanh),)
    got = sdlm.diagonal_gauss_newton(
        stages, {"F6": params}, u, lambda x: sdlm.rbf_map_curvature(x, j=J)
    )["F6"]
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    want = jnp.zeros_like(flat)
    for example in u:
        out = lambda f, e=example: layers.lecun_tanh(dense.apply({"params": unravel(f)}, e))
        jac = jax.jacrev(out)(flat)  # (84, params)
        gn = jac.T @ _map_curvature_at_x(out(flat)) @ jac
        want = want + jnp.diag(gn)
    want = unravel(want)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_deep_net_diagonal_equals_the_papers_formula_computed_directly():
    """conv 3x3 -> tanh -> trainable 2x2 subsampling -> tanh -> dense -> tanh, with a given
    output curvature: h against the formula written out with explicit sums over the
    connections of every shared weight."""
    rng = np.random.default_rng(0)
    n, side, cin, cout, units = 2, 6, 2, 3, 4
    x = rng.normal(size=(n, side, side, cin)).astype(np.float32)
    conv = layers.Conv(cout, (3, 3))
    sub = layers.TrainableSubsampling(activation=False)
    dense = nn.Dense(units)
    apply = lambda m: lambda p, v: m.apply({"params": p}, v)
    stages = (
        sdlm.Stage("conv", apply(conv), layers.lecun_tanh),
        sdlm.Stage("sub", apply(sub), layers.lecun_tanh),
        sdlm.Stage(None, lambda _, v: v.reshape(v.shape[0], -1)),
        sdlm.Stage("dense", apply(dense), layers.lecun_tanh),
    )
    params = {
        "conv": conv.init(jax.random.key(0), x)["params"],
        "sub": {"coefficient": jnp.asarray([0.5, -0.7, 0.9]), "bias": jnp.asarray([0.1, 0, -0.2])},
        "dense": dense.init(jax.random.key(1), jnp.zeros((1, 2 * 2 * cout)))["params"],
    }
    out_d2 = rng.uniform(0.5, 2.0, size=(n, units)).astype(np.float32)
    got = sdlm.diagonal_gauss_newton(stages, params, jnp.asarray(x), lambda _: out_d2)

    f = lambda a: np.asarray(layers.lecun_tanh(a))
    fp2 = lambda a: (
        np.asarray(jax.vmap(jax.grad(layers.lecun_tanh))(a.ravel())).reshape(a.shape) ** 2
    )
    w, b = (np.asarray(params["conv"][k]) for k in ("kernel", "bias"))
    coef, sb = (np.asarray(params["sub"][k]) for k in ("coefficient", "bias"))
    wd, bd = (np.asarray(params["dense"][k]) for k in ("kernel", "bias"))
    want = {
        "conv": {"kernel": np.zeros_like(w), "bias": np.zeros_like(b)},
        "sub": {"coefficient": np.zeros(cout), "bias": np.zeros(cout)},
        "dense": {"kernel": np.zeros_like(wd), "bias": np.zeros_like(bd)},
    }
    for e in range(n):
        a1 = np.zeros((4, 4, cout))  # conv pre-activations
        for i in range(4):
            for j in range(4):
                a1[i, j] = np.einsum("hwc,hwco->o", x[e, i : i + 3, j : j + 3], w) + b
        x1 = f(a1)
        a2 = x1.reshape(2, 2, 2, 2, cout).sum((1, 3)) * coef + sb
        x2 = f(a2).reshape(-1)
        a3 = x2 @ wd + bd
        # Back: d2a = f'^2 d2x; d2x_in = sum w^2 d2a; h = sum over connections d2a x_in^2.
        d2a3 = fp2(a3) * out_d2[e]
        want["dense"]["kernel"] += np.outer(x2**2, d2a3)
        want["dense"]["bias"] += d2a3
        d2a2 = fp2(a2) * ((wd**2) @ d2a3).reshape(2, 2, cout)
        want["sub"]["bias"] += d2a2.sum((0, 1))
        blocks_sq = (x1**2).reshape(2, 2, 2, 2, cout).sum((1, 3))
        want["sub"]["coefficient"] += (d2a2 * blocks_sq).sum((0, 1))
        d2x1 = np.repeat(np.repeat(d2a2 * coef**2, 2, axis=0), 2, axis=1)
        d2a1 = fp2(a1) * d2x1
        for i in range(4):
            for j in range(4):
                want["conv"]["kernel"] += np.einsum(
                    "hwc,o->hwco", x[e, i : i + 3, j : j + 3] ** 2, d2a1[i, j]
                )
                want["conv"]["bias"] += d2a1[i, j]
    for layer, fields in want.items():
        for name, value in fields.items():
            np.testing.assert_allclose(got[layer][name], value, rtol=1e-4, atol=1e-7)


def test_lenet5_stages_compute_the_models_outputs():
    model = lenet.LeNet5()
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
    params = model.init(jax.random.key(1), x)["params"]
    f6 = sdlm.forward(sdlm.lenet5_stages(model), params, x)
    c = jnp.asarray(layers.rbf_prototypes())
    scores = -jnp.sum(jnp.square(f6[:, None] - c[None]), -1)
    np.testing.assert_allclose(scores, model.apply({"params": params}, x), rtol=1e-5, atol=1e-4)
    h = jax.jit(sdlm.make_curvature(model, "lenet5", "lenet_map", J))(params, x)
    leaves = jax.tree.leaves(h)
    assert jax.tree.structure(h) == jax.tree.structure(params)
    assert all(bool(jnp.all(v >= 0) & jnp.all(jnp.isfinite(v))) for v in leaves)


def _optimizer(**kw):
    fields = dict(
        learning_rate=0.01, momentum=0.9, nesterov=False, weight_decay=0.0,
        schedule="constant", step_epochs=(), step_factor=0.1, warmup_epochs=0.0,
        plateau_patience=2, plateau_max_drops=3, plateau_min_delta=1e-4,
        steps_per_epoch=10, total_steps=200, batch_size=4,
    )  # fmt: skip
    fields.update(kw)
    return optim.make_optimizer("sdlm", curvature=lambda p, x: p, **fields)


def test_step_is_eta_over_mu_plus_h_times_the_gradient_with_the_papers_schedule():
    opt = _optimizer(sdlm_mu=0.02)
    params = {"w": jnp.ones(3)}
    h = {"w": jnp.asarray([0.0, 0.5, 3.0])}
    g = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    state = sdlm.with_curvature(opt.tx.init(params), h)
    etas = {0: 5e-4, 19: 5e-4, 20: 2e-4, 49: 2e-4, 50: 1e-4, 80: 5e-5, 120: 1e-5, 199: 1e-5}
    for step in range(200):
        updates, state = opt.tx.update(g, state, params)
        if step in etas:
            want = -etas[step] / (0.02 + h["w"]) * g["w"]
            np.testing.assert_allclose(updates["w"], want, rtol=1e-6)
            assert abs(opt.learning_rate(step, state) - etas[step]) < 1e-9


def test_hook_estimates_on_the_first_samples_and_hands_the_batches_back():
    opt = _optimizer(sdlm_samples=6)  # batch 4: two batches read ahead, 6 examples used
    hook = opt.before_epoch
    seen = []
    hook = sdlm.EpochEstimate(
        lambda p, x: seen.append(x.shape) or jax.tree.map(lambda v: v * 0 + x.sum(), p),
        samples=6,
        batch_size=4,
        every_steps=hook.every_steps,
    )
    batches = iter([{"image": jnp.full((4, 1), float(i))} for i in range(5)])

    params = {"w": jnp.zeros(2)}
    state = types.SimpleNamespace(params=params, opt_state=opt.tx.init(params))
    opt_state, rest = hook(state, batches)
    assert seen == [(6, 1)]
    np.testing.assert_allclose(sdlm.find_sdlm_state(opt_state).curvature["w"], [2.0, 2.0])
    assert [float(b["image"][0, 0]) for b in rest] == [0, 1, 2, 3, 4]
    assert hook.due(0) and hook.due(10) and not hook.due(5)


def _one_update(opt, step, h, g):
    """opt's update at `step` of the gradient g under curvature h."""
    params = {"w": jnp.ones(3)}
    state = sdlm.with_curvature(opt.tx.init(params), h)
    for _ in range(step + 1):
        updates, state = opt.tx.update(g, state, params)
    return updates["w"]


def test_batch_scaling_multiplies_eta_and_mu_where_asked():
    h = {"w": jnp.asarray([0.0, 0.5, 3.0])}
    g = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    for scaling, factor in (("none", 1.0), ("sqrt", 2.0), ("linear", 4.0)):  # batch 4
        got = _one_update(_optimizer(sdlm_batch_scaling=scaling), 0, h, g)
        np.testing.assert_allclose(got, -factor * 5e-4 / (0.02 + h["w"]) * g["w"], rtol=1e-6)
    opt = _optimizer(sdlm_batch_scaling="linear", sdlm_scale_mu=True)
    got = _one_update(opt, 0, h, g)
    np.testing.assert_allclose(got, -4 * 5e-4 / (4 * 0.02 + h["w"]) * g["w"], rtol=1e-6)
    np.testing.assert_allclose(got[0], -5e-4 / 0.02 * g["w"][0], rtol=1e-6)  # h = 0: eta / mu
    assert abs(opt.learning_rate(0, opt.tx.init({"w": jnp.ones(3)})) - 4 * 5e-4) < 1e-9


def test_batch_scaling_warmup_ramps_eta_to_the_scaled_eta():
    opt = _optimizer(sdlm_batch_scaling="linear", sdlm_warmup_passes=1.0)  # 10 steps a pass
    state = opt.tx.init({"w": jnp.ones(3)})
    got = [opt.learning_rate(step, state) for step in (0, 5, 10, 15, 20)]
    np.testing.assert_allclose(got, [5e-4, 2.5 * 5e-4, 4 * 5e-4, 4 * 5e-4, 4 * 2e-4], rtol=1e-6)


def test_first_pass_estimates_are_geometric_and_extra_to_the_passes():
    assert sorted(sdlm.geometric_steps(3, 10)) == [1, 2, 5]  # 10 ** (0, 1/3, 2/3)
    dense_early = sorted(sdlm.geometric_steps(30, 1875))
    assert dense_early[:6] == [1, 2, 3, 4, 5, 6] and dense_early[-1] < 1875
    hook = _optimizer(sdlm_first_pass_estimates=3).before_epoch
    assert [s for s in range(25) if hook.due(s)] == [0, 1, 2, 5, 10, 20]
    assert [s for s in range(25) if _optimizer().before_epoch.due(s)] == [0, 10, 20]


@pytest.mark.parametrize(
    "field, value",
    [
        ("sdlm_batch_scaling", "cube"),
        ("sdlm_warmup_passes", -1.0),
        ("sdlm_first_pass_estimates", -2),
    ],
)
def test_check_fields_names_a_bad_sdlm_field(field, value):
    fields = dict(
        name="sdlm", learning_rate=0.01, momentum=0.9, nesterov=False, weight_decay=0.0,
        schedule="constant", step_epochs=(), step_factor=0.1, warmup_epochs=0.0,
        plateau_patience=2, plateau_max_drops=3, plateau_min_delta=1e-4,
    )  # fmt: skip
    with pytest.raises(UserError, match=f"optim.{field}="):
        optim.check_fields(**fields, **{field: value})
