"""AlexNet's first training steps under each initialisation: what stalls the paper's recipe.

    python benchmarks/alexnet_init.py --config=configs/alexnet.py:digits --workdir=DIR \\
        --config.model.init=paper [--steps=50] [--config.input.batch_size=128] \\
        [--config.optim.warmup_epochs=0.4]
    python benchmarks/alexnet_init.py --plot=docs/images/alexnet_init_curves.png DIR1 DIR2 ...

The first form trains --steps steps of the config's run (the same Trainer, state and compiled
step as `cnn_jax.main`) and writes every step's loss, accuracy, gradient norm and learning
rate to DIR/metrics.jsonl (split "train"), with DIR/config.json. At step 0 and at the steps of
PROBE_STEPS it also runs the network without dropout on one fixed batch (the first training
batch) and writes split "probe":
  fc6_dead, fc7_dead   the fraction of the layer's units whose ReLU is 0 on every image of
                       the batch (a unit dead there passes no gradient down for any of them)
  fc6_zero, fc7_zero   the fraction of all (image, unit) activations that are 0
  fc7_sq_norm          mean over images of |relu(fc7)|^2: fc8's input energy, which sets how
                       far one SGD step moves the scores (d score = -lr |h|^2 d loss/d score
                       for fc8's weights alone)
  score_spread         the scores' std over images (mean over classes) against their std
                       over classes (mean over images): near 0 when every image gets the same
                       scores, i.e. the input barely reaches the classifier

The second form draws the runs into one PNG (docs/learning.md shows it): loss, gradient norm
and fc7's dead units over the first steps of the runs measured by the first form, and the
held-out accuracy of the cnn_jax.main runs (the workdirs with evaluations).
"""

import collections
import json
import os
import sys

from absl import flags

from cnn_jax import cli
from cnn_jax.errors import UserError

PROBE_STEPS = (1, 2, 3, 5, 10, 20, 30, 50, 100, 150, 200)
LINE_STYLES = ("-", "--", ":", "-.")


