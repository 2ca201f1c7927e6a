"""LeNet-5 against the paper and the seed deck: shapes, exact parameter counts, Table I."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import losses, models
from cnn_jax.errors import UserError
from cnn_jax.models import layers
from cnn_jax.models.lenet import LeNet5, LeNet5Modern

# The seed deck's per-layer arithmetic (and the paper's Sec. II-B).
SEED_DECK_COUNTS = {"C1": 156, "S2": 12, "C3": 1516, "S4": 32, "C5": 48120, "F6": 10164}


def _init(model, rng=0):
    return model.init(jax.random.key(rng), jnp.zeros((1, 32, 32, 1)))["params"]


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_per_layer_parameter_counts_match_the_seed_deck():
    params = jax.eval_shape(lambda: _init(LeNet5()))
    assert {name: _count(p) for name, p in params.items()} == SEED_DECK_COUNTS
    assert _count(params) == 60_000


def test_per_layer_output_shapes():
    captured = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name:
            captured[context.module.name] = out.shape
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(
            lambda: LeNet5().init_with_output(jax.random.key(0), jnp.zeros((2, 32, 32, 1)))
        )
    assert captured["C1"] == (2, 28, 28, 6)
    assert captured["S2"] == (2, 14, 14, 6)
    assert captured["C3"] == (2, 10, 10, 16)
    assert captured["S4"] == (2, 5, 5, 16)
    assert captured["C5"] == (2, 1, 1, 120)
    assert captured["F6"] == (2, 84)
    assert captured["output"] == (2, 10)


def test_c3_connection_table_is_the_papers_table_one():
    table = layers.LENET5_C3_TABLE
    assert table[0] == (0, 1, 2) and table[4] == (4, 5, 0) and table[5] == (5, 0, 1)
    assert table[6] == (0, 1, 2, 3) and table[11] == (5, 0, 1, 2)
    assert table[12:15] == ((0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5))
    assert table[15] == (0, 1, 2, 3, 4, 5)
    assert sum(len(t) for t in table) == 60


def test_a_c3_map_ignores_s2_maps_it_is_not_connected_to():
    c3 = layers.SparseConv(layers.LENET5_C3_TABLE, num_inputs=6)
    x = jax.random.normal(jax.random.key(1), (1, 14, 14, 6))
    params = c3.init(jax.random.key(2), x)
    base = c3.apply(params, x)
    connected = layers.connection_matrix(layers.LENET5_C3_TABLE, 6)
    for s2_map in range(6):
        changed = c3.apply(params, x.at[..., s2_map].add(5.0))
        moved = np.abs(np.asarray(changed - base)).max(axis=(0, 1, 2)) > 1e-6
        np.testing.assert_array_equal(moved, connected[s2_map], err_msg=f"S2 map {s2_map}")


def test_trainable_subsampling_is_a_scaled_block_sum_then_squash():
    s2 = layers.TrainableSubsampling()
    x = jax.random.normal(jax.random.key(3), (2, 4, 4, 3))
    p = {
        "params": {"coefficient": jnp.array([0.5, -1.0, 2.0]), "bias": jnp.array([0.1, 0.0, -0.2])}
    }
    got = s2.apply(p, x)
    blocks = np.asarray(x).reshape(2, 2, 2, 2, 2, 3).sum(axis=(2, 4))
    want = 1.7159 * np.tanh(2 / 3 * (blocks * [0.5, -1.0, 2.0] + [0.1, 0.0, -0.2]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_squashing_function_fixes_plus_minus_one():
    np.testing.assert_allclose(
        layers.lecun_tanh(jnp.array([1.0, -1.0, 0.0])), [1, -1, 0], atol=2e-4
    )


def test_rbf_output_is_squared_distance_to_fixed_prototypes():
    protos = layers.rbf_prototypes()
    assert protos.shape == (10, 84) and set(np.unique(protos)) == {-1.0, 1.0}
    x = jax.random.normal(jax.random.key(4), (3, 84))
    got = layers.EuclideanRBF().apply({}, x)
    want = ((np.asarray(x)[:, None, :] - protos[None]) ** 2).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # A perfect prototype scores best for its own class.
    scores = -layers.EuclideanRBF().apply({}, jnp.asarray(protos))
    np.testing.assert_array_equal(np.argmax(scores, axis=-1), np.arange(10))


def test_map_loss_matches_the_papers_formula():
    scores = -jnp.array([[3.0, 1.0, 7.0], [0.5, 2.0, 4.0]])  # RBF distances y = [[3,1,7],...]
    labels = jnp.array([1, 0])
    got = losses.lenet_map(scores, labels, j=2.0)
    y = -np.asarray(scores)
    want = [y[i, labels[i]] + np.log(np.exp(-2.0) + np.exp(-y[i]).sum()) for i in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("model", [LeNet5(), LeNet5Modern()])
def test_scores_shape_and_finite(model):
    params = _init(model)
    out = model.apply({"params": params}, jnp.ones((4, 32, 32, 1)))
    assert out.shape == (4, 10) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()


def test_registry_builds_both_with_the_backends_kernels():
    for name, cls in (("lenet5", LeNet5), ("lenet5_modern", LeNet5Modern)):
        assert models.model_config(name).to_dict() == {"name": name}  # no fields of their own
        cpu = models.build_model(name, num_classes=10, dtype=jnp.float32, backend="cpu")
        gpu = models.build_model(name, num_classes=10, dtype=jnp.float32, backend="gpu")
        assert type(cpu) is cls and (cpu.conv, gpu.conv) == (layers.Conv, layers.FlaxConv)
        # The same parameter tree, whichever kernels: checkpoints move between machines.
        assert jax.tree.map(jnp.shape, jax.eval_shape(lambda m=cpu: _init(m))) == jax.tree.map(
            jnp.shape, jax.eval_shape(lambda m=gpu: _init(m))
        )
    assert models.spec("lenet5").preprocess == "lenet"


def test_inputs_lenet5_takes():
    models.check_input("lenet5", 32, 10)
    models.check_input("lenet5_modern", 32, 3)  # a softmax head takes any class count
    with pytest.raises(UserError, match=r"--config\.input\.image_size=28: lenet5 takes 32"):
        models.check_input("lenet5", 28, 10)
    with pytest.raises(UserError, match=r"^--config\.data\.num_classes=5: LeNet-5's RBF output"):
        models.check_input("lenet5", 32, 5, "--config.data.num_classes=5")


def test_cpu_and_flax_kernels_give_the_same_scores_and_gradients():
    """LeNet5Modern from the CPU kernels (layers.Conv, ops.*) against Flax's own (nn.Conv,
    lax.dot_general, nn.max_pool), same parameters: float32 rounding apart."""
    x = jax.random.normal(jax.random.key(6), (4, 32, 32, 1))
    cpu, flax_own = (LeNet5Modern(**layers.Kernels.for_backend(b).fields()) for b in ("cpu", "gpu"))
    params = _init(cpu)

    def grads(model):
        return jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x)))))

    got, want = jax.tree.leaves(grads(cpu)(params)), jax.tree.leaves(grads(flax_own)(params))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
    np.testing.assert_allclose(
        cpu.apply({"params": params}, x),
        flax_own.apply({"params": params}, x),
        rtol=1e-5,
        atol=1e-5,
    )
