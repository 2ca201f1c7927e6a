"""torchvision's VGG state dicts (vgg11/13/16/19 and their `_bn` versions) -> `Imported`.

torchvision builds VGG as `features` (an nn.Sequential: Conv2d(3x3, padding 1), [BatchNorm2d],
ReLU, ..., MaxPool2d(2, 2) closing each block), `avgpool` (AdaptiveAvgPool2d(7)) and
`classifier` (Linear 25088->4096, ReLU, Dropout, Linear 4096->4096, ReLU, Dropout,
Linear 4096->1000). Only layers with parameters have keys, so the keys' indices give the
layout: inside a block consecutive convolutions are 2 apart (conv, ReLU) or 3 with batch norm
(conv, BN, ReLU), and one more across a max-pool. vgg11/13/16/19 are Table 1's A/B/D/E layer
for layer; cnn_jax's adaptive pool before FC6 is torchvision's AdaptiveAvgPool2d(7).

Conversions, each exact:
- Conv2d weight (out, in, kh, kw) -> HWIO: transpose(2, 3, 1, 0).
- Linear weight (out, in) -> (in, out): its transpose. FC6's in-features are conv5's map
  flattened in PyTorch's (C, H, W) order; cnn_jax flattens NHWC in (H, W, C) order, so FC6's
  rows are permuted: W.reshape(out, C, 7, 7).transpose(2, 3, 1, 0).reshape(49 C, out).
- `_bn`: torchvision's convolutions keep their bias before BatchNorm2d; cnn_jax's have none
  (the BN shift replaces it), so the bias is folded into the running mean: BN(x + b) with
  mean m is BN(x) with mean m - b. BatchNorm2d's eps is 1e-5, Flax's default; its momentum
  0.1 is Flax's 0.9. num_batches_tracked is not needed.
- Input: torchvision's models take RGB in [0, 1] normalised by mean (0.485, 0.456, 0.406) and
  std (0.229, 0.224, 0.225); cnn_jax's `vgg` preprocessing gives 0..255 RGB less a mean. With
  the mean 255 x (0.485, 0.456, 0.406) subtracted, torchvision's input is cnn_jax's divided by
  255 std per channel, which conv1_1's kernel absorbs (input channel c divided by 255 std_c).
  The mean cannot be folded into conv1_1's bias exactly (zero padding would add it at the
  borders), so the checkpoint records it and runs subtract it (docs/weights.md).
"""

import re

import numpy as np

from cnn_jax.errors import UserError
from cnn_jax.weights import layout, pth

# torchvision.transforms.Normalize's values for every ImageNet model (torchvision docs).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FC6_WINDOW = 7  # AdaptiveAvgPool2d(7) before the classifier
CLASSIFIER_INDICES = (0, 3, 6)  # the three Linear layers of torchvision's classifier

_FEATURE_KEY = re.compile(
    r"features\.(\d+)\.(weight|bias|running_mean|running_var|num_batches_tracked)"
)
_CLASSIFIER_KEY = re.compile(r"classifier\.(\d+)\.(weight|bias)")
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def load(path: str, *, reader: str = "auto") -> layout.Imported:
    """The torchvision VGG state dict in `path` (a .pth), converted."""
    return convert(pth.load_state_dict(path, reader), flag=f"--file={path}")


def convert(state: dict[str, np.ndarray], flag: str = "--file") -> layout.Imported:
    """A torchvision VGG state dict ({key: array}) -> cnn_jax's layouts (module doc)."""
    features, classifier = _split_keys(state, flag)
    convs = _convolutions(features, flag)
    blocks = _blocks(convs, flag)
    fcs = _classifier(classifier, flag, last_maps=blocks[-1][-1].kernel.shape[-1])
    blocks[0] = (_fold_input(blocks[0][0], flag), *blocks[0][1:])
    convention = {
        "mean_rgb": [round(255.0 * m, 6) for m in MEAN],
        "channel_order": "RGB",
        "std_folded": list(STD),
        "source_normalisation": "((x / 255) - mean) / std, mean (0.485, 0.456, 0.406), "
        "std (0.229, 0.224, 0.225), RGB",
        "folded": [
            "conv1_1: input channel c divided by 255 * std_c",
            "fc6: rows permuted from (C, H, W) to (H, W, C) flatten order",
            *(["conv biases folded into the batch-norm means"] if blocks[0][0].norm else []),
        ],
    }
    return layout.Imported(tuple(blocks), fcs, convention)


def _split_keys(state: dict, flag: str) -> tuple[dict, dict]:
    """{index: {field: array}} of `features` and of `classifier`; any other key is refused."""
    features: dict[int, dict] = {}
    classifier: dict[int, dict] = {}
    for key, value in state.items():
        if m := _FEATURE_KEY.fullmatch(key):
            features.setdefault(int(m[1]), {})[m[2]] = value
        elif m := _CLASSIFIER_KEY.fullmatch(key):
            classifier.setdefault(int(m[1]), {})[m[2]] = value
        else:
            raise UserError(
                f"{flag}: unknown key {key!r}: not a torchvision VGG state dict (its keys are "
                "features.N.weight/bias[/running_mean/running_var/num_batches_tracked] and "
                "classifier.0/3/6.weight/bias)"
            )
    if not features:
        raise UserError(f"{flag}: no features.N keys: not a torchvision VGG state dict")
    return features, classifier


