"""Formats the JSON lines benchmarks/cpu_table.sh leaves into docs/performance.md's table.

python benchmarks/cpu_table.py /tmp/cpu_table
"""

import json
import pathlib
import sys

ROWS = (
    ("lenet5", "LeNet-5 (`configs/lenet.py`), 2 XLA devices"),
    ("alexnet_one_device", "AlexNet, both towers on one device (`--config.mesh.model=1`)"),
    (
        "alexnet_towers_two_devices",
        "AlexNet, towers on 2 devices (`--config.mesh.model=2 --config.mesh.cpu_devices=2`)",
    ),
    ("vgg_a", "VGG-A (`configs/vgg.py:A`)"),
    ("vgg_d", "VGG-D (`configs/vgg.py:D`)"),
)


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def main(folder: str) -> None:
    print(
        "| model, mode | batch | cnn_jax images/s | PyTorch images/s | ratio, median of rounds "
        "| per round | CPU time ratio | compile cold / warm s | load |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |")
    flags = set()
    for name, label in ROWS:
        path = pathlib.Path(folder) / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        flags.add(" ".join(r.get("cpu_flags", [])))
        per_round = ", ".join(f"{x:.2f}" for x in r["ratio_per_round"])
        warm = r["compile_s_warm"]
        compile_s = f"{r['compile_s']:.1f} / " + (f"{warm:.1f}" if warm is not None else "-")
        load = "-".join(f"{x:.1f}" for x in r["load_average"])
        print(
            f"| {label} | {r['batch_size']} | {_rate(r['images_per_sec'])} "
            f"| {_rate(r['torch_images_per_sec'])} | **{r['ratio_median_of_rounds']:.2f}** "
            f"| {per_round} | {r['cpu_ratio']:.2f} | {compile_s} | {load} |"
        )
    print(f"\ncpu_flags: {'; '.join(sorted(flags))}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/cpu_table")
