"""VGG (Simonyan & Zisserman 2015): Table 1's configurations layer by layer, dense evaluation,
warm start from A, and the config file. Numeric checks run at a reduced width
(width_divisor=16) where the property does not depend on width; counts use shape inference."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import checkpoint, finetune, models, summary
from cnn_jax.errors import UserError
from cnn_jax.models import layers, vgg
from cnn_jax.train import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VGG_CONFIG = os.path.join(REPO, "configs", "vgg.py")

# Sec. 2.3 / Table 2 (exact counts at 1000 classes, 224x224 input).
PARAMS = {
    "A": 132_863_336,
    "A-LRN": 132_863_336,
    "B": 133_047_848,
    "C": 133_638_952,
    "D": 138_357_544,
    "E": 143_667_240,
}
# Table 1: 3x3 convolutions per block, and C's 1x1 convolutions (last layer of blocks 3-5).
CONVS_PER_BLOCK = {
    "A": (1, 1, 2, 2, 2),
    "A-LRN": (1, 1, 2, 2, 2),
    "B": (2, 2, 2, 2, 2),
    "C": (2, 2, 3, 3, 3),
    "D": (2, 2, 3, 3, 3),
    "E": (2, 2, 4, 4, 4),
}
WIDTHS = (64, 128, 256, 512, 512)
SIDES = (224, 112, 56, 28, 14)  # each block's output side before its max-pool


def _expected_rows(variant):
    """(layer, output shape, parameters, MACs) of every row, from Table 1's arithmetic."""
    rows, c_in = [], 3
    blocks = zip(CONVS_PER_BLOCK[variant], WIDTHS, SIDES, strict=True)
    for b, (n, width, side) in enumerate(blocks, 1):
        for i in range(1, n + 1):
            k = 1 if variant == "C" and b >= 3 and i == n else 3
            weights = k * k * c_in * width
            row = (f"features/conv{b}_{i}", (side, side, width), weights + width)
            rows.append((*row, side * side * weights))
            c_in = width
    for name, n_in, n_out in (("fc6", 7 * 7 * 512, 4096), ("fc7", 4096, 4096), ("fc8", 4096, 1000)):
        rows.append((f"classifier/{name}", (n_out,), n_in * n_out + n_out, n_in * n_out))
    return rows