def probe_function(model):
    """jit(params, images) -> the probe's statistics (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    def stats(params, images):
        scores, state = model.apply(
            {"params": params},
            images,
            train=False,
            capture_intermediates=lambda mdl, _: mdl.name in ("fc6", "fc7"),
            mutable=["intermediates"],
        )
        out = {}
        for layer in ("fc6", "fc7"):
            pre = state["intermediates"][layer]["__call__"][0]  # Dense output, before ReLU
            active = pre > 0
            out[f"{layer}_dead"] = jnp.mean(~jnp.any(active, axis=0))
            out[f"{layer}_zero"] = jnp.mean(~active)
            if layer == "fc7":
                out["fc7_sq_norm"] = jnp.mean(jnp.sum(jnp.maximum(pre, 0.0) ** 2, axis=-1))
        across_images = jnp.mean(jnp.std(scores, axis=0))
        across_classes = jnp.mean(jnp.std(scores, axis=1))
        out["score_spread"] = across_images / jnp.maximum(across_classes, 1e-30)
        out["score_mean_abs"] = jnp.mean(jnp.abs(scores))
        return out

    return jax.jit(stats)


def measure(config, workdir: str, steps: int) -> None:
    import jax

    from cnn_jax import checkpoint, reporting, train

    os.makedirs(workdir, exist_ok=True)
    if reporting.read_metrics(workdir):
        raise UserError(f"--workdir={workdir} already holds metrics: give a new directory")
    config.run.num_train_steps = steps
    trainer = train.build_trainer(config)
    if trainer.experiment.mesh_shape[1] != 1:
        raise UserError("the probe runs the towers on one device: use --config.mesh.model=1")
    checkpoint.write_config(trainer.record, workdir)
    state = trainer.init_state()
    batches = trainer.train_batches(0)
    first = next(batches)
    probe = probe_function(trainer.model)
    probe_images = first["image"]
    optimizer = trainer.experiment.optimizer
    with reporting.Reporter(workdir, total_steps=steps, start_step=0, progress_bar=False) as r:
        r.write(0, "probe", jax.device_get(probe(state.params, probe_images)))
        batch = first
        for step in range(steps):
            learning_rate = optimizer.learning_rate(step, state.opt_state)
            state, metrics = trainer.train_step(state, batch)
            r.write(step + 1, "train", {**jax.device_get(metrics), "learning_rate": learning_rate})
            if step + 1 in PROBE_STEPS or step + 1 == steps:
                r.write(step + 1, "probe", jax.device_get(probe(state.params, probe_images)))
            if step + 1 < steps:
                batch = next(batches)


def run_config(workdir: str) -> dict:
    with open(os.path.join(workdir, "config.json")) as f:
        return json.load(f)


def run_label(workdir: str) -> str:
    c = run_config(workdir)
    label = f"{c['model'].get('init', 'paper')}, batch {c['input']['batch_size']}"
    if c["optim"].get("warmup_epochs"):
        label += f", warm-up {c['optim']['warmup_epochs']:g} epoch"
    if c["data"]["name"] == "synthetic":
        label += f", {c['data']['num_classes']} random classes"
    return label


def _records(workdir: str, split: str) -> list[dict]:
    from cnn_jax import reporting

    return [r for r in reporting.read_metrics(workdir) if r["split"] == split]


def _images_seen(workdir: str, records: list[dict]) -> list[int]:
    """Images, not steps: runs of different batch sizes then share the axis."""
    batch = run_config(workdir)["input"]["batch_size"]
    return [r["step"] * batch for r in records]


def _first_steps(axes, workdir: str, style: dict) -> None:
    """Loss, gradient norm (every step) and fc7's dead units (the probes) of a measured run;
    a run that diverged says so in its label (its curve leaves the top of the plot)."""
    import math

    train, probes = _records(workdir, "train"), _records(workdir, "probe")
    label = run_label(workdir)
    finite = [r for r in train if math.isfinite(r["loss"])]
    if len(finite) < len(train):
        label += f" (loss {train[0]['loss']:.3g} at step 1, NaN at step {len(finite) + 1})"
    seen = _images_seen(workdir, finite)
    for ax, key in zip(axes[:2], ("loss", "grad_norm"), strict=True):
        ax.plot(seen, [r[key] for r in finite], lw=1.2, label=label, **style)
    probes = [r for r in probes if math.isfinite(r.get("fc7_sq_norm", math.nan))]
    axes[2].plot(
        _images_seen(workdir, probes), [100 * r["fc7_dead"] for r in probes], marker="o",
        lw=1.2, ms=3, label=label, **style,
    )  # fmt: skip


def _held_out(ax, workdir: str, style: dict) -> None:
    evals = _records(workdir, "eval")
    rates = sorted({round(r["learning_rate"], 9) for r in _records(workdir, "train")})
    lr = " -> ".join(f"{r:g}" for r in reversed(rates))
    schedule = f"lr {lr}" if len(rates) > 1 else f"lr {lr} throughout"
    ax.plot(
        [r["step"] for r in evals], [100 * r["accuracy"] for r in evals], marker="o",
        lw=1.2, ms=4, label=f"{run_label(workdir)}, {schedule}", **style,
    )  # fmt: skip


def plot(out: str, workdirs: list[str]) -> None:
    """A 2x2 picture: the first steps of the runs with probes (loss, gradient norm, fc7's
    dead units against images seen), and the held-out accuracy of the runs with evaluations
    (cnn_jax.main runs) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not workdirs:
        raise UserError("--plot: give the run directories to draw as arguments")
    fig, grid = plt.subplots(2, 2, figsize=(11, 7.5), dpi=100)
    loss_ax, grad_ax, dead_ax, eval_ax = grid.ravel()
    # One colour per init; the runs of one init on one panel take turns at the line styles.
    colours = dict(zip(("paper", "caffe", "he"), ("C0", "C1", "C2"), strict=True))
    drawn = collections.Counter()
    for workdir in workdirs:
        if not _records(workdir, "train"):
            raise UserError(f"{workdir} has no training records in metrics.jsonl")
        init = run_config(workdir)["model"].get("init", "paper")
        for kind, draw in (("probe", _first_steps), ("eval", _held_out)):
            if _records(workdir, kind):
                style = {"color": colours.get(init, "C3"), "ls": LINE_STYLES[drawn[kind, init] % 4]}
                drawn[kind, init] += 1
                draw((loss_ax, grad_ax, dead_ax) if kind == "probe" else eval_ax, workdir, style)
    loss_ax.axhline(2.3026, color="grey", ls=":", lw=1, label="chance, 10 classes (ln 10)")
    titles = {
        loss_ax: "training loss per step",
        grad_ax: "gradient norm per step",
        dead_ax: "fc7 units dead on a fixed batch (%)",
    }
    for ax, title in titles.items():
        ax.set_xlabel("training images seen")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    for ax, top in ((loss_ax, 100.0), (grad_ax, 1e4)):
        ax.set_yscale("log")
        ax.set_ylim(1.0, top)  # a diverging run's 1e15 would flatten the others
    eval_ax.axhline(90, color="grey", ls=":", lw=1)
    eval_ax.set(xlabel="training steps", ylim=(0, 100))
    eval_ax.set_title("held-out accuracy, 1,000 test digits (%)", fontsize=10)
    eval_ax.grid(True, alpha=0.3)
    loss_ax.legend(fontsize=7)
    eval_ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("AlexNet, full width, 224 px, bundled digits: each initialisation", fontsize=11)
    fig.tight_layout()
    fig.savefig(out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()
    cli.define_config_flag(fv, argv)
    flags.DEFINE_string("workdir", None, "Where the run's records go.", flag_values=fv)
    flags.DEFINE_integer("steps", 50, "Training steps.", lower_bound=1, flag_values=fv)
    flags.DEFINE_string(
        "plot", None, "Draw the runs given as arguments into this PNG.", flag_values=fv
    )
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(__doc__.split("\n\n")[1], fv.get_help(), sep="\n\n")
        return
    rest = cli.parse_flags(argv, fv)

    if fv.plot:
        cli.run(lambda: plot(fv.plot, rest[1:]))
        return

    def body():
        if fv.config is None or fv.workdir is None:
            raise UserError("--config=configs/alexnet.py[:arg] and --workdir=DIR are required")
        measure(fv.config, os.path.expanduser(fv.workdir), fv.steps)

    cli.run(body, fv.config)


if __name__ == "__main__":
    main()
