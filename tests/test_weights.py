"""Imported weights (cnn_jax.weights): each source's logits, exactly, and bad files in one line.

The networks are Table 1's columns at a sixteenth of the width (4..32 maps, FC 256), where a
224x224 image costs a few MFLOPs, so the checks run at the paper's input size: there conv5's
map is 7x7 and FC6's flatten order matters at every position. The reference for torchvision's
layout is computed independently, in NCHW with torch's flatten order and torchvision's
normalisation, from a state dict made with numpy (no torch needed); with torch or Keras
installed the same is checked against models those frameworks build and save themselves.
"""

import contextlib
import importlib.util
import io
import json
import os
import re

import jax
import numpy as np
import pytest
from jax import lax

from cnn_jax import checkpoint, experiment, paths, train, validation
from cnn_jax.data import preprocess
from cnn_jax.errors import UserError
from cnn_jax.models import vgg
from cnn_jax.weights import __main__ as weights_cli
from cnn_jax.weights import importer, keras, layout, metadata, pth, torchvision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VGG_CONFIG = os.path.join(REPO, "configs", "vgg.py")
DIV = 16  # width divisor of every network here
CLASSES = 10
TOLERANCE = 1e-4  # relative, on the logits (issue #16)
# Table 1's A and D, output maps per block at full width.
BLOCKS = {
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "D": ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
}
TV_MEAN_RGB = np.array([123.675, 116.28, 103.53])  # 255 x torchvision's mean
KERAS_MEAN_RGB = np.array([123.68, 116.779, 103.939])  # Keras' caffe mean, as RGB


def _images(side: int, n: int = 2, seed: int = 0) -> np.ndarray:
    """0..255 RGB images (N, H, W, 3), float32."""
    return np.random.default_rng(seed).uniform(0, 255, (n, side, side, 3)).astype(np.float32)


