"""AlexNet (Krizhevsky et al. 2012) as one module: layer shapes and parameter counts at the
paper's size (shape inference only), LRN against the paper's formula, tower isolation on one
device, initialisation, and the config and validation hooks. Numeric checks run at 64x64
inputs, the smallest the net takes, and where width does not matter at width_divisor=8."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import defaults, experiment, models, validation
from cnn_jax.errors import UserError
from cnn_jax.models import alexnet
from cnn_jax.models.layers import local_response_norm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALEXNET_CONFIG = os.path.join(REPO, "configs", "alexnet.py")

# Per layer at 224x224 and 1000 classes: (output shape, parameters), from the paper's widths.
LAYERS = {
    "conv1": ((55, 55, 96), 11 * 11 * 3 * 96 + 96),
    "conv2": ((27, 27, 256), 5 * 5 * 48 * 256 + 256),  # each map reads its tower's 48
    "conv3": ((13, 13, 384), 3 * 3 * 256 * 384 + 384),  # reads both towers' 256
    "conv4": ((13, 13, 384), 3 * 3 * 192 * 384 + 384),
    "conv5": ((13, 13, 256), 3 * 3 * 192 * 256 + 256),
    "fc6": ((4096,), 6 * 6 * 256 * 4096 + 4096),
    "fc7": ((4096,), 4096 * 4096 + 4096),
    "fc8": ((1000,), 4096 * 1000 + 1000),
}


def _shapes(model, side=224):
    """Parameter shapes and each layer's output shape, by shape inference alone."""
    x = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)

    def run(x):
        variables = model.init(jax.random.key(0), x, train=False)
        _, state = model.apply(
            variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        return variables["params"], state["intermediates"]

    return jax.eval_shape(run, x)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_layers_shapes_and_parameter_counts_at_224():
    params, outputs = _shapes(alexnet.AlexNet())
    for name, (shape, count) in LAYERS.items():
        assert outputs[name]["__call__"][0].shape == (1, *shape), name
        assert _count(params[name]) == count, name
    assert _count(params) == 60_965_224  # the paper's 60 million
    # The pools: conv2's 27 is pool1 of 55, conv3's 13 pool2 of 27, fc6's 9216 inputs 6x6x256.
    assert params["fc6"]["kernel"].shape == (6 * 6 * 256, 4096)


def test_conv1_padding_is_cuda_convnets_arithmetic():
    assert alexnet.conv1_padding(224) == (0, 3)  # 1 + ceil(213 / 4) = 55 positions
    assert alexnet.conv1_padding(227) == (0, 0)  # (227 - 11) / 4 + 1 = 55 exactly


def test_single_tower_variant_has_full_connectivity():
    params, _ = _shapes(alexnet.AlexNet(towers=1))
    assert params["conv2"]["kernel"].shape == (5, 5, 96, 256)
    assert params["conv4"]["kernel"].shape == (3, 3, 384, 384)
    assert params["conv5"]["kernel"].shape == (3, 3, 384, 256)
    assert _count(params) == 62_378_344


def test_the_split_module_has_the_same_global_parameters():
    """One checkpoint serves both: init of the tower-split module builds the global arrays."""

    def shapes(model):
        x = jnp.zeros((1, 224, 224, 3))
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
        return jax.tree.map(lambda p: p.shape, params)

    assert shapes(alexnet.AlexNet(tower_axis="model")) == shapes(alexnet.AlexNet())


def test_smallest_input_and_fc6_fan_in_follow_the_image_size():
    params, outputs = _shapes(alexnet.AlexNet(), side=alexnet.MIN_IMAGE_SIZE)
    assert outputs["conv1"]["__call__"][0].shape[1] == 15  # pools: 7, 3, 1
    assert params["fc6"]["kernel"].shape == (256, 4096)
    # One pixel less: 14 conv1 positions, pools 6, 2, 0 -- nothing left for fc6 to read.
    params, _ = _shapes(alexnet.AlexNet(), side=alexnet.MIN_IMAGE_SIZE - 1)
    assert params["fc6"]["kernel"].shape == (0, 4096)


def test_lrn_is_the_papers_formula():
    """b[c] = a[c] / (k + alpha * sum_{max(0, c-n/2)}^{min(N-1, c+n/2)} a[j]^2) ** beta,
    alpha not divided by n (Sec. 3.3)."""
    a = np.random.default_rng(0).normal(scale=30.0, size=(2, 3, 3, 12)).astype(np.float32)
    k, n, alpha, beta = 2.0, 5, 1e-4, 0.75
    b = np.empty_like(a)
    channels = a.shape[-1]
    for c in range(channels):
        lo, hi = max(0, c - n // 2), min(channels - 1, c + n // 2)
        b[..., c] = a[..., c] / (k + alpha * np.sum(a[..., lo : hi + 1] ** 2, axis=-1)) ** beta
    np.testing.assert_allclose(local_response_norm(jnp.asarray(a)), b, rtol=1e-5)


def host_params(model, side=64, seed=0):
    """Parameters of the model's shapes drawn with NumPy: N(0, 0.01) weights, biases 0.1.
    Tests whose property does not depend on the paper's initialisation skip compiling init
    (threefry random numbers are slow to compile on a CPU)."""
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, side, side, 3)), train=False)
    )["params"]
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if path[-1].key == "bias":
            return np.full(s.shape, 0.1, np.float32)
        return rng.normal(0.0, 0.01, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _towers(y):
    half = y.shape[-1] // 2
    return y[..., :half], y[..., half:]


def test_towers_talk_only_at_conv3_and_the_fc_layers():
    """Changing tower 0's input maps of conv2, conv4 or conv5 leaves tower 1's output of that
    layer exactly as it was (grouped convolutions, LRN within a tower) and changes tower 0's;
    changing them for conv3 changes both towers' conv3 outputs (it reads both)."""
    model = alexnet.AlexNet(num_classes=10)
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    params = {"params": host_params(model)}
    layers = ("conv2", "conv3", "conv4", "conv5")

    def outputs(params, x, perturbed_layer=None):
        def perturb_tower0_input(next_fun, args, kwargs, context):
            hit = context.module.name == perturbed_layer and context.method_name == "__call__"
            if perturbed_layer is not None and hit:
                y = args[0]
                args = (y.at[..., : y.shape[-1] // 2].add(1.0), *args[1:])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(perturb_tower0_input):
            _, state = model.apply(
                params, x, train=False, capture_intermediates=True, mutable=["intermediates"]
            )
        return {k: state["intermediates"][k]["__call__"][0] for k in layers}

    @jax.jit  # one compilation for the reference and the four perturbed runs
    def all_runs(params, x):
        return outputs(params, x), {layer: outputs(params, x, layer) for layer in layers}

    before, after = all_runs(params, x)
    for layer in layers:
        tower0_before, tower1_before = _towers(before[layer])
        tower0_after, tower1_after = _towers(after[layer][layer])
        assert not np.allclose(tower0_after, tower0_before), layer
        if layer == "conv3":
            assert not np.allclose(tower1_after, tower1_before)
        else:
            np.testing.assert_array_equal(tower1_after, tower1_before, err_msg=layer)


# Per init (config.model.init): the weight std of each layer (None: He's sqrt(2 / fan_in),
# fan_in from the kernel's shape) and the bias of conv2/4/5, fc6/fc7 (0 in conv1/3, fc8).
POSITIVE_BIAS_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")
INITS = {
    "paper": ({}, 0.01, 1.0),  # Sec. 5
    "caffe": ({"fc6": 0.005, "fc7": 0.005}, 0.01, 0.1),  # bvlc_alexnet train_val.prototxt
    "he": ({}, None, 0.0),  # He et al. 2015, Sec. 2.2
}


@pytest.fixture(scope="module")
def initialised():
    """The parameters of a width/4 AlexNet at 64x64 under every init, from one compilation.
    An "rbg" key: the same initialisers, but random bits that compile in a fraction of
    threefry's time on a CPU."""
    nets = {init: _build(width_divisor=4, init=init) for init in INITS}
    key = jax.random.key(0, impl="rbg")
    x = jnp.zeros((1, 64, 64, 3))
    init_all = lambda k: {i: n.init(k, x, train=False)["params"] for i, n in nets.items()}
    return jax.jit(init_all)(key)


@pytest.mark.parametrize("init", list(INITS))
def test_each_initialisation_draws_its_layer_statistics(initialised, init):
    """Zero-mean Gaussian weights of each layer's std (within 5%, on >= 8,000 draws a layer)
    and exactly the init's constant biases."""
    own_std, std, positive_bias = INITS[init]
    for name, layer in initialised[init].items():
        kernel = np.asarray(layer["kernel"], np.float64)
        fan_in = int(np.prod(kernel.shape[:-1]))  # conv2/4/5: their own tower's maps
        expected = own_std.get(name, std) or np.sqrt(2.0 / fan_in)
        assert kernel.std() == pytest.approx(expected, rel=0.05), name
        assert abs(kernel.mean()) < 0.05 * expected, name
        bias = positive_bias if name in POSITIVE_BIAS_LAYERS else 0.0
        np.testing.assert_array_equal(layer["bias"], np.float32(bias), err_msg=name)


def test_he_fan_in_at_full_width_is_what_each_unit_reads():
    """At the paper's widths a unit of conv2/4/5 reads only its tower's maps (5x5x48 = 1,200
    inputs for conv2), conv3 both towers' (3x3x256): He's std is sqrt(2 / that). The layers'
    kernels drawn alone, from the full-size shapes."""
    shapes = jax.eval_shape(
        lambda: alexnet.AlexNet().init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )["params"]
    fan_ins = {"conv2": 5 * 5 * 48, "conv3": 3 * 3 * 256, "conv4": 3 * 3 * 192, "conv5": 1728}
    he = alexnet.INITIALISATIONS["he"]
    key = jax.random.key(1, impl="rbg")
    for name, fan_in in fan_ins.items():
        kernel = np.asarray(he.kernel_init(name)(key, shapes[name]["kernel"].shape))
        assert kernel.std() == pytest.approx(np.sqrt(2.0 / fan_in), rel=0.02), name


def test_dropout_only_in_training_and_half_precision_computes_in_bfloat16():
    model = alexnet.AlexNet(num_classes=10, width_divisor=8, dtype=jnp.bfloat16)
    x = np.random.default_rng(1).normal(size=(4, 64, 64, 3)).astype(np.float32)
    params = {"params": host_params(model)}

    @jax.jit
    def scores(params, x, key):
        train = model.apply(params, x, train=True, rngs={"dropout": key})
        return train, model.apply(params, x, train=False)

    train_a, eval_a = scores(params, x, jax.random.key(2))
    train_b, eval_b = scores(params, x, jax.random.key(3))
    assert eval_a.dtype == jnp.float32
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_a, train_b)
    hlo = scores.lower(params, x, jax.random.key(2)).as_text()
    assert "bf16" in hlo and "convolution" in hlo


def _config(**overrides):
    """The nested config of a small AlexNet run; overrides by dotted name ("input.image_size")."""
    c = defaults.get_default_config("alexnet")
    c.data.name = "synthetic"
    c.input.image_size = 64
    c.input.preprocess = "scale_to_unit"
    c.input.batch_size = 8
    c.mesh.model = 2
    for path, value in overrides.items():
        if path == "model.name":
            c.model = models.model_config(value)
            continue
        group, field = path.split(".")
        c[group][field] = value
    return c


def _check(config, num_devices, process_count=1):
    """What a run checks before compiling: the machine-resolved copy's mesh against the
    devices and processes (validation), and the model's own arguments (experiment.model)."""
    resolved = experiment.resolve(config, num_devices, process_count)
    mesh = resolved.mesh
    validation.check_mesh(
        data=mesh.data, model=mesh.model, spmd=mesh.spmd,
        batch_size=resolved.input.batch_size, num_devices=num_devices,
        process_count=process_count,
    )  # fmt: skip
    experiment.model(resolved)


def _build(name="alexnet", **kw):
    return models.build_model(name, num_classes=10, dtype=jnp.float32, **kw)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"input.image_size": 63}, "needs at least 64"),
        ({"mesh.model": 4}, "alexnet cannot be split over the model axis; it takes 1 or 2"),
        (
            {"model.name": "lenet5", "input.image_size": 32, "input.preprocess": "lenet"},
            "lenet5 cannot be split",
        ),
        ({"mesh.model": 3}, "does not fit the 8 available devices"),
        ({"mesh.data": 2}, "does not fit the 8 available devices"),
        (
            {"model.width_divisor": 3},
            "--config.model.width_divisor=3 is not one of: 1, 2, 4, 8, 16",
        ),
    ],
)
def test_bad_meshes_and_sizes_are_one_line_before_compiling(overrides, message):
    with pytest.raises(UserError, match=message) as error:
        _check(_config(**overrides), num_devices=8)
    assert "\n" not in str(error.value)


