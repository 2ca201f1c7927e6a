"""What a run shows and leaves behind: a progress bar, WORKDIR/metrics.jsonl, TensorBoard
event files. Only process 0 writes; the others' calls are no-ops."""

import json
import os

import jax
import tensorflow as tf
import tqdm


class Reporter:
    def __init__(self, workdir: str, *, total_steps: int, start_step: int, progress_bar: bool):
        self._active = jax.process_index() == 0
        if not self._active:
            return
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
        self._bar = tqdm.tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            disable=not progress_bar,
            mininterval=1.0,
        )

    def advance(self, steps: int = 1, **postfix) -> None:
        if self._active:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def write(self, step: int, split: str, metrics: dict) -> None:
        """One line of metrics.jsonl and the same scalars in TensorBoard."""
        if not self._active:
            return
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        with self._tb.as_default(step=int(step)):
            for k, v in metrics.items():
                tf.summary.scalar(f"{split}/{k}", float(v))
        self._tb.flush()
        if split != "train" or self._bar.disable:
            shown = " ".join(
                f"{k}={v:.4g}" for k, v in record.items() if k not in ("step", "split")
            )
            self.message(f"step {step} {split}: {shown}")

    def message(self, text: str) -> None:
        if self._active:
            tqdm.tqdm.write(text)

    def close(self) -> None:
        if self._active:
            self._bar.close()
            self._jsonl.close()
            self._tb.close()


def last_record(workdir: str, split: str) -> dict | None:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    found = None
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("split") == split:
                found = record
    return found