def _relative(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# --- torchvision's layout, made with numpy, and its forward pass in NCHW ---------------------


def _he(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def torchvision_state_dict(letter: str, *, bn: bool, seed: int = 0) -> dict:
    """A random state dict with the keys, shapes and order of torchvision's vgg (`_bn`),
    indices counted as torchvision's make_layers counts them (conv, [BN], ReLU; a pool)."""
    rng = np.random.default_rng(seed)
    state, index, maps_in = {}, 0, 3
    for block in BLOCKS[letter]:
        for maps in block:
            maps //= DIV
            state[f"features.{index}.weight"] = _he(rng, (maps, maps_in, 3, 3), 9 * maps_in)
            state[f"features.{index}.bias"] = rng.normal(0, 0.1, maps).astype(np.float32)
            index += 1
            if bn:
                state[f"features.{index}.weight"] = rng.uniform(0.5, 1.5, maps).astype(np.float32)
                state[f"features.{index}.bias"] = rng.normal(0, 0.1, maps).astype(np.float32)
                state[f"features.{index}.running_mean"] = rng.normal(0, 1, maps).astype(np.float32)
                state[f"features.{index}.running_var"] = rng.uniform(0.5, 4, maps).astype(
                    np.float32
                )
                state[f"features.{index}.num_batches_tracked"] = np.array(7, np.int64)
                index += 1
            index += 1  # ReLU
            maps_in = maps
        index += 1  # MaxPool2d
    width, n_in = 4096 // DIV, maps_in * 49
    for i, (o, n) in zip((0, 3, 6), ((width, n_in), (width, width), (CLASSES, width)), strict=True):
        state[f"classifier.{i}.weight"] = _he(rng, (o, n), n)
        state[f"classifier.{i}.bias"] = rng.normal(0, 0.1, o).astype(np.float32)
    return state


def _adaptive_avg_pool_nchw(x, out: int):
    """torch.nn.AdaptiveAvgPool2d(out), written out with its own index rule."""
    h, w = x.shape[2:]
    rows = []
    for i in range(out):
        r0, r1 = (i * h) // out, -(-((i + 1) * h) // out)
        cols = []
        for j in range(out):
            c0, c1 = (j * w) // out, -(-((j + 1) * w) // out)
            cols.append(x[:, :, r0:r1, c0:c1].mean(axis=(2, 3)))
        rows.append(np.stack(cols, -1))
    return np.stack(rows, -2)


def torchvision_reference_logits(state: dict, images: np.ndarray, letter: str, bn: bool):
    """torchvision's VGG forward pass (eval mode) on 0..255 RGB images: its normalisation,
    NCHW, OIHW kernels, PyTorch's (C, H, W) flatten, Linear as x W^T + b."""
    x = (images / 255.0 - np.array(torchvision.MEAN)) / np.array(torchvision.STD)
    x = np.asarray(x, np.float32).transpose(0, 3, 1, 2)
    index = 0
    for block in BLOCKS[letter]:
        for _ in block:
            w, b = state[f"features.{index}.weight"], state[f"features.{index}.bias"]
            x = lax.conv_general_dilated(
                x,
                w,
                (1, 1),
                [(1, 1), (1, 1)],
                dimension_numbers=("NCHW", "OIHW", "NCHW"),
                precision=lax.Precision.HIGHEST,
            )
            x = np.asarray(x) + b[None, :, None, None]
            index += 1
            if bn:
                g, beta, m, v = (
                    state[f"features.{index}.{k}"][None, :, None, None]
                    for k in ("weight", "bias", "running_mean", "running_var")
                )
                x = (x - m) / np.sqrt(v + 1e-5) * g + beta
                index += 1
            x, index = np.maximum(x, 0), index + 1
        n, c, h, w_ = x.shape
        x = x[:, :, : h // 2 * 2, : w_ // 2 * 2].reshape(n, c, h // 2, 2, w_ // 2, 2).max((3, 5))
        index += 1
    x = _adaptive_avg_pool_nchw(x, 7).reshape(len(x), -1)  # (C, H, W) order
    for i in (0, 3, 6):
        x = x @ state[f"classifier.{i}.weight"].T + state[f"classifier.{i}.bias"]
        x = np.maximum(x, 0) if i < 6 else x
    return x


_APPLY = {}


def cnn_jax_logits(variables: dict, facts: layout.Facts, images, mean_rgb):
    """cnn_jax's VGG on the images less `mean_rgb`, as the `vgg` preprocessing gives them."""
    key = (facts, images.shape)
    if key not in _APPLY:
        model = vgg.VGG(
            variant=facts.variant,
            num_classes=facts.num_classes,
            batch_norm=facts.batch_norm,
            width_divisor=facts.width_divisor,
        )
        _APPLY[key] = jax.jit(lambda v, x: model.apply(v, x, train=False))
    variables = {k: v for k, v in variables.items() if v}
    return np.asarray(_APPLY[key](variables, np.asarray(images - mean_rgb, np.float32)))


@pytest.mark.parametrize("bn", [False, True], ids=["vgg11", "vgg11_bn"])
def test_a_hand_made_torchvision_state_dict_gives_torchvisions_logits(tmp_path, bn):
    state = torchvision_state_dict("A", bn=bn)
    path = str(tmp_path / "vgg11.pth")
    pth.write_pth(path, state, legacy=bn)  # both .pth formats, read without torch
    imported = torchvision.load(path, reader="builtin")
    facts = layout.identify(imported, "--file")
    assert facts == layout.Facts("A", bn, DIV, CLASSES)
    variables = layout.to_variables(imported, facts, "--file")
    images = _images(224)
    want = torchvision_reference_logits(state, images, "A", bn)
    got = cnn_jax_logits(variables, facts, images, TV_MEAN_RGB)
    assert _relative(got, want) < TOLERANCE

    # The test can fail: FC6's rows taken in PyTorch's order give other logits.
    unpermuted = jax.tree.map(np.copy, variables)
    unpermuted["params"]["classifier"]["fc6"]["kernel"] = state["classifier.0.weight"].T
    assert _relative(cnn_jax_logits(unpermuted, facts, images, TV_MEAN_RGB), want) > 1e-2
    # So can the mean: the paper's in place of the checkpoint's changes them by more.
    paper = preprocess.IMAGENET_MEAN_RGB
    assert _relative(cnn_jax_logits(variables, facts, images, paper), want) > TOLERANCE


# --- The command line, and the workdir it writes ---------------------------------------------


def weights_main(*args):
    """python -m cnn_jax.weights ARGS in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            weights_cli.main(["cnn_jax.weights", *args])
    except SystemExit as e:
        status = e.code
    return status, out.getvalue(), err.getvalue()


def _load_config(arg, **fields):
    spec = importlib.util.spec_from_file_location("_vgg_config", VGG_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    c.model.width_divisor = DIV
    c.data.name, c.data.num_classes = "synthetic", CLASSES
    c.input.image_size, c.input.batch_size = 32, 8
    c.data.synthetic_train_size = c.data.synthetic_eval_size = 8
    c.run.progress_bar = False
    for name, value in fields.items():
        group, field = name.split("__")
        c[group][field] = value
    return c


def test_an_imported_workdir_restores_under_its_own_config_and_refuses_others(tmp_path, capsys):
    state = torchvision_state_dict("A", bn=True)
    path, workdir = str(tmp_path / "vgg11_bn.pth"), str(tmp_path / "imported")
    pth.write_pth(path, state)
    status, out, err = weights_main(
        "import",
        "--from=torchvision",
        f"--file={path}",
        f"--workdir={workdir}",
        "--reader=builtin",
    )
    assert status == 0, err
    assert "imported VGG-A (vgg11) with batch norm, width / 16, 10 classes" in out
    assert sorted(os.listdir(paths.checkpoints_dir(workdir))) == ["0"]
    record = metadata.read(workdir)
    assert record["source"] == "torchvision" and record["mean_rgb"] == list(TV_MEAN_RGB)
    assert record["std_folded"] == list(torchvision.STD)

    # configs/vgg.py:A with batch norm takes the checkpoint's mean and restores it whole.
    config = _load_config("A", model__batch_norm=True)
    trainer = train.build_trainer(config, workdir)
    assert "input: mean RGB 123.675, 116.28, 103.53 from" in capsys.readouterr().out
    assert tuple(trainer.config.input.mean_rgb) == tuple(TV_MEAN_RGB)
    saved = checkpoint.saved_config(workdir)
    validation.check_resume_config(trainer.record, saved, workdir)  # no drift
    ckpt = checkpoint.Checkpointer(paths.checkpoints_dir(workdir), keep=3)
    try:
        restored = ckpt.restore_newest(trainer.abstract_state())
    finally:
        ckpt.close()
    assert int(restored.step) == 0
    want, _, _ = importer.convert("torchvision", path, reader="builtin")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), want["params"])
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get(restored.batch_stats), want["batch_stats"]
    )
    # A new run that starts from the imported workdir takes its mean too.
    fine_tune = _load_config("A", model__batch_norm=True, run__init_from=workdir)
    fresh = str(tmp_path / "fine_tune")
    assert tuple(experiment.resolve(fine_tune, 8, workdir=fresh).input.mean_rgb) == tuple(
        TV_MEAN_RGB
    )
    # An explicit mean wins, without a line.
    explicit = _load_config("A", model__batch_norm=True, input__mean_rgb=(1.0, 2.0, 3.0))
    assert tuple(experiment.resolve(explicit, 8, workdir=workdir).input.mean_rgb) == (1, 2, 3)
    assert capsys.readouterr().out.count("input: mean RGB") == 1  # the fine-tuning run's

    # Another network on these checkpoints is one line naming the field (what config.json
    # records is the resolved config: cnn_jax.train).
    for arg, fields, named in (
        ("A", {}, "model.batch_norm (saved True, now False)"),
        ("D", {"model__batch_norm": True}, "model.variant (saved 'A', now 'D')"),
    ):
        other = experiment.resolve(_load_config(arg, **fields), 8, workdir=workdir).to_dict()
        with pytest.raises(UserError, match=re.escape(named)):
            validation.check_resume_config(other, saved, workdir)

    # A second import into the same workdir is refused.
    status, _, err = weights_main(
        "import", "--from=torchvision", f"--file={path}", f"--workdir={workdir}"
    )
    assert status == 2 and err.count("\n") == 1 and "already holds checkpoints" in err


def _bad_pth_files(tmp_path) -> dict:
    """name -> (file, extra flags, what the error line must say)."""
    plain, bn = torchvision_state_dict("A", bn=False), torchvision_state_dict("A", bn=True)
    files = {}

    def write(name, state, legacy=False):
        path = str(tmp_path / f"{name}.pth")
        pth.write_pth(path, state, legacy=legacy)
        return path

    good = write("good", plain)
    with open(good, "rb") as f:
        data = f.read()
    for name, cut in (("truncated", data[: len(data) // 2]), ("not_a_pth", b"hello" * 100)):
        with open(tmp_path / f"{name}.pth", "wb") as f:
            f.write(cut)
        files[name] = (str(tmp_path / f"{name}.pth"), (), "is not a readable PyTorch file")
    legacy = write("legacy", plain, legacy=True)
    with open(legacy, "rb") as f:
        data = f.read()
    with open(tmp_path / "legacy_truncated.pth", "wb") as f:
        f.write(data[:-100])
    files["legacy_truncated"] = (str(tmp_path / "legacy_truncated.pth"), (), "truncated")
    files["unknown_key"] = (
        write("unknown", {**plain, "fc.weight": plain["features.0.bias"]}),
        (),
        "unknown key 'fc.weight'",
    )
    wrong = {**plain, "classifier.3.weight": plain["classifier.3.weight"][:, :100]}
    files["shape"] = (write("shape", wrong), (), "classifier.3 gives classifier/fc7/kernel")
    files["bn_for_plain"] = (
        write("bn", bn),
        (f"--config={VGG_CONFIG}:A",),
        "--config.model.batch_norm=False: the file needs --config.model.batch_norm=True",
    )
    files["other_variant"] = (good, (f"--config={VGG_CONFIG}:D",), "holds VGG-A (vgg11)")
    files["missing"] = (str(tmp_path / "absent.pth"), (), "does not exist")
    return files


def test_a_bad_pth_is_one_error_line_naming_the_layer(tmp_path):
    for name, (path, extra, says) in _bad_pth_files(tmp_path).items():
        status, _, err = weights_main(
            "import",
            "--from=torchvision",
            f"--file={path}",
            "--reader=builtin",
            f"--workdir={tmp_path / name}",
            *extra,
        )
        assert status == 2, (name, err)
        assert err.count("\n") == 1 and err.startswith("error: "), (name, err)
        assert says in err, (name, err)
        assert not os.path.exists(tmp_path / name / "checkpoints"), name


def test_a_state_dict_pickle_cannot_run_code(tmp_path):
    path = tmp_path / "evil.pth"
    # The pickle of os.system("true"): GLOBAL posix system, then a call.
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00true\x85R.")
    with pytest.raises(UserError, match=r"names posix\.system, which is not part of a state"):
        pth.read_pth(str(path))


# --- Keras -----------------------------------------------------------------------------------


def keras_layers(letter: str, seed: int = 0) -> dict:
    """Random layers of keras.applications' VGG layout (block<b>_conv<i>, fc1, fc2,
    predictions), channels-last."""
    rng = np.random.default_rng(seed)
    layers, maps_in = {}, 3
    for b, block in enumerate(BLOCKS[letter], 1):
        for i, maps in enumerate(block, 1):
            maps //= DIV
            kernel = _he(rng, (3, 3, maps_in, maps), 9 * maps_in)
            layers[f"block{b}_conv{i}"] = [kernel, rng.normal(0, 0.1, maps).astype(np.float32)]
            maps_in = maps
    width = 4096 // DIV
    for name, (n, o) in zip(
        keras.FC_LAYERS, ((49 * maps_in, width), (width, width), (width, CLASSES)), strict=True
    ):
        layers[name] = [_he(rng, (n, o), n), rng.normal(0, 0.1, o).astype(np.float32)]
    return layers


def write_keras2_h5(path: str, layers: dict) -> None:
    """The layout of Keras 2's save_weights and keras-applications' published files."""
    import h5py

    with h5py.File(path, "w") as f:
        names = ["input_1", *layers, "flatten"]
        f.attrs["layer_names"] = [n.encode() for n in names]
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.2.4"
        for name in names:
            g = f.create_group(name)
            arrays = layers.get(name, [])
            weight_names = [f"{name}/{w}:0" for w in ("kernel", "bias")[: len(arrays)]]
            g.attrs["weight_names"] = [w.encode() for w in weight_names]
            for w, array in zip(weight_names, arrays, strict=True):
                g.create_dataset(w, data=array)


def keras_reference_logits(layers: dict, images: np.ndarray, letter: str):
    """keras.applications' VGG forward pass on caffe-preprocessed input, in NHWC."""
    x = np.asarray(images[..., ::-1] - np.array(keras.CAFFE_MEAN_BGR), np.float32)
    for b, block in enumerate(BLOCKS[letter], 1):
        for i in range(1, len(block) + 1):
            kernel, bias = layers[f"block{b}_conv{i}"]
            x = lax.conv_general_dilated(
                x,
                kernel,
                (1, 1),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=lax.Precision.HIGHEST,
            )
            x = np.maximum(np.asarray(x) + bias, 0)
        n, h, w, c = x.shape
        x = x.reshape(n, h // 2, 2, w // 2, 2, c).max((2, 4))
    x = x.reshape(len(x), -1)  # Flatten, NHWC
    for name in keras.FC_LAYERS:
        kernel, bias = layers[name]
        x = x @ kernel + bias
        x = np.maximum(x, 0) if name != "predictions" else x
    return x


def test_a_keras_applications_layout_file_gives_keras_logits(tmp_path):
    layers = keras_layers("D")
    path = str(tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5")
    write_keras2_h5(path, layers)
    imported = keras.load(path)
    facts = layout.identify(imported, "--file")
    assert facts == layout.Facts("D", False, DIV, CLASSES)
    variables = layout.to_variables(imported, facts, "--file")
    images = _images(224)
    want = keras_reference_logits(layers, images, "D")
    assert _relative(cnn_jax_logits(variables, facts, images, KERAS_MEAN_RGB), want) < TOLERANCE
    # The test can fail: without reversing conv1_1's channels (BGR) the logits differ.
    rgb = jax.tree.map(np.copy, variables)
    rgb["params"]["features"]["conv1_1"]["kernel"] = layers["block1_conv1"][0]
    assert _relative(cnn_jax_logits(rgb, facts, images, KERAS_MEAN_RGB), want) > 1e-2


def test_a_bad_keras_file_is_one_error_line(tmp_path):
    layers = keras_layers("D")
    cases = {
        "notop": ({k: v for k, v in layers.items() if k.startswith("block")}, "no fc1 layer"),
        "unknown": ({**layers, "dense_7": layers["fc2"]}, "unknown layer 'dense_7'"),
        "th_ordering": (
            {
                **layers,
                "block1_conv1": [
                    layers["block1_conv1"][0].transpose(3, 2, 0, 1),
                    layers["block1_conv1"][1],
                ],
            },
            "channels-first",
        ),
    }
    for name, (content, says) in cases.items():
        path = str(tmp_path / f"{name}.h5")
        write_keras2_h5(path, content)
        status, _, err = weights_main(
            "import", "--from=keras", f"--file={path}", f"--workdir={tmp_path / name}"
        )
        assert status == 2 and err.count("\n") == 1 and says in err, (name, err)
    with open(tmp_path / "cut.h5", "wb") as f, open(path, "rb") as g:
        f.write(g.read()[:2000])
    for name in ("cut.h5", "notop.h5"):
        status, _, err = weights_main(
            "import",
            "--from=torchvision" if name == "notop.h5" else "--from=keras",
            f"--file={tmp_path / name}",
            f"--workdir={tmp_path / 'w'}",
            "--reader=builtin",
        )
        assert status == 2 and err.count("\n") == 1 and "not a readable" in err, err


# --- The mean RGB the `vgg` preprocessing subtracts ------------------------------------------


def test_the_vgg_op_subtracts_input_mean_rgb_in_every_view():
    import tensorflow as tf

    image = tf.constant(np.full((40, 50, 3), 200, np.uint8))  # any rescale keeps 200
    seed = tf.constant([1, 2], tf.int64)
    for mean in ((), tuple(TV_MEAN_RGB)):
        prep = preprocess.Preprocessing(
            name="vgg", image_size=32, mean_rgb=mean, pca_lighting_std=0.0
        )
        expected = 200.0 - (np.array(mean) if mean else preprocess.IMAGENET_MEAN_RGB)
        for view in (prep.center(image), prep.square(image, 36), prep.train(image, seed)):
            pixels = view.numpy().reshape(-1, 3)
            np.testing.assert_allclose(pixels, np.broadcast_to(expected, pixels.shape), atol=1e-3)
    with pytest.raises(UserError, match=r"mean_rgb=\(1, 2\) must be three finite numbers"):
        preprocess.Preprocessing(name="vgg", image_size=32, mean_rgb=(1, 2))
    with pytest.raises(UserError, match=r"applies to preprocess=vgg, not lenet"):
        preprocess.Preprocessing(name="lenet", image_size=32, mean_rgb=(1, 2, 3))


def test_metadata_is_found_from_a_workdir_its_checkpoints_or_a_step(tmp_path):
    workdir = tmp_path / "w"
    (workdir / "checkpoints" / "0").mkdir(parents=True)
    assert metadata.read(str(workdir)) is None and metadata.mean_rgb(str(workdir)) is None
    metadata.write(str(workdir), {"mean_rgb": [1, 2, 3]})
    for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "0"):
        assert metadata.mean_rgb(str(path)) == (1.0, 2.0, 3.0)
    # A run's own config.json records the mean it trained with (e.g. fine-tuned from imports).
    other = tmp_path / "run"
    other.mkdir()
    (other / paths.CONFIG_FILE).write_text(json.dumps({"input": {"mean_rgb": [4, 5, 6]}}))
    assert metadata.mean_rgb(str(other)) == (4.0, 5.0, 6.0)
    (other / paths.CONFIG_FILE).write_text(json.dumps({"input": {"mean_rgb": []}}))
    assert metadata.mean_rgb(str(other)) is None


# --- Against the frameworks themselves (skipped where they are not installed) ---------------


def torch_vgg(torch, letter: str, bn: bool):
    """torchvision's VGG module layout (features, avgpool, classifier) at width / DIV, with
    random weights and batch-norm statistics (torchvision itself is not needed)."""
    nn = torch.nn
    layers, maps_in = [], 3
    for block in BLOCKS[letter]:
        for maps in block:
            maps //= DIV
            layers += [
                nn.Conv2d(maps_in, maps, 3, padding=1),
                *([nn.BatchNorm2d(maps)] * bn),
                nn.ReLU(inplace=True),
            ]
            maps_in = maps
        layers.append(nn.MaxPool2d(2, 2))
    width = 4096 // DIV

    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(maps_in * 49, width),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(width, width),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(width, CLASSES),
            )

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    model = VGG()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 1)
            m.running_var.uniform_(0.5, 4)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize(
    "letter, bn, legacy, side",
    [("A", True, False, 64), ("D", False, True, 224)],  # 64: FC6's adaptive pool replicates
    ids=["vgg11_bn-zip-64px", "vgg16-legacy-224px"],
)
def test_torch_saved_models_give_torchs_logits(tmp_path, letter, bn, legacy, side):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch_vgg(torch, letter, bn)
    path = str(tmp_path / "vgg.pth")
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    by_torch, builtin = pth.load_state_dict(path, "torch"), pth.read_pth(path)
    assert list(by_torch) == list(builtin)
    jax.tree.map(np.testing.assert_array_equal, by_torch, builtin)
    imported = torchvision.load(path, reader="torch")
    facts = layout.identify(imported, "--file")
    assert facts == layout.Facts(letter, bn, DIV, CLASSES)
    variables = layout.to_variables(imported, facts, "--file")
    images = _images(side)
    x = (images / 255.0 - np.array(torchvision.MEAN)) / np.array(torchvision.STD)
    with torch.no_grad():
        want = model(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))).numpy()
    assert _relative(cnn_jax_logits(variables, facts, images, TV_MEAN_RGB), want) < TOLERANCE
    # What write_pth makes, torch reads.
    pth.write_pth(str(tmp_path / "again.pth"), builtin, legacy=not legacy)
    again = torch.load(str(tmp_path / "again.pth"), weights_only=True)
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