def _array(fields: dict, key: str, field: str, flag: str, ndim: int) -> np.ndarray:
    if field not in fields:
        raise UserError(f"{flag}: missing key {key}.{field}")
    value = np.asarray(fields[field], np.float64)
    if value.ndim != ndim:
        raise UserError(
            f"{flag}: {key}.{field} has shape {value.shape}; expected {ndim} dimensions"
        )
    return value


def _convolutions(features: dict, flag: str) -> list[tuple[int, layout.Conv]]:
    """(index, Conv) of every Conv2d, its BatchNorm2d (the next index) attached."""
    convs, norms = [], {}
    for index in sorted(features):
        fields, key = features[index], f"features.{index}"
        if "running_mean" in fields or "running_var" in fields:
            norms[index] = fields
            continue
        weight = _array(fields, key, "weight", flag, ndim=4)
        bias = _array(fields, key, "bias", flag, ndim=1) if "bias" in fields else None
        convs.append((index, key, weight, bias))
    out = []
    for index, key, weight, bias in convs:
        fields = norms.pop(index + 1, None)
        norm = None if fields is None else _batch_norm(fields, f"features.{index + 1}", flag)
        if norm is None and bias is None:
            raise UserError(f"{flag}: missing key {key}.bias")
        if norm is not None and bias is not None:  # BN(x + b) = BN(x) with mean - b
            norm = layout.BatchNorm(norm.scale, norm.bias, norm.mean - bias, norm.var)
        kernel = weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        out.append((index, layout.Conv(key, kernel, None if norm else bias, norm)))
    if norms:
        index = min(norms)
        raise UserError(
            f"{flag}: features.{index} is a batch norm that follows no convolution "
            f"(features.{index - 1}.weight): not torchvision's VGG layout"
        )
    return out


def _batch_norm(fields: dict, key: str, flag: str) -> layout.BatchNorm:
    scale, bias, mean, var = (_array(fields, key, f, flag, ndim=1) for f in _BN_FIELDS)
    return layout.BatchNorm(scale, bias, mean, var)


def _blocks(convs: list, flag: str) -> list[tuple[layout.Conv, ...]]:
    """Convolutions grouped into blocks by the gaps between their indices (module doc)."""
    blocks: list[list[layout.Conv]] = [[]]
    for (index, conv), following in zip(convs, [*convs[1:], None], strict=True):
        blocks[-1].append(conv)
        if following is None:
            break
        step = 2 + (conv.norm is not None)  # conv [BN] ReLU
        gap = following[0] - index
        if gap == step + 1:  # ... MaxPool2d
            blocks.append([])
        elif gap != step:
            raise UserError(
                f"{flag}: features.{following[0]} follows features.{index} {gap} indices on: "
                f"not torchvision's VGG layout ({step} within a block, {step + 1} across a pool)"
            )
    return [tuple(b) for b in blocks]


def _classifier(classifier: dict, flag: str, last_maps: int) -> tuple[layout.Dense, ...]:
    unexpected = sorted(set(classifier) - set(CLASSIFIER_INDICES))
    if unexpected:
        raise UserError(
            f"{flag}: unknown key classifier.{unexpected[0]}.*: torchvision's VGG classifier "
            f"has Linear layers at {', '.join(map(str, CLASSIFIER_INDICES))} only"
        )
    dense = []
    for index in CLASSIFIER_INDICES:
        key, fields = f"classifier.{index}", classifier.get(index, {})
        weight = _array(fields, key, "weight", flag, ndim=2)
        bias = _array(fields, key, "bias", flag, ndim=1)
        dense.append((key, weight, bias))
    (key6, w6, b6), *rest = dense
    window = FC6_WINDOW * FC6_WINDOW
    if w6.shape[1] != last_maps * window:
        raise UserError(
            f"{flag}: {key6}.weight has {w6.shape[1]} in-features; after conv5's {last_maps} "
            f"maps pooled to {FC6_WINDOW}x{FC6_WINDOW} FC6 needs {last_maps * window}"
        )
    out = w6.shape[0]
    fc6 = w6.reshape(out, last_maps, FC6_WINDOW, FC6_WINDOW).transpose(2, 3, 1, 0)
    fc6 = fc6.reshape(window * last_maps, out)  # rows in (H, W, C) order
    return (
        layout.Dense(key6, fc6, b6),
        *(layout.Dense(key, w.T, b) for key, w, b in rest),
    )


def _fold_input(conv: layout.Conv, flag: str) -> layout.Conv:
    """conv1_1 taking cnn_jax's 0..255 input (less the checkpoint's mean) in place of
    torchvision's normalised one: input channel c divided by 255 std_c."""
    if conv.kernel.shape[2] != len(STD):
        raise UserError(
            f"{flag}: {conv.source}.weight takes {conv.kernel.shape[2]} input channels, not RGB's 3"
        )
    scale = 1.0 / (255.0 * np.asarray(STD, np.float64))
    return layout.Conv(conv.source, conv.kernel * scale[:, None], conv.bias, conv.norm)
