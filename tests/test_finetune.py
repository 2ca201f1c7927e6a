"""Fine-tuning (cnn_jax/finetune.py): a new run from trained weights (run.init_from), the
layers that train (optim.trainable) and stay bit-identical when frozen, and a rerun that
resumes from its own checkpoint rather than from the weights it started from.

The trained weights are checkpoints written here from variables filled by NumPy (test_vgg's
`_init`: compiling Flax's init of a whole net costs tens of seconds on a shared CPU); one
tiny VGG-A run trains on a generated 3-class folder (cnn_jax.data.shapes_folder).
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from test_faults import (  # noqa: F401 (shared_compilation_cache: autouse, the rerun's cache)
    VGG_CONFIG,
    _assert_same_state,
    _load_config_file,
    _no_compiles,
    run_main,
    shared_compilation_cache,
)
from test_vgg import _init, _state

from cnn_jax import checkpoint, defaults, finetune, models, optim, train
from cnn_jax.data import shapes_folder
from cnn_jax.errors import UserError
from cnn_jax.models import vgg

SOURCE_CLASSES = 5  # the trained weights' class count; the folder has 3


def _save(directory, variables, step=7):
    """A checkpoint of `variables` (step `step`) in directory/checkpoints, as a run leaves it."""
    ckpt = checkpoint.Checkpointer(os.path.join(directory, "checkpoints"), keep=1, async_save=False)
    ckpt.save(step, _state(variables["params"], variables.get("batch_stats")))
    ckpt.close()
    return str(directory)


@pytest.fixture(scope="module")
def vgg_a(tmp_path_factory):
    """(workdir, variables): a VGG-A (width / 16) of SOURCE_CLASSES classes, saved at step 7."""
    model = vgg.VGG(variant="A", num_classes=SOURCE_CLASSES, width_divisor=16)
    variables, _ = _init(model, 32, seed=1)
    return _save(tmp_path_factory.mktemp("vgg_a"), variables), jax.device_get(variables)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    shapes_folder.write(root, train_per_class=8, val_per_class=2, side=32)
    return root


def _vgg_a_run(folder, **fields):
    """configs/vgg.py:A at width / 16 and 32 px on `folder`: 24 steps of 8 images, a
    checkpoint every 12; `fields` override ("run.init_from": ...)."""
    c = _load_config_file(VGG_CONFIG, "A")
    c.update_from_flattened_dict(
        {
            "model.width_divisor": 16,
            "model.dropout_rate": 0.0,  # a loss that falls step by step
            "data.name": "image_folder",
            "data.manual_dir": folder,
            "input.image_size": 32,
            "input.batch_size": 8,
            "input.cache": True,
            "optim.schedule": "constant",
            "run.num_train_steps": 24,
            "run.log_every_steps": 1,
            "run.checkpoint_every_steps": 12,
            "run.progress_bar": False,
            "eval.every_epochs": 1000.0,  # once, at the end
            **fields,
        }
    )
    return c


def _train_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def _assert_equal_trees(got, want):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)


@pytest.fixture
def rbg_keys():
    """Random keys of the rbg generator for one test: compiling a VGG's init with threefry's
    (the default) costs ~10 s of CPU here, with rbg's ~2 s; what is tested does not depend on
    the random numbers the fresh layers get."""
    default = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    yield
    jax.config.update("jax_default_prng_impl", default)


def test_fine_tuning_trains_only_the_classifier_and_a_rerun_resumes_its_own(
    vgg_a, folder, tmp_path, capsys, rbg_keys
):
    source_dir, source = vgg_a
    workdir = str(tmp_path / "tuned")
    # Momentum and weight decay (configs/vgg.py: 0.9, 5e-4) must leave frozen layers alone.
    config = _vgg_a_run(folder, **{"run.init_from": source_dir, "optim.trainable": "classifier"})
    assert (config.optim.momentum, config.optim.weight_decay) == (0.9, 5e-4)
    tuned = train.train_and_evaluate(config, workdir)

    lines = capsys.readouterr().out.splitlines()
    loaded = (
        f"init_from: loaded 10 of 11 layers from {source_dir} (step 7); classifier/fc8 "
        f"re-initialised ({SOURCE_CLASSES} -> 3 classes)"
    )
    assert lines.count(loaded) == 1, lines
    assert [line for line in lines if line.startswith("optim.trainable=")] == [
        "optim.trainable=classifier: training 3 of 11 layers (classifier/fc6, classifier/fc7, "
        "classifier/fc8: 468,227 parameters); 36,280 frozen"
    ]
    params = jax.device_get(tuned.params)
    _assert_equal_trees(params["features"], source["params"]["features"])  # frozen: bit for bit
    for name in ("fc6", "fc7"):  # loaded, then trained
        assert not np.array_equal(params["classifier"][name]["kernel"],
                                  source["params"]["classifier"][name]["kernel"])  # fmt: skip
    assert params["classifier"]["fc8"]["kernel"].shape == (256, 3)  # 4096 / 16 -> 3 classes
    losses = _train_losses(workdir)
    assert len(losses) == 24 and np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses

    # A rerun of the same command after the run stopped at step 12 (the last checkpoint
    # removed): it resumes from its own step 12, not from init_from, and ends where the
    # uninterrupted run ended, bit for bit.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "24"))
    resumed = train.train_and_evaluate(config, workdir)
    out = capsys.readouterr().out
    assert "Resuming from checkpoint at step 12 of 24" in out and "init_from" not in out, out
    _assert_same_state(resumed, tuned)


def _layer_names(model, image_shape):
    return [layer.name for layer in finetune.model_layers(model, image_shape)]


def _build(name, **fields):
    return models.build_model(name, num_classes=10, dtype=jnp.float32, **fields)


def test_layers_classifiers_and_last_k_select_exactly_those_layers():
    net = vgg.VGG(variant="A", num_classes=3, width_divisor=16, batch_norm=True)
    layers = finetune.model_layers(net, (32, 32, 3))
    convs = [f"features/{n}" for n in vgg.conv_layer_names("A")]
    assert [layer.name for layer in layers] == [*convs, "classifier/fc6", "classifier/fc7",
                                                "classifier/fc8"]  # fmt: skip
    assert layers[7].paths == (("features", "conv5_2"), ("features", "conv5_2_bn"))  # its BN
    params = finetune.abstract_variables(net, (32, 32, 3))["params"]
    for k in (1, 4, 11):
        chosen = finetune.trainable(f"last:{k}", ("last", k), layers, params)
        trained = {layer.name for layer in chosen.trained}
        assert trained == {layer.name for layer in layers[-k:]}
        for path, trains in jax.tree_util.tree_leaves_with_path(chosen.mask):
            module = "/".join(str(p.key) for p in path[:-1]).removesuffix("_bn")
            assert trains == (module in trained), (k, path)
    with pytest.raises(UserError, match="last:12: the model has 11 layers"):
        finetune.trainable("last:12", ("last", 12), layers, params)
    # The classifier: the fully-connected layers at the end, whatever the model calls them.
    assert [layer.name for layer in finetune.classifier_layers(layers, params)] == [
        "classifier/fc6", "classifier/fc7", "classifier/fc8"]  # fmt: skip
    for name, shape, expected in [
        ("alexnet", (64, 64, 3), ["fc6", "fc7", "fc8"]),
        ("lenet5", (32, 32, 1), ["F6"]),  # its RBF output has fixed prototypes, no parameters
        ("lenet5_modern", (32, 32, 1), ["F6", "output"]),
    ]:
        model = _build(name, **({"width_divisor": 16} if name == "alexnet" else {}))
        layers = finetune.model_layers(model, shape)
        params = finetune.abstract_variables(model, shape)["params"]
        assert [layer.name for layer in finetune.classifier_layers(layers, params)] == expected
    assert _layer_names(_build("lenet5"), (32, 32, 1)) == ["C1", "S2", "C3", "S4", "C5", "F6"]
    for rule in ("last:0", "last", "classifier:2", "fc8"):
        with pytest.raises(UserError, match=r"is not one of: all, classifier, last:K"):
            optim.parse_trainable(rule)


def _optimizer(name, mask, **changes):
    fields = {**defaults.get_default_config().optim, "name": name, **changes}
    extra = {"curvature": lambda p, x: p, "batch_size": 4} if name == "sdlm" else {}
    return optim.make_optimizer(
        **{**fields, "trainable": mask}, steps_per_epoch=10, total_steps=100, **extra
    )


@pytest.mark.parametrize("name", ["sgd", "adam", "sdlm"])
def test_frozen_parameters_stay_bit_identical_and_get_no_optimiser_state(name):
    rng = np.random.default_rng(0)
    params = {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
                 "bias": jnp.asarray([-0.0, 1.0, 2.0, 3.0], jnp.float32)},  # -0.0 kept too
        "fc": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
    }  # fmt: skip
    mask = {"conv": {"kernel": False, "bias": False}, "fc": {"kernel": True}}
    tx = _optimizer(name, mask, weight_decay=5e-4, momentum=0.9).tx
    plain = _optimizer(name, None, weight_decay=5e-4, momentum=0.9).tx
    state, start = tx.init(params), params
    # The state is the unmasked optimiser's: checkpoints restore whatever trains.
    assert jax.tree.structure(state) == jax.tree.structure(plain.init(params))
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        params = finetune.keep_frozen(params, start, mask)  # what the train step adds
    _assert_equal_trees(params["conv"], jax.device_get(start["conv"]))
    assert np.signbit(params["conv"]["bias"][0])
    assert not np.allclose(params["fc"]["kernel"], start["fc"]["kernel"])
    # The optimiser gave the frozen parameters zero updates itself, and its buffers stay zero.
    updates, _ = tx.update(grads, state, params)
    assert not any(np.any(u) for u in jax.tree.leaves(updates["conv"]))
    for leaf in jax.tree.leaves(state):
        if leaf.shape == start["conv"]["kernel"].shape and name != "sdlm":
            assert not np.any(leaf)  # momentum / Adam moments of the frozen kernel


class _ConvNormDense(nn.Module):
    """Two convolutions with batch norm and a classifier: three layers, two with statistics."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        for name in ("conv1", "conv2"):
            x = nn.Conv(4, (3, 3), use_bias=False, name=name)(x)
            norm = nn.BatchNorm(momentum=0.9, name=f"{name}_bn")
            x = nn.relu(norm(x, use_running_average=not train))
        return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


