"""cnn_jax.features: a layer's activations over a split, for linear probes.

Each test saves a checkpoint of random weights (as good as trained ones for checking what
is read out), runs the command in-process, and compares every row of the
.npz with the same layer computed directly (`model.apply(..., capture_intermediates=True)`
and the activation by hand) on the same images, preprocessed as the centre evaluator does.
Splits are chosen so that the last batch is partial: every example must appear once.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import tensorflow as tf
from test_faults import _load_config_file, _no_compiles

from cnn_jax import checkpoint, experiment, features, paths
from cnn_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def _config(config_file: str, overrides: dict):
    """What `--config=configs/FILE[:arg] --config.K=V ...` gives (the command's config)."""
    path, _, arg = config_file.partition(":")
    c = _load_config_file(os.path.join(CONFIGS, path), arg or None)
    c.update_from_flattened_dict(overrides)
    return c


def _argv(config_file: str, overrides: dict, workdir, output, *extra) -> list[str]:
    fields = [f"--config.{k}={v}" for k, v in overrides.items()]
    return [
        "features",
        f"--config={os.path.join(CONFIGS, config_file)}",
        f"--workdir={workdir}",
        f"--output={output}",
        *fields,
        *extra,
    ]


def _saved_checkpoint(config, workdir) -> dict:
    """A checkpoint in workdir of config's model with random weights (He-scaled, so that
    activations stay of order 1 through the ReLUs), made without compiling; its variables."""
    c = config.copy_and_resolve_references()
    c.mesh.model = 1
    resolved = experiment.resolve(c, 1)
    model = experiment.model(resolved)
    channels = pipeline.input_channels(experiment.source(resolved), experiment.preprocessing(c))
    side = resolved.input.image_size
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, side, side, channels)), train=False)
    )
    rng = np.random.default_rng(0)

    def draw(leaf):
        fan_in = max(1, int(np.prod(leaf.shape[:-1])))
        return (rng.standard_normal(leaf.shape) * np.sqrt(2 / fan_in)).astype(np.float32)

    variables = {"params": jax.tree.map(draw, shapes["params"])}
    ckpt = checkpoint.Checkpointer(paths.checkpoints_dir(str(workdir)), keep=1, async_save=False)
    ckpt.save(0, {"step": np.int32(0), **variables})
    ckpt.close()
    return variables


def _centre_views(config, images) -> np.ndarray:
    """The images (uint8 arrays or encoded files) as the centre evaluator feeds them."""
    prep = experiment.preprocessing(config)
    return np.stack([np.asarray(prep.center(tf.constant(image))) for image in images])


def _captured(model, variables, images, *path):
    """The output of the module at `path` (() for the model's own) for `images` on one device."""

    def intermediates(variables, images):
        _, state = model.apply(variables, images, train=False, capture_intermediates=True)
        return state["intermediates"]

    out = jax.jit(intermediates)(variables, jnp.asarray(images))
    for name in path:
        out = out[name]
    return np.asarray(out["__call__"][0], np.float32)


# --- LeNet-5 on synthetic digits-shaped data -------------------------------------------------

LENET = {
    "data.name": "synthetic",
    "data.synthetic_channels": 1,
    "data.synthetic_eval_size": 27,  # batch 8: three full batches and one of 3
    "data.synthetic_train_size": 13,
    "input.batch_size": 8,
}


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lenet_run")
    config = _config("lenet.py", LENET)
    return workdir, _saved_checkpoint(config, workdir), config