def test_the_model_rejects_its_own_bad_arguments_in_one_line():
    cases = [
        (lambda: models.check_input("alexnet", 63, 10), "image_size=63 is too small for alexnet"),
        (lambda: _build(model_axis=4), "--config.mesh.model=4: alexnet cannot be split"),
        (lambda: _build(width_divisor=3), "--config.model.width_divisor=3 is not one of: 1, 2,"),
        (lambda: _build(init="xavier"), "--config.model.init='xavier' is not one of: paper,"),
        (lambda: _build(variant="D"), "--config.model.variant: alexnet has no such field"),
        (lambda: _build("alexnet_single_tower", model_axis=2), "alexnet_single_tower cannot"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


def test_processes_must_hold_whole_data_shards():
    """Each process reads its own examples: two processes with one device each cannot split
    one data shard's towers between them (and pmap runs in one process)."""
    with pytest.raises(UserError, match=r"data axis \(1\) is not a multiple of the 2 processes"):
        _check(_config(), num_devices=2, process_count=2)
    with pytest.raises(UserError, match="spmd=pmap runs in one process"):
        _check(_config(**{"mesh.spmd": "pmap"}), num_devices=8, process_count=2)
    _check(_config(), num_devices=8, process_count=2)  # 4x2 over 2 x 4


def test_registry_splits_the_towers_only_on_a_model_axis_of_two():
    assert _build(model_axis=2).tower_axis == "model"
    assert _build(model_axis=1).tower_axis is None
    single = _build("alexnet_single_tower", model_axis=1)
    assert single.towers == 1 and single.tower_axis is None
    spec = models.spec("alexnet")
    assert (spec.model_axis_sizes, spec.towers, spec.preprocess) == ((1, 2), 2, "alexnet")
    assert models.model_config("alexnet").to_dict() == {
        "name": "alexnet",
        "dropout_rate": 0.5,
        "width_divisor": 1,
        "init": "paper",
    }
    _check(_config(**{"mesh.model": 2}), num_devices=8)  # 4x2 is fine


def _load_config(arg=None):
    spec = importlib.util.spec_from_file_location("_alexnet_config", ALEXNET_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_config_is_the_papers_recipe():
    c = _load_config()
    # mesh.model 0: the towers' split is chosen per machine (test_the_mesh_is_chosen_per_machine)
    assert (c.model.name, c.mesh.model, c.input.image_size, c.data.name) == (
        "alexnet",
        0,
        224,
        "imagenet2012",
    )
    assert (c.optim.name, c.optim.momentum, c.optim.weight_decay, c.input.batch_size) == (
        "sgd",
        0.9,
        5e-4,
        128,
    )
    assert (c.optim.learning_rate, c.optim.schedule, c.run.num_epochs) == (0.01, "plateau", 90.0)
    assert c.model.dropout_rate == 0.5 and c.input.preprocess == "alexnet"
    assert c.model.init == "paper"  # Sec. 5, for ImageNet
    digits = _load_config("digits")  # the paper's net and optimiser; Caffe's init
    assert (digits.model.init, digits.model.width_divisor, digits.input.image_size) == (
        "caffe",
        1,
        224,
    )
    assert (digits.data.name, digits.input.batch_size, digits.input.preprocess) == (
        "bundled_digits",
        32,
        "alexnet",
    )
    assert (digits.optim.name, digits.optim.momentum, digits.optim.weight_decay) == (
        "sgd",
        0.9,
        5e-4,
    )
    assert (digits.optim.learning_rate, digits.optim.schedule, digits.optim.step_factor) == (
        0.01,
        "step",
        0.1,
    )
    with pytest.raises(UserError, match="takes two_tower, single_tower or digits, not 'x'"):
        _load_config("x")
    single = _load_config("single_tower")
    assert single.model.name == "alexnet_single_tower"
    single.data.name = "synthetic"
    assert experiment.resolve(single, 8).mesh.model == 1


@pytest.mark.parametrize(
    "devices, batch, processes, axis, says",
    [
        (8, 8, 1, 2, "2 towers on separate devices, the paper's split (data=4 x model=2)"),
        (2, 8, 1, 2, "(data=1 x model=2)"),
        (1, 8, 1, 1, "together on each of the 1 device(s) (data=1 x model=1)"),  # laptop, GPU
        (3, 9, 1, 1, "(data=3 x model=1)"),  # an odd device count
        (8, 6, 1, 1, "(data=8 x model=1)"),  # 4 data shards cannot split 6 images
        (2, 8, 2, 1, "(data=2 x model=1)"),  # 2 processes of 1 device: a tower pair each
    ],
)
def test_the_mesh_is_chosen_per_machine(devices, batch, processes, axis, says):
    """configs/alexnet.py leaves the model axis to the machine (mesh.model=0): a device per
    tower where the devices hold whole tower pairs that split the batch and processes, else
    every device runs both towers; one line says which."""
    c = _load_config()
    c.data.name = "synthetic"
    c.input.batch_size = batch
    c = experiment.resolve(c, devices, processes)
    notice = experiment.mesh_notice(c.model.name, c.mesh.model, devices)
    assert c.mesh.model == axis
    assert says in notice and "\n" not in notice
    assert (experiment.model(c).tower_axis == "model") == (axis == 2)


def test_a_mesh_the_user_chose_is_kept_or_refused():
    c = _config(**{"mesh.model": 2})
    assert experiment.resolve(c, 1).mesh.model == 2
    with pytest.raises(UserError, match="does not fit the 1 available devices"):
        _check(c, num_devices=1)
    lenet = defaults.get_default_config()
    lenet.mesh.model = 0
    lenet = experiment.resolve(lenet, 8)
    assert lenet.mesh.model == 1  # no towers
    assert experiment.mesh_notice(lenet.model.name, lenet.mesh.model, 8) is None
    with pytest.raises(UserError, match=r"--config.mesh.model=-1 must be >= 1 \(or 0"):
        _check(_config(**{"mesh.model": -1}), num_devices=8)
