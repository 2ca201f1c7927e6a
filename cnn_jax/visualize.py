"""Pictures of a run: python -m cnn_jax.visualize --workdir=DIR [--out=DIR]

Writes PNGs into --out (default: the workdir):
  curves.png                training and evaluation loss / accuracy over steps (metrics.jsonl)
  alexnet_conv1.png         AlexNet: conv1's 11x11x3 kernels, one panel per tower (the paper's
                            Fig. 3: tower 1 learns colour-agnostic, tower 2 colour-specific ones)
  lenet_feature_maps.png    LeNet-5: one test digit and its C1 and C3 maps (the paper's Fig. 13
                            shows the same layers at work)

The run is read back from what it left in the workdir: config.json, metrics.jsonl and the
latest checkpoint (restored onto this machine's first device, whatever mesh trained it).
"""

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines

import jax
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf

from cnn_jax import checkpoint, cli, models, paths, reporting
from cnn_jax.data import datasets, preprocess
from cnn_jax.errors import RunFailure, UserError

CONFIG_FILE = "config.json"
DPI = 100  # small files: the pictures go into the README


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise UserError(f"--workdir={workdir} has no {CONFIG_FILE}: is it a cnn_jax run?")
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict) or "model" not in saved:
            raise ValueError("not a run's config: no 'model' field")
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}): is it a cnn_jax run's config?") from e
    return ml_collections.ConfigDict(saved)


def load_metrics(workdir: str) -> list[dict]:
    return reporting.read_metrics(workdir)  # skips, and names, lines that are not records


