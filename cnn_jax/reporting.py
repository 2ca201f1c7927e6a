"""What a run shows and leaves behind: a progress bar, WORKDIR/metrics.jsonl, TensorBoard
event files. Only process 0 writes; the others' calls are no-ops."""

import json
import os
import sys

import jax
import tensorflow as tf
import tqdm

from cnn_jax.paths import METRICS_FILE, TENSORBOARD_DIR


class Reporter:
    def __init__(self, workdir: str, *, total_steps: int, start_step: int, progress_bar: bool):
        self._active = jax.process_index() == 0
        if not self._active:
            return
        path = os.path.join(workdir, METRICS_FILE)
        torn = _ends_mid_line(path)  # a write cut short (power cut): keep the next record whole
        self._jsonl = open(path, "a")  # noqa: SIM115
        if torn:
            self._jsonl.write("\n")
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIR))
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

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        self.close(failed=kind is not None)
        return False

    def close(self, failed: bool = False) -> None:
        """After a failure the bar is erased rather than left showing the steps it counted
        (it advances before a step's metrics are checked, so it could read 100%)."""
        if self._active and not self._jsonl.closed:
            self._bar.leave = not failed
            self._bar.close()
            self._jsonl.close()
            self._tb.close()


def _ends_mid_line(path: str) -> bool:
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read_metrics(workdir: str) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl (none if it is missing). The one reader of that
    file: a line that is not a record (cut short by a power cut, edited by hand) is skipped,
    and one warning names the file and the lines."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records, skipped = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if _is_record(record):
                records.append(record)
            else:
                skipped.append(number)
    if skipped and jax.process_index() == 0:
        numbers = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        which = (
            f"line {numbers}, which is not a metrics record"
            if len(skipped) == 1
            else f"{len(skipped)} lines ({numbers}), which are not metrics records"
        )
        print(f"warning: {path}: skipped {which} (a write cut short, or an edit)", file=sys.stderr)
    return records


def _is_record(record) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("step"), int)
        and isinstance(record.get("split"), str)
    )


def last_record(workdir: str, split: str) -> dict | None:
    found = [r for r in read_metrics(workdir) if r["split"] == split]
    return found[-1] if found else None