def test_a_frozen_batch_norm_keeps_its_statistics_and_uses_them_in_training():
    net = _ConvNormDense()
    variables, _ = _init(net, 6)
    x = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, (4, 6, 6, 3)), jnp.float32)
    layers = finetune.model_layers(net, x.shape[1:])
    assert [layer.paths for layer in layers] == [
        (("conv1",), ("conv1_bn",)), (("conv2",), ("conv2_bn",)), (("fc",),)]  # fmt: skip

    def train_mode(k):  # scores and statistics of a training step with the last k training
        mask = finetune.trainable(f"last:{k}", ("last", k), layers, variables["params"]).mask
        with finetune.frozen_batch_norms(mask):
            scores, new = net.apply(variables, x, train=True, mutable=["batch_stats"])
        return scores, jax.device_get(new["batch_stats"])

    old = jax.device_get(variables["batch_stats"])
    _, stats = train_mode(2)
    _assert_equal_trees(stats["conv1_bn"], old["conv1_bn"])  # frozen: kept as loaded
    assert not np.allclose(stats["conv2_bn"]["mean"], old["conv2_bn"]["mean"])  # trains
    # Everything but the classifier frozen: training computes what evaluation does.
    scores, stats = train_mode(1)
    _assert_equal_trees(stats, old)
    np.testing.assert_array_equal(scores, net.apply(variables, x, train=False))
    assert not np.allclose(scores, train_mode(3)[0])  # (with batch statistics: not)