def test_lenet_f6_is_the_squashed_f6_of_every_eval_example_once(lenet_run, tmp_path):
    workdir, variables, config = lenet_run
    output = tmp_path / "f6.npz"
    features.main(_argv("lenet.py", LENET, workdir, output, "--layer=F6"))

    saved = np.load(output)
    assert saved["features"].shape == (27, 84) and saved["features"].dtype == np.float32
    assert str(saved["layer"]) == "F6" and int(saved["step"]) == 0
    np.testing.assert_array_equal(saved["index"], np.arange(27))
    assert list(saved["files"]) == [f"test[{i}]" for i in range(27)]
    source = experiment.source(config)
    examples = list(source.process_examples("eval").as_numpy_iterator())
    np.testing.assert_array_equal(saved["labels"], [ex["label"] for ex in examples])

    images = _centre_views(config, [ex["image"] for ex in examples])
    model = experiment.model(experiment.resolve(config, 1))
    pre = _captured(model, variables, images, "F6")
    np.testing.assert_allclose(saved["features"], 1.7159 * np.tanh(pre * 2 / 3), atol=1e-5)


def test_the_train_split_is_read_whole_with_the_evaluation_view(lenet_run, tmp_path):
    workdir, variables, config = lenet_run
    output = tmp_path / "train.npz"
    features.main(_argv("lenet.py", LENET, workdir, output, "--layer=logits", "--split=train"))

    saved = np.load(output)
    assert list(saved["files"]) == [f"train[{i}]" for i in range(13)]
    examples = list(experiment.source(config).process_examples("train").as_numpy_iterator())
    np.testing.assert_array_equal(saved["labels"], [ex["label"] for ex in examples])
    images = _centre_views(config, [ex["image"] for ex in examples])  # no distortions
    model = experiment.model(experiment.resolve(config, 1))
    scores = _captured(model, variables, images)
    np.testing.assert_allclose(saved["features"], scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--layer=fc7"],
            "error: --layer=fc7: LeNet5 has no such layer; choose one of: F6, C5, logits",
        ),
        (["--layer=F6", "--split=val"], "error: --split=val: choose one of: eval, train"),
    ],
)
def test_a_wrong_layer_or_split_is_one_line_and_exit_2_before_compiling(
    lenet_run, tmp_path, capsys, extra, message
):
    workdir, _, _ = lenet_run
    with _no_compiles(), pytest.raises(SystemExit) as exit_info:
        features.main(_argv("lenet.py", LENET, workdir, tmp_path / "f.npz", *extra))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == message + "\n"
    assert not os.listdir(tmp_path)


def test_no_checkpoint_or_an_unwritable_output_is_one_line_before_compiling(
    lenet_run, tmp_path, capsys
):
    workdir, _, _ = lenet_run
    a_file = tmp_path / "file"
    a_file.write_text("")
    empty = tmp_path / "empty"
    cases = [
        (empty, tmp_path / "f.npz", f"error: --workdir={empty}: no checkpoint in {empty}"),
        (
            workdir,
            a_file / "f.npz",
            f"error: --output={a_file}/f.npz: its folder={a_file} is a file, not a directory",
        ),
        (workdir, tmp_path, f"error: --output={tmp_path} is a directory"),
    ]
    for run_dir, output, message in cases:
        with _no_compiles(), pytest.raises(SystemExit) as exit_info:
            features.main(_argv("lenet.py", LENET, run_dir, output, "--layer=F6"))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(message), err


def test_a_checkpoint_of_another_model_names_the_layer(lenet_run, tmp_path, capsys):
    workdir, _, _ = lenet_run
    with pytest.raises(SystemExit) as exit_info:
        features.main(_argv("lenet.py", LENET, workdir, tmp_path / "f.npz", "--layer=F6",
                            "--config.model.name=lenet5_modern"))  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --workdir={workdir}: the checkpoint's params/"), err


# --- A tiny VGG on an image folder, from a checkpoint with other classes ---------------------

VGG = {"model.width_divisor": 16, "input.image_size": 32, "input.batch_size": 8}
CLASSES = ("cat", "dog")


