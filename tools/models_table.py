"""The README's model table: parameters and MACs of every model with a config file, beside
the paper's result, in Markdown (from cnn_jax.summary's per-layer counts).

    python tools/models_table.py            # print the table
    python tools/models_table.py --write    # replace the table in README.md

Run from a checkout of the repository: it reads configs/ and README.md next to this folder.
tests/test_summary.py checks that README.md holds the table this prints.
"""

import importlib.util
import os
import sys

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
# The README's table sits between these two lines (the first one's text continues).
BEGIN, END = "<!-- models-table:", "<!-- /models-table -->"

# (row label, config file relative to the repository, its argument, the paper's result).
PAPER_RESULTS: tuple[tuple[str, str, str | None, str], ...] = (
    ("LeNet-5", "configs/lenet.py", None, "0.95% test error, MNIST"),
    ("AlexNet", "configs/alexnet.py", None, "37.5 / 17.0, ILSVRC-2010 test (Table 1)"),
    ("VGG A", "configs/vgg.py", "A", "29.6 / 10.4, single scale (Table 3)"),
    ("VGG A-LRN", "configs/vgg.py", "A-LRN", "29.7 / 10.5, single scale (Table 3)"),
    ("VGG B", "configs/vgg.py", "B", "28.7 / 9.9, single scale (Table 3)"),
    ("VGG C", "configs/vgg.py", "C", "27.3 / 8.8, single scale, S in [256, 512] (Table 3)"),
    ("VGG D", "configs/vgg.py", "D", "24.8 / 7.5, multi-scale, S in [256, 512] (Table 4)"),
    ("VGG E", "configs/vgg.py", "E", "24.8 / 7.5, multi-scale, S in [256, 512] (Table 4)"),
)


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """get_config(arg) of a config file, as `--config=path:arg` would give it."""
    spec = importlib.util.spec_from_file_location("_models_table_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def models_table() -> str:
    """Markdown table of every model with a config file: parameters, MACs, paper result."""
    from cnn_jax import summary

    lines = [
        "| model | config | parameters | MACs per image | paper error, top-1 / top-5 % |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for label, path, arg, paper in PAPER_RESULTS:
        s = summary.summarize(load_config(os.path.join(REPO, path), arg))
        where = f"`{path}{':' + arg if arg else ''}`"
        lines.append(f"| {label} | {where} | {s.total_params:,} | {s.total_macs:,} | {paper} |")
    return "\n".join(lines)


def readme_table(readme: str) -> tuple[int, int]:
    """(start, end) of the table's text in the README's text: the lines between the markers."""
    start = readme.index("\n", readme.index(BEGIN)) + 1
    return start, readme.index(END, start)


def main(argv: list[str]) -> None:
    if argv not in ([], ["--write"]):
        sys.exit(f"usage: python {os.path.relpath(__file__)} [--write]")
    table = models_table()
    if not argv:
        print(table)
        return
    with open(README) as f:
        readme = f.read()
    start, end = readme_table(readme)
    with open(README, "w") as f:
        f.write(readme[:start] + table + "\n" + readme[end:])
    print(f"wrote the table into {README}")


if __name__ == "__main__":
    main(sys.argv[1:])