def keras_vgg(keras_lib, letter: str, side: int = 224):
    """keras.applications' VGG layout (layer names, channels-last) at width / DIV, with
    random biases too, and linear class scores."""
    L = keras_lib.layers
    inputs = x = keras_lib.Input((side, side, 3))
    for b, block in enumerate(BLOCKS[letter], 1):
        for i, maps in enumerate(block, 1):
            x = L.Conv2D(
                maps // DIV, 3, padding="same", activation="relu", name=f"block{b}_conv{i}"
            )(x)
        x = L.MaxPooling2D(2, 2, name=f"block{b}_pool")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(4096 // DIV, activation="relu", name="fc1")(x)
    x = L.Dense(4096 // DIV, activation="relu", name="fc2")(x)
    model = keras_lib.Model(inputs, L.Dense(CLASSES, name="predictions")(x), name="vgg16")
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if layer.weights:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape).astype(np.float32)])
    return model


def test_keras_saved_models_give_keras_logits(tmp_path):
    keras_lib = pytest.importorskip("keras")
    model = keras_vgg(keras_lib, "D")
    images = _images(224)
    caffe = keras_lib.applications.vgg16.preprocess_input(images.copy())  # BGR, mean off
    want = np.asarray(model(caffe, training=False))
    files = {"keras3": str(tmp_path / "vgg16.weights.h5"), "legacy": str(tmp_path / "vgg16.h5")}
    model.save_weights(files["keras3"])
    model.save(files["legacy"])  # the whole-model HDF5 of Keras 2, weights in model_weights
    for name, path in files.items():
        imported = keras.load(path)
        facts = layout.identify(imported, "--file")
        assert facts == layout.Facts("D", False, DIV, CLASSES), name
        variables = layout.to_variables(imported, facts, "--file")
        got = cnn_jax_logits(variables, facts, images, KERAS_MEAN_RGB)
        assert _relative(got, want) < TOLERANCE, name


@pytest.mark.skipif(
    not os.environ.get("CNN_JAX_FULL_SIZE_TESTS"),
    reason="builds the 138M-parameter keras.applications.VGG16 (set CNN_JAX_FULL_SIZE_TESTS=1)",
)
def test_keras_applications_vgg16_itself_imports_exactly(tmp_path):
    keras_lib = pytest.importorskip("keras")
    model = keras_lib.applications.VGG16(weights=None, classifier_activation=None)
    path = str(tmp_path / "vgg16.weights.h5")
    model.save_weights(path)
    images = _images(224, n=1)
    want = np.asarray(model(keras_lib.applications.vgg16.preprocess_input(images.copy())))
    imported = keras.load(path)
    facts = layout.identify(imported, "--file")
    assert facts == layout.Facts("D", False, 1, 1000)
    variables = layout.to_variables(imported, facts, "--file")
    assert _relative(cnn_jax_logits(variables, facts, images, KERAS_MEAN_RGB), want) < TOLERANCE