def test_init_from_mistakes_are_one_line_before_the_data_and_compiling(vgg_a, tmp_path):
    source_dir, _ = vgg_a
    missing, empty, a_file = tmp_path / "missing", tmp_path / "empty", tmp_path / "a_file"
    empty.mkdir()
    a_file.write_text("")
    wider = vgg.VGG(variant="A", num_classes=SOURCE_CLASSES, width_divisor=8)
    wider_dir = _save(tmp_path / "wider", _init(wider, 32)[0])
    step_dir = os.path.join(source_dir, "checkpoints", "7")
    cases = [
        ({"run.init_from": missing}, f"--config.run.init_from={missing} does not exist"),
        ({"run.init_from": a_file}, f"--config.run.init_from={a_file} is a file, not a directory"),
        ({"run.init_from": empty}, f"--config.run.init_from={empty}: no checkpoint in {empty}"),
        ({"run.init_from": f"{step_dir[:-1]}8"},
         f"--config.run.init_from={step_dir[:-1]}8 does not exist"),
        ({"run.init_from": wider_dir},
         f"--config.run.init_from={wider_dir}: params of features/conv1_1 in the checkpoint "
         "(bias 8, kernel 3x3x3x8) does not fit this model's (bias 4, kernel 3x3x3x4); only the "
         "classifier (classifier/fc8) may differ (it is re-initialised): start from a checkpoint "
         "of the same model (configuration, width, batch_norm)"),
        ({"run.init_from": source_dir, "model.warm_start_from": source_dir},
         "--config.run.init_from and --config.model.warm_start_from both name the weights a new "
         "run starts from: give one"),
        ({"optim.trainable": "last:12"},
         "--config.optim.trainable=last:12: the model has 11 layers with parameters"),
        ({"optim.trainable": "top"},
         "--config.optim.trainable='top' is not one of: all, classifier, last:K (K >= 1)"),
    ]  # fmt: skip
    # ImageNet, not prepared here: had the data been opened first, its error would come first.
    data = ["--config.data.name=imagenet2012", f"--config.data.data_dir={tmp_path}"]
    small = ["--config.model.width_divisor=16", "--config.input.image_size=32", *data]
    failures = []
    with _no_compiles():
        for fields, expected in cases:
            argv = [f"--config={VGG_CONFIG}:A", f"--workdir={tmp_path / 'w'}", *small]
            argv += [f"--config.{k}={v}" for k, v in fields.items()]
            status, _, err = run_main(argv)
            if (status, err) != (2, f"error: {expected}\n"):
                failures.append((fields, status, err[-600:]))
        # One checkpoint's own folder is a source too: that step's layers are read.
        argv = [f"--config={VGG_CONFIG}:A", f"--workdir={tmp_path / 'w'}", *small]
        status, _, err = run_main([*argv, f"--config.run.init_from={step_dir}",
                                   "--config.model.width_divisor=8"])  # fmt: skip
        assert err.startswith(f"error: --config.run.init_from={step_dir}: params of features/")
    assert not failures
    status, _, err = run_main([f"--config={VGG_CONFIG}:A", "--workdir=w", "--config.init_from=x"])
    assert err.startswith("error: --config.init_from is now --config.run.init_from"), err


