"""Learning curves of several runs in one picture: held-out accuracy and training loss against
the step, one line per run, from each run's WORKDIR/metrics.jsonl (cnn_jax.reporting).

    python tools/learning_curves.py --out=docs/images/vgg_warm_start.png \\
        "D from scratch=runs/vgg_d_digits" "D warm-started from A=runs/vgg_d_warm_digits"
    python tools/learning_curves.py --reach=0.5,0.9 LABEL=WORKDIR ...   # the table alone

Each argument is LABEL=WORKDIR (or a bare WORKDIR, labelled by its folder's name). Besides the
picture it prints, per run, its final held-out accuracy and the first evaluated step at which
held-out accuracy reached each of --reach (how docs/learning.md measures VGG's warm start).
"""

import argparse
import itertools
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines

import matplotlib.pyplot as plt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout: the package beside this folder

from cnn_jax import reporting  # noqa: E402

DPI = 100  # small files: the pictures go into the docs


def parse_run(argument: str) -> tuple[str, str]:
    """(label, workdir) of LABEL=WORKDIR, or of a bare WORKDIR (labelled by its name)."""
    label, sep, workdir = argument.partition("=")
    if not sep:
        workdir = argument
        label = os.path.basename(os.path.normpath(argument))
    return label, workdir


def series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the records of `split`, in step order."""
    rows = sorted((r["step"], r[key]) for r in records if r["split"] == split and key in r)
    return [s for s, _ in rows], [v for _, v in rows]


def first_step_reaching(steps: list[int], values: list[float], level: float) -> int | None:
    """The first step whose value is at least `level`; None if none is."""
    return next((s for s, v in zip(steps, values, strict=True) if v >= level), None)


def full_windows(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    """The series without a last point whose logging window is under half the others' (the
    run's final record averages the few steps after the last full window: a noisy point)."""
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    if len(gaps) >= 2 and 2 * gaps[-1] < max(set(gaps), key=gaps.count):
        return steps[:-1], values[:-1]
    return steps, values


def plot(runs: list[tuple[str, list[dict]]], out: str, title: str) -> None:
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, records in runs:
        ax_acc.plot(*series(records, "eval", "accuracy"), "o-", markersize=3, label=label)
        loss = full_windows(*series(records, "train", "loss"))
        ax_loss.plot(*loss, "-", linewidth=1, label=label)
    ax_acc.set(xlabel="step", ylabel="held-out top-1 accuracy", ylim=(0, 1.02))
    ax_loss.set(xlabel="step", ylabel="training loss (mean of each logged window)")
    ax_loss.set_yscale("log")  # the first steps' losses would flatten the rest
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def summary_lines(runs: list[tuple[str, list[dict]]], levels: list[float]) -> list[str]:
    lines = []
    for label, records in runs:
        steps, accuracy = series(records, "eval", "accuracy")
        final = f"{accuracy[-1]:.3f} at step {steps[-1]}" if steps else "no evaluation"
        reach = ", ".join(
            f">= {level:.0%}: step {first_step_reaching(steps, accuracy, level)}"
            for level in levels
        )
        lines.append(f"{label}: final held-out accuracy {final}; first reached {reach}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=WORKDIR or WORKDIR")
    parser.add_argument("--out", default="", help="the PNG to write; empty: print only")
    parser.add_argument("--title", default="")
    parser.add_argument("--reach", default="0.5,0.9", help="accuracy levels, comma-separated")
    args = parser.parse_args(argv)
    runs = []
    for label, workdir in map(parse_run, args.runs):
        records = reporting.read_metrics(workdir)
        if not records:
            print(f"error: {workdir} has no metrics records", file=sys.stderr)
            return 2
        runs.append((label, records))
    print("\n".join(summary_lines(runs, [float(x) for x in args.reach.split(",") if x])))
    if args.out:
        plot(runs, args.out, args.title)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