def _image_folder(root) -> list[str]:
    """ROOT/{train,val}/{cat,dog}/CLASS_i.png of assorted sizes; val holds 11 images (batch
    8: one full batch, one of 3). Returns val's paths."""
    rng = np.random.default_rng(0)
    val = []
    for split, count in (("train", 4), ("val", 6)):
        for c in CLASSES:
            os.makedirs(os.path.join(root, split, c))
            for i in range(count - (split == "val" and c == "dog")):
                h, w = rng.integers(36, 60, size=2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                path = os.path.join(root, split, c, f"{c}_{i}.png")
                PIL.Image.fromarray(pixels).save(path)
                val += [path] if split == "val" else []
    return val


def test_vgg_fc7_of_an_image_folder_lines_up_with_its_files(tmp_path, capsys):
    root = tmp_path / "images"
    val_files = _image_folder(str(root))
    # Trained elsewhere on 5 classes (as ImageNet weights have 1000): fc8 differs, fc7 reads.
    synthetic = {**VGG, "data.name": "synthetic", "data.num_classes": 5}
    trained_on = _config("vgg.py:A", synthetic)
    variables = _saved_checkpoint(trained_on, tmp_path / "run")
    folder = {**VGG, "data.name": "image_folder", "data.manual_dir": str(root)}
    output = tmp_path / "fc7.npz"
    capsys.readouterr()
    features.main(_argv("vgg.py:A", folder, tmp_path / "run", output, "--layer=fc7"))
    assert "the checkpoint's classifier has 5 classes, the dataset 2" in capsys.readouterr().out

    saved = np.load(output)
    assert sorted(saved["files"]) == sorted(val_files) and len(saved["files"]) == 11
    names = [os.path.basename(f).split("_")[0] for f in saved["files"]]
    assert [CLASSES[label] for label in saved["labels"]] == names
    model = experiment.model(experiment.resolve(trained_on, 1))
    images = _centre_views(
        _config("vgg.py:A", folder), [tf.io.read_file(str(f)).numpy() for f in saved["files"]]
    )
    fc7 = np.maximum(_captured(model, variables, images, "classifier", "fc7"), 0)
    assert saved["features"].shape == (11, 256) and np.all(saved["features"] >= 0)
    np.testing.assert_allclose(saved["features"], fc7, rtol=1e-5, atol=1e-5 * fc7.max())


# --- AlexNet's towers on separate devices -----------------------------------------------------

ALEXNET = {
    "model.width_divisor": 16,
    "input.image_size": 64,
    "input.batch_size": 8,
    "data.name": "synthetic",
    "data.num_classes": 4,
    "data.synthetic_eval_size": 10,
    "mesh.model": 2,  # data=4 x model=2: each tower on its own device
}


def _pool5_by_hand(conv5):
    import flax.linen as nn

    return np.asarray(nn.max_pool(jnp.asarray(conv5), (3, 3), strides=(2, 2))).mean(axis=(1, 2))


@pytest.mark.parametrize(
    "layer, by_hand",
    [("fc6", lambda pre: np.maximum(pre, 0)), ("pool5", _pool5_by_hand)],
)
def test_alexnet_features_are_both_towers_in_the_papers_order(tmp_path, layer, by_hand):
    config = _config("alexnet.py", ALEXNET)
    variables = _saved_checkpoint(config, tmp_path / "run")
    output = tmp_path / "f.npz"
    features.main(_argv("alexnet.py", ALEXNET, tmp_path / "run", output, f"--layer={layer}"))

    saved = np.load(output)
    source = experiment.source(config)
    examples = list(source.process_examples("eval").as_numpy_iterator())
    images = _centre_views(config, [ex["image"] for ex in examples])
    unsplit = config.copy_and_resolve_references()
    unsplit.mesh.model = 1
    one_device = experiment.model(experiment.resolve(unsplit, 1))
    assert one_device.tower_axis is None  # both towers on one device, tower 1's maps first
    module = "conv5" if layer == "pool5" else layer
    expected = by_hand(_captured(one_device, variables, images, module))
    assert saved["features"].shape == (10, {"fc6": 4096, "pool5": 256}[layer] // 16)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(saved["features"], expected, rtol=1e-5, atol=1e-5 * scale)
