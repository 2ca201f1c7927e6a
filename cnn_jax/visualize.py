"""Pictures of a run, drawn from what it left in its workdir.

    python -m cnn_jax.visualize --workdir=DIR [--out=DIR]

Writes PNGs into --out (default: the workdir):
  curves.png                training and evaluation loss / accuracy over steps (metrics.jsonl)
  alexnet_conv1.png         AlexNet: conv1's 11x11x3 kernels, one panel per tower (the paper's
                            Fig. 3: tower 1 learns colour-agnostic, tower 2 colour-specific ones)
  lenet_feature_maps.png    LeNet-5: one test digit and its C1 and C3 maps (the paper's Fig. 13
                            shows the same layers at work)

The run is read back from config.json, metrics.jsonl and the latest checkpoint (restored onto
this machine's first device, whatever mesh trained it).
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines

import jax
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from absl import flags

from cnn_jax import checkpoint, cli, paths, reporting
from cnn_jax.errors import UserError
from cnn_jax.paths import CONFIG_FILE

DPI = 100  # small files: the pictures go into the README


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config the run recorded in WORKDIR/config.json."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise UserError(f"--workdir={workdir} has no {CONFIG_FILE}: is it a cnn_jax run?")
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
            raise ValueError("not a run's config: no 'model' group")
        if "name" not in saved["model"]:
            raise ValueError("not a run's config: no 'model.name' field")
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}): is it a cnn_jax run's config?") from e
    return ml_collections.ConfigDict(saved)


def restore_params(workdir: str) -> tuple[int, dict]:
    """(step, params) of the workdir's latest checkpoint, on this machine's first device."""
    if not os.path.isdir(paths.checkpoints_dir(workdir)):
        raise UserError(f"--workdir={workdir} has no {paths.CHECKPOINTS_DIR}/")
    step, state = checkpoint.read_newest(
        workdir,
        lambda saved: {"params": checkpoint.on_one_device(saved["params"])},
        flag="--workdir",
    )
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


def first_eval_example(source, prep) -> tuple[np.ndarray, int]:
    """The first eval example, preprocessed as evaluation sees it."""
    example = next(iter(source.process_examples("eval").take(1)))
    return np.asarray(prep.center(example["image"])), int(example["label"])


def plot_lenet_feature_maps(model, params, example: tuple[np.ndarray, int], path: str) -> None:
    """One digit, the six C1 maps and the sixteen C3 maps it produces (outputs of the
    convolutions, before the squashing function)."""
    image, label = example
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
    fig.suptitle(f"LeNet-5 ({type(model).__name__}) feature maps of one test image", fontsize=10)
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
    records = reporting.read_metrics(workdir)  # skips, and names, lines that are not records
    if records:
        written.append(os.path.join(out, "curves.png"))
        plot_curves(records, written[-1])
    from cnn_jax import experiment
    from cnn_jax.models import alexnet, lenet

    model = experiment.model(config)
    if isinstance(model, alexnet.AlexNet):
        step, params = restore_params(workdir)
        written.append(os.path.join(out, "alexnet_conv1.png"))
        plot_alexnet_conv1(params, model.towers, written[-1], step)
    elif isinstance(model, lenet.LeNet5 | lenet.LeNet5Modern):
        _, params = restore_params(workdir)
        cli.keep_cache_only_if_it_reloads()  # the feature maps are computed: compiled
        written.append(os.path.join(out, "lenet_feature_maps.png"))
        example = first_eval_example(experiment.source(config), experiment.preprocessing(config))
        plot_lenet_feature_maps(model, params, example, written[-1])
    if not written:
        raise UserError(f"--workdir={workdir}: nothing to draw (no metrics, no known model)")
    return written


def main(argv: list[str] | None = None) -> None:
    """Command line; takes argv (program name first) so tests can call it in-process. Its
    flags live in their own FlagValues, so it never clashes with cnn_jax.main's."""
    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "A run's directory.", flag_values=fv)
    flags.DEFINE_string(
        "out", None, "Where to write the PNGs (default: the workdir).", flag_values=fv
    )
    if not cli.parse_tool_flags(argv, fv, __doc__):
        return

    def draw():
        if fv.workdir is None:
            raise UserError("--workdir=DIR is required: the run's directory")
        for path in write_pictures(fv.workdir, fv.out):
            print(path)

    cli.run(draw)


if __name__ == "__main__":
    main()