def _load_config(arg=None):
    spec = importlib.util.spec_from_file_location("_vgg_config", VGG_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("variant", list(PARAMS))
def test_table1_layers_shapes_and_parameter_counts(variant):
    s = summary.summarize(_load_config(variant))
    got = [(r.layer, r.output_shape, r.params, r.macs) for r in s.rows]
    assert got == _expected_rows(variant)
    assert s.total_params == PARAMS[variant]
    assert sum(r.params for r in s.rows) == PARAMS[variant]


def _small(variant="D", **kw):
    return vgg.VGG(variant=variant, num_classes=10, width_divisor=16, **kw)


def _init(model, side, seed=0):
    """Variables of `model` filled from NumPy (He-scaled normals): compiling Flax's
    threefry-based init of a whole VGG costs tens of seconds on a shared 2-core CPU, and
    nothing tested here depends on the init distribution (test_table1_... covers the shapes)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((1, side, side, 3)), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "mean":
            return jnp.zeros(leaf.shape, leaf.dtype)
        std = np.sqrt(2.0 / max(1, np.prod(leaf.shape[:-1]))) if name == "kernel" else 0.1
        return jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes), x


def _apply(model, **kw):
    """model.apply compiled once (op-by-op dispatch of a whole VGG is slow on CPU)."""
    return jax.jit(lambda variables, x: model.apply(variables, x, **kw))


def test_dense_evaluation_equals_plain_forward_at_224_and_gives_2x2_map_at_256():
    model = _small("A")
    variables, x224 = _init(model, 224)
    x256 = jax.random.normal(jax.random.key(7), (1, 256, 256, 3))

    @jax.jit  # one compilation for all four passes
    def passes(variables, x224, x256):
        return (
            model.apply(variables, x224, train=False),
            model.apply(variables, x224, train=False, dense=True),
            model.apply(variables, x256, method=vgg.VGG.score_map),
            model.apply(variables, x256, train=False, dense=True),
        )

    plain, dense, score_map, averaged = passes(variables, x224, x256)
    assert plain.shape == dense.shape == (1, 10) and plain.dtype == jnp.float32
    np.testing.assert_allclose(dense, plain, rtol=1e-5, atol=1e-5)
    assert score_map.shape == (1, 2, 2, 10)
    np.testing.assert_allclose(averaged, score_map.mean(axis=(1, 2)), rtol=1e-6)
    # The map is not constant: each position sees its own 224x224 window.
    assert float(jnp.abs(score_map[0, 0, 0] - score_map[0, 1, 1]).max()) > 1e-6


def test_dense_and_plain_modes_share_one_parameter_tree():
    model = _small("C")
    x = jnp.zeros((1, 224, 224, 3))
    shapes = lambda dense: jax.eval_shape(
        lambda: model.init(jax.random.key(0), x, train=False, dense=dense)
    )
    assert jax.tree.map(lambda a: a.shape, shapes(True)) == jax.tree.map(
        lambda a: a.shape, shapes(False)
    )


def test_small_inputs_reach_fc6_through_an_adaptive_pool():
    # At 224 the pool is the identity; a 32x32 input leaves a 1x1 map, replicated to 7x7.
    np.testing.assert_array_equal(vgg.adaptive_avg_pool_matrix(7, 7), np.eye(7))
    np.testing.assert_array_equal(vgg.adaptive_avg_pool_matrix(1, 7), np.ones((7, 1)))
    np.testing.assert_allclose(vgg.adaptive_avg_pool_matrix(8, 7).sum(axis=1), np.ones(7))
    model = _small("B")
    variables, x = _init(model, 32)
    assert variables["params"]["classifier"]["fc6"]["kernel"].shape == (7 * 7 * 32, 256)
    assert _apply(model, train=False)(variables, x).shape == (1, 10)
    with pytest.raises(ValueError, match="at least 224"):
        model.apply(variables, x, train=False, dense=True)


def test_a_lrn_normalises_after_the_first_convolution():
    a, a_lrn = _small("A"), _small("A-LRN")
    variables, x = _init(a, 32)
    # Same parameters (LRN has none); scaled-up input so the LRN's denominator matters.
    out_a = _apply(a, train=False)(variables, 50.0 * x)
    out_lrn = _apply(a_lrn, train=False)(variables, 50.0 * x)
    assert float(jnp.abs(out_a - out_lrn).max()) > 1e-4


def test_batch_norm_variant_and_dropout_in_training():
    model = _small("A", batch_norm=True, dropout_rate=0.5)
    variables, x = _init(model, 32)
    assert "bias" not in variables["params"]["features"]["conv1_1"]
    assert set(variables["batch_stats"]["features"]["conv1_1_bn"]) == {"mean", "var"}
    x = jnp.concatenate([x, 2.0 * x + 1.0])
    train = jax.jit(
        lambda key: model.apply(
            variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
        )
    )
    (out0, new0), (out1, _) = train(jax.random.key(0)), train(jax.random.key(1))
    assert float(jnp.abs(out0 - out1).max()) > 0  # dropout differs by key
    moved = new0["batch_stats"]["features"]["conv1_1_bn"]["mean"]
    assert float(jnp.abs(moved).max()) > 0  # running statistics updated


def test_half_precision_computes_in_bfloat16_and_returns_float32():
    model = _small("A", dtype=jnp.bfloat16)
    variables, x = _init(model, 32)
    assert variables["params"]["features"]["conv1_1"]["kernel"].dtype == jnp.float32
    assert _apply(model, train=False)(variables, x).dtype == jnp.float32


def _build(**fields):
    return models.build_model("vgg", num_classes=10, dtype=jnp.float32, **fields)


def test_variant_names_and_bad_arguments():
    names = ("d", "vgg16", "VGG19", "a-lrn", "vgg11", "vgg13")
    assert [vgg.resolve_variant(n) for n in names] == ["D", "D", "E", "A-LRN", "A", "B"]
    assert _build(variant="vgg11", width_divisor=16).variant == "A"
    bad = [
        ({"variant": "F"}, r"--config.model.variant=F: .*A, A-LRN, B, C, D, E"),
        ({"width_divisor": 3}, "--config.model.width_divisor=3 is not one of: 1, 2, 4, 8, 16"),
        ({"vgg_variant": "D"}, r"--config.model.vgg_variant: vgg has no such field \(its fields"),
    ]
    for fields, message in bad:  # raised before anything compiles, in one line
        with pytest.raises(UserError, match=message) as error:
            _build(**fields)
        assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="is too small for vgg: it needs at least 32"):
        models.check_input("vgg", 31, 10)
    with pytest.raises(UserError, match="unknown VGG configuration 'vgg17'"):
        _load_config("vgg17")


def test_registry_entry():
    spec = models.spec("vgg")
    assert (spec.dense, spec.preprocess, spec.min_image_size, spec.towers) == (True, "vgg", 32, 1)
    assert models.model_config("vgg").to_dict() == {
        "name": "vgg",
        "variant": "D",
        "batch_norm": False,
        "dropout_rate": 0.5,
        "width_divisor": 1,
        "warm_start_from": "",
    }
    # warm_start_from is the run's (cnn_jax.warm_start), not the module's.
    assert _build(warm_start_from="/somewhere", width_divisor=16).width_divisor == 16


def test_config_is_the_papers_recipe():
    c = _load_config("vgg16")
    assert (c.model.name, c.model.variant, c.input.image_size, c.data.name) == (
        "vgg",
        "D",
        224,
        "imagenet2012",
    )
    assert (c.input.batch_size, c.optim.momentum, c.optim.weight_decay) == (256, 0.9, 5e-4)
    assert (c.optim.learning_rate, c.optim.schedule, c.optim.plateau_max_drops) == (
        1e-2,
        "plateau",
        3,
    )
    assert (c.model.dropout_rate, c.run.num_epochs) == (0.5, 74.0)
    assert _load_config().model.variant == "D"


def test_digits_configs_keep_the_variant_and_subtract_the_training_mean():
    """configs/vgg.py:<variant>_digits is that Table 1 column on the bundled digits, with the
    paper's optimiser and regularisation, and the mean of the digits' training split (Sec. 2.1)."""
    from cnn_jax.data import bundled_digits

    letters = {n: _load_config(f"{n}_digits").model.variant for n in ("A", "a-lrn", "vgg16")}
    assert letters == {"A": "A", "a-lrn": "A-LRN", "vgg16": "D"}
    c = _load_config("A_digits")
    assert (c.data.name, c.input.image_size, c.model.width_divisor) == ("bundled_digits", 64, 8)
    assert (c.optim.momentum, c.optim.weight_decay, c.model.dropout_rate) == (0.9, 5e-4, 0.5)
    images, labels = bundled_digits.load_arrays()
    train_mean = images[bundled_digits.split_indices(labels)["train"]].mean()
    assert c.input.mean_rgb == (pytest.approx(train_mean, abs=0.01),) * 3
    with pytest.raises(UserError, match="unknown VGG configuration 'F'"):
        _load_config("F_digits")


@pytest.mark.parametrize("batch_norm", [False, True])
def test_cpu_kernels_match_flax_in_value_and_gradients(batch_norm):
    """VGG built from the CPU kernel set (layers.Conv, ops.dot_general, ops.max_pool) has the
    parameter tree of the one built from Flax's own (nn.Conv, lax.dot_general, nn.max_pool)
    and computes the same scores and gradients, to float32 rounding."""
    kw = dict(variant="A-LRN", num_classes=10, width_divisor=16, batch_norm=batch_norm)
    cpu = vgg.VGG(**kw, **layers.Kernels.for_backend("cpu").fields())
    flax_own = vgg.VGG(**kw, **layers.Kernels.for_backend("gpu").fields())
    assert flax_own.conv is layers.FlaxConv and issubclass(layers.FlaxConv, nn.Conv)
    variables, x = _init(cpu, 64)
    x = jnp.concatenate([x, -x])
    labels = jnp.array([3, 7])
    shapes = jax.eval_shape(lambda: flax_own.init(jax.random.key(0), x, train=False))
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, variables)

    def loss(model, params):
        v = {**variables, "params": params}
        scores, _ = model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})
        return jnp.mean(scores[jnp.arange(2), labels] - jax.nn.logsumexp(scores, -1)), scores

    key = jax.random.key(5)
    grad = lambda model: jax.jit(jax.grad(lambda p: loss(model, p), has_aux=True))
    (g1, y1), (g0, y0) = grad(cpu)(variables["params"]), grad(flax_own)(variables["params"])
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6 * float(jnp.abs(y0).max()))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


# --- Warm start (Sec. 3.1) ------------------------------------------------------------------

COPIED = {("features", n) for n in ("conv1_1", "conv2_1", "conv3_1", "conv3_2")} | {
    ("classifier", n) for n in ("fc6", "fc7", "fc8")
}


def _state(params, batch_stats=None):
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats=batch_stats or {},
        opt_state=(),
        rng=jax.random.key(0),
    )


@pytest.mark.parametrize("target", ["B", "C", "D", "E"])
def test_warm_start_copies_exactly_the_layers_the_paper_names(tmp_path, target):
    source, _ = _init(_small("A"), 32, seed=1)
    fresh, _ = _init(_small(target), 32, seed=2)
    if target == "D":  # once through a real checkpoint on disk, read back partially
        ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=1, async_save=False)
        ckpt.save(5, _state(source["params"]))
        ckpt.close()
        started = finetune.warm_start(_state(fresh["params"]), str(tmp_path)).params
    else:
        started = finetune.copy_layers(fresh, source)["params"]

    for parent, children in fresh["params"].items():
        for name in children:
            expected = source if (parent, name) in COPIED else fresh
            got, want = started[parent][name], expected["params"][parent][name]
            assert jax.tree.structure(got) == jax.tree.structure(want)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{parent}/{name}")
    assert {(p, n) for p in fresh["params"] for n in fresh["params"][p]} >= COPIED


def test_warm_start_rejects_a_checkpoint_that_does_not_fit():
    source, _ = _init(vgg.VGG(variant="A", num_classes=5, width_divisor=16), 32)
    fresh, _ = _init(_small("D"), 32)
    with pytest.raises(UserError, match="classifier/fc8"):
        finetune.copy_layers(fresh, source)
    bn, _ = _init(_small("D", batch_norm=True), 32)
    with pytest.raises(UserError, match="conv1_1"):
        finetune.copy_layers(bn, source)


def test_warm_start_is_vgg_s_field_alone(tmp_path):
    """Other models have no warm_start_from field: asking for one is refused in one line."""
    with pytest.raises(UserError, match=r"--config.model.warm_start_from: lenet5 has no such"):
        models.build_model("lenet5", num_classes=10, dtype=jnp.float32, warm_start_from="x")