def restore_params(workdir: str) -> tuple[int, dict]:
    """(step, params) of the workdir's latest checkpoint, on one device."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise UserError(f"--workdir={workdir} has no checkpoints/")
    # Read-only: a run still training in this workdir keeps its in-flight saves.
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(directory, options=options, item_names=("state",)) as manager:
        step = manager.latest_step()
    if step is None:
        raise UserError(f"--workdir={workdir} has no checkpoint")
    path = os.path.join(directory, str(step), "state")  # CheckpointManager's layout
    with ocp.StandardCheckpointer() as reader:
        # Abstract arrays on one local device instead of the saved mesh's shardings, so a
        # checkpoint from 8 devices (or a TPU slice) opens on a laptop.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        checkpoint.hide_abandoned_read_reports()  # of a restore that fails: our line says it
        try:
            abstract = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                reader.metadata(path).item_metadata,
            )
            state = reader.restore(path, abstract)
        except Exception as e:  # Orbax/TensorStore: a truncated or missing file
            raise RunFailure(
                f"the latest checkpoint (step {step}) in {directory} does not restore: "
                f"{checkpoint.innermost_message(e)}"
            ) from e
    return step, jax.device_get(state["params"])


# --- Pictures -------------------------------------------------------------------------------


def plot_curves(records: list[dict], path: str) -> None:
    """Loss and accuracy against steps, training and evaluation side by side."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    series = [
        ("train", "accuracy", "train top-1"),
        ("eval", "accuracy", "eval top-1"),
        ("eval", "top5_accuracy", "eval top-5"),
    ]
    for split, style in (("train", "-"), ("eval", "o-")):
        rows = [r for r in records if r["split"] == split and "loss" in r]
        if rows:
            ax_loss.plot(
                [r["step"] for r in rows],
                [r["loss"] for r in rows],
                style,
                label=split,
                markersize=3,
            )
    for split, key, label in series:
        rows = [r for r in records if r["split"] == split and key in r]
        if rows:
            ax_acc.plot(
                [r["step"] for r in rows],
                [r[key] for r in rows],
                "-" if split == "train" else "o-",
                label=label,
                markersize=3,
            )
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    if all(r["loss"] > 0 for r in records if "loss" in r):
        ax_loss.set_yscale("log")  # early losses would flatten the rest of the curve
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _mosaic(kernels: np.ndarray, columns: int) -> np.ndarray:
    """(k, k, 3, n) kernels -> one RGB image, each kernel stretched to [0, 1] on its own and
    separated by a one-pixel white border."""
    k, n = kernels.shape[0], kernels.shape[-1]
    rows = -(-n // columns)
    out = np.ones((rows * (k + 1) + 1, columns * (k + 1) + 1, 3), np.float32)
    for i in range(n):
        w = kernels[..., i]
        w = (w - w.min()) / max(float(w.max() - w.min()), 1e-12)
        r, c = divmod(i, columns)
        out[1 + r * (k + 1) : 1 + r * (k + 1) + k, 1 + c * (k + 1) : 1 + c * (k + 1) + k] = w
    return out


def _conv1_kernel(params) -> np.ndarray:
    kernel = np.asarray(params["conv1"]["kernel"], np.float32)
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise UserError(f"conv1's kernel has shape {kernel.shape}; expected (11, 11, 3, maps)")
    return kernel


def plot_alexnet_conv1(params, towers: int, path: str, step: int) -> None:
    """The paper's Fig. 3: conv1's kernels, each tower's half of the maps in its own panel
    (towers are halves of the kernel's last axis, tower 1 first)."""
    kernel = _conv1_kernel(params)
    per_tower = np.split(kernel, towers, axis=-1)
    columns = 16
    fig, axes = plt.subplots(towers, 1, figsize=(8, 1.9 * towers), squeeze=False)
    for t, (ax, tower) in enumerate(zip(axes[:, 0], per_tower, strict=True)):
        ax.imshow(_mosaic(tower, columns), interpolation="nearest")
        ax.set_axis_off()
        name = f"tower {t + 1} (the paper's GPU {t + 1})" if towers > 1 else "single tower"
        ax.set_title(f"conv1 kernels, {name}: {tower.shape[-1]} of 11x11x3", fontsize=9)
    fig.suptitle(f"AlexNet conv1 after {step} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _one_eval_digit(config) -> tuple[np.ndarray, int]:
    """The first eval example, preprocessed as evaluation sees it."""
    example = next(iter(datasets.process_examples(config, "eval").take(1)))
    op = preprocess.PREPROCESSORS[config.preprocess]
    image = op(example["image"], tf.zeros([2], tf.int64), train=False, config=config)
    return image.numpy(), int(example["label"])


def plot_lenet_feature_maps(config, params, path: str) -> None:
    """One digit, the six C1 maps and the sixteen C3 maps it produces (outputs of the
    convolutions, before the squashing function)."""
    image, label = _one_eval_digit(config)
    model = models.build_model(config)
    scores, state = model.apply(
        {"params": params},
        image[None],
        train=False,
        capture_intermediates=lambda module, _: module.name in ("C1", "C3"),
    )
    maps = {
        name: np.asarray(state["intermediates"][name]["__call__"][0][0]) for name in ("C1", "C3")
    }
    predicted = int(np.argmax(scores[0]))

    fig = plt.figure(figsize=(9, 4.2))
    grid = fig.add_gridspec(3, 9)
    ax = fig.add_subplot(grid[:, 0])
    shown = (image - image.min()) / max(float(image.max() - image.min()), 1e-12)
    ax.imshow(shown[..., 0] if shown.shape[-1] == 1 else shown, cmap="gray_r")
    ax.set_title(f"input\nlabel {label}\npredicted {predicted}", fontsize=8)
    ax.set_axis_off()
    rows = [
        ("C1", maps["C1"], 0, 6),
        ("C3", maps["C3"][..., :8], 1, 8),
        ("C3", maps["C3"][..., 8:], 2, 8),
    ]
    for name, stack, row, count in rows:
        first = 0 if row < 2 else 8
        for i in range(count):
            ax = fig.add_subplot(grid[row, 1 + i])
            ax.imshow(stack[..., i], cmap="viridis")
            ax.set_axis_off()
            ax.set_title(f"{name} #{first + i}", fontsize=7)
    fig.suptitle(f"LeNet-5 ({config.model}) feature maps of one test image", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def write_pictures(workdir: str, out: str | None = None) -> list[str]:
    """Every picture that applies to the run in workdir; returns their paths."""
    workdir = paths.existing_directory(workdir, "--workdir")
    config = load_config(workdir)
    if out is not None:
        out = paths.writable_directory(out, "--out")
    else:
        try:
            out = paths.writable_directory(workdir, "--workdir")
        except UserError as e:  # a finished run on a read-only share, say
            raise UserError(f"{e}: give --out=DIR for the pictures") from None
    written = []
    records = load_metrics(workdir)
    if records:
        written.append(os.path.join(out, "curves.png"))
        plot_curves(records, written[-1])
    if config.model.startswith("alexnet"):
        step, params = restore_params(workdir)
        written.append(os.path.join(out, "alexnet_conv1.png"))
        towers = 2 if config.model == "alexnet" else 1
        plot_alexnet_conv1(params, towers, written[-1], step)
    elif config.model.startswith("lenet5"):
        _, params = restore_params(workdir)
        written.append(os.path.join(out, "lenet_feature_maps.png"))
        plot_lenet_feature_maps(config, params, written[-1])
    if not written:
        raise UserError(f"--workdir={workdir}: nothing to draw (no metrics, no known model)")
    return written


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as from every cnn_jax command (argparse adds usage)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> None:
    parser = _Parser(
        prog="python -m cnn_jax.visualize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", required=True, help="a run's directory")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: workdir)")
    args = parser.parse_args(argv)

    def draw():
        for path in write_pictures(args.workdir, args.out):
            print(path)

    cli.run(draw)


if __name__ == "__main__":
    main(sys.argv[1:])