def test_alexnet_from_its_own_checkpoint_loads_every_layer_into_the_tower_shardings(tmp_path):
    c = defaults.get_default_config("alexnet")
    c.update_from_flattened_dict({
        "model.width_divisor": 16, "data.name": "synthetic", "data.synthetic_train_size": 16,
        "data.synthetic_eval_size": 8, "input.image_size": 64, "input.preprocess": "alexnet",
        "input.batch_size": 8, "mesh.model": 2,
    })  # fmt: skip
    source, _ = _init(_build("alexnet", width_divisor=16), 64, seed=3)
    c.run.init_from = _save(tmp_path / "alexnet", source)
    trainer = train.build_trainer(c)
    assert trainer.mesh.shape == {"data": 4, "model": 2}
    like = trainer.abstract_state()  # the run's shapes and shardings (nothing computed)
    started, note = finetune.start_from(like, trainer.experiment.loop.init_from)
    assert note == f"init_from: loaded 8 of 8 layers from {c.run.init_from} (step 7)"
    _assert_equal_trees(started.params, jax.device_get(source["params"]))
    shardings = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
    assert shardings(started.params) == shardings(like.params)
    assert started.params["conv2"]["kernel"].sharding.spec == P(None, None, None, "model")
    assert started.params["fc8"]["kernel"].sharding.spec == P()  # replicated
