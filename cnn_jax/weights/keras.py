"""Keras VGG16 / VGG19 weight files (keras.applications) -> `Imported`, read with h5py.

Two layouts are read:
- the legacy HDF5 weights of Keras 2 and of keras-applications' published files
  (`vgg16_weights_tf_dim_ordering_tf_kernels.h5`): the root's attribute `layer_names` lists
  the layers, each a group whose attribute `weight_names` names its arrays (also inside a
  whole-model `.h5` file, under `model_weights`);
- Keras 3's `.weights.h5` (`model.save_weights`): `layers/<path>/vars/0, 1, ...`, with the
  layer's name in the `vars` group's attribute `name`.

keras.applications names the layers block{b}_conv{i} (b = 1..5), fc1, fc2, predictions:
cnn_jax's conv{b}_{i}, fc6, fc7, fc8. Keras is channels-last, so Conv2D kernels are HWIO and
Dense kernels (in, out) already, and Flatten reads the 7x7x512 map in NHWC's (H, W, C) order,
cnn_jax's own: nothing is permuted. The channels-first files of Theano days
(`th_dim_ordering`) are refused.

Input: keras.applications.vgg16.preprocess_input ("caffe" mode) turns RGB into BGR and
subtracts the ImageNet mean (103.939, 116.779, 123.68) per BGR channel, no scaling. cnn_jax's
`vgg` preprocessing gives RGB less a mean, so conv1_1's input channels are reversed and the
checkpoint records that mean in RGB order, (123.68, 116.779, 103.939), for runs to subtract.
"""

import re

import numpy as np

from cnn_jax.errors import UserError
from cnn_jax.weights import layout

# keras.applications.imagenet_utils, mode "caffe": the mean of each BGR channel.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
FC_LAYERS = ("fc1", "fc2", "predictions")  # cnn_jax's fc6, fc7, fc8
_CONV_NAME = re.compile(r"block(\d+)_conv(\d+)")


def load(path: str, **_) -> layout.Imported:
    """The Keras VGG weights in `path` (.h5 or .weights.h5), converted."""
    return convert(read_layers(path), flag=f"--file={path}")


def read_layers(path: str) -> dict[str, list[np.ndarray]]:
    """{layer name: its arrays in Keras' order (kernel, bias)}, for the layers with weights."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "layer_names" not in f.attrs and "layers" in f:
                return _keras3_layers(f)
            group = f.get("model_weights", f)  # a whole-model file keeps them there
            if "layer_names" not in group.attrs:
                raise UserError(
                    f"--file={path} is an HDF5 file but not Keras weights (no layer_names)"
                )
            return _legacy_layers(group)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"--file={path} does not exist") from None
    except (OSError, KeyError, ValueError) as e:  # h5py: not HDF5, truncated, a missing array
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--file={path} is not a readable Keras HDF5 file: {reason}") from e


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _legacy_layers(group) -> dict[str, list[np.ndarray]]:
    layers = {}
    for name in map(_text, group.attrs["layer_names"]):
        weight_names = [_text(w) for w in group[name].attrs.get("weight_names", [])]
        if weight_names:
            layers[name] = [np.asarray(group[name][w]) for w in weight_names]
    return layers


def _keras3_layers(f) -> dict[str, list[np.ndarray]]:
    layers = {}
    for path, layer in f["layers"].items():
        variables = layer.get("vars")
        if variables is None or not len(variables):
            continue
        name = _text(variables.attrs.get("name", path))
        layers[name] = [np.asarray(variables[str(i)]) for i in range(len(variables))]
    return layers


def convert(layers: dict[str, list[np.ndarray]], flag: str = "--file") -> layout.Imported:
    """keras.applications VGG layers -> cnn_jax's layouts (module doc)."""
    convs: dict[int, dict[int, layout.Conv]] = {}
    for name, arrays in layers.items():
        if m := _CONV_NAME.fullmatch(name):
            convs.setdefault(int(m[1]), {})[int(m[2])] = _conv(name, arrays, flag)
        elif name not in FC_LAYERS:
            raise UserError(
                f"{flag}: unknown layer {name!r} with weights: not keras.applications' VGG16 or "
                f"VGG19 (block<b>_conv<i>, {', '.join(FC_LAYERS)})"
            )
    missing = [n for n in FC_LAYERS if n not in layers]
    if missing:
        raise UserError(
            f"{flag}: no {missing[0]} layer (an include_top=False 'notop' file?): cnn_jax's VGG "
            "needs the classifier's weights"
        )
    blocks = _blocks(convs, flag)
    blocks[0] = (_fold_input(blocks[0][0], flag), *blocks[0][1:])
    classifier = tuple(_dense(name, layers[name], flag) for name in FC_LAYERS)
    convention = {
        "mean_rgb": list(CAFFE_MEAN_BGR[::-1]),
        "channel_order": "BGR (conv1_1's input channels reversed to take RGB)",
        "std_folded": None,
        "source_normalisation": "caffe: BGR, mean (103.939, 116.779, 123.68) subtracted, "
        "0..255, no scaling",
        "folded": ["conv1_1: input channels reversed (BGR -> RGB)"],
    }
    return layout.Imported(tuple(blocks), classifier, convention)


def _weights(name: str, arrays: list, flag: str, kernel_ndim: int):
    kernels = [a for a in arrays if a.ndim == kernel_ndim]
    biases = [a for a in arrays if a.ndim == 1]
    if len(arrays) != 2 or len(kernels) != 1 or len(biases) != 1:
        raise UserError(
            f"{flag}: layer {name} holds arrays of shapes {[a.shape for a in arrays]}; expected "
            f"a {kernel_ndim}-D kernel and a bias"
        )
    return np.asarray(kernels[0], np.float64), np.asarray(biases[0], np.float64)


def _conv(name: str, arrays: list, flag: str) -> layout.Conv:
    kernel, bias = _weights(name, arrays, flag, kernel_ndim=4)
    kh, kw, _, out = kernel.shape
    if kh != kw or kh not in (1, 3) or out != bias.shape[0]:
        raise UserError(
            f"{flag}: layer {name} has a kernel of shape {kernel.shape}, not channels-last "
            "(kh, kw, in, out): a channels-first (Theano-ordered) file? Use the "
            "tf_dim_ordering_tf_kernels one"
        )
    return layout.Conv(name, kernel, bias)


def _dense(name: str, arrays: list, flag: str) -> layout.Dense:
    kernel, bias = _weights(name, arrays, flag, kernel_ndim=2)
    return layout.Dense(name, kernel, bias)


def _blocks(convs: dict, flag: str) -> list[tuple[layout.Conv, ...]]:
    """block1 .. block5, each conv1 .. convN with no gaps."""
    if sorted(convs) != list(range(1, 6)):
        raise UserError(
            f"{flag}: convolution blocks {sorted(convs)}; keras.applications' VGG has "
            "block1..block5"
        )
    blocks = []
    for b in range(1, 6):
        positions = sorted(convs[b])
        if positions != list(range(1, len(positions) + 1)):
            raise UserError(f"{flag}: block{b} has convolutions {positions}, not 1..n")
        blocks.append(tuple(convs[b][i] for i in positions))
    return blocks


def _fold_input(conv: layout.Conv, flag: str) -> layout.Conv:
    """conv1_1 reading RGB where Keras' read BGR: its input channels reversed."""
    if conv.kernel.shape[2] != 3:
        raise UserError(
            f"{flag}: {conv.source} takes {conv.kernel.shape[2]} input channels, not BGR's 3"
        )
    return layout.Conv(conv.source, conv.kernel[:, :, ::-1, :], conv.bias, conv.norm)
