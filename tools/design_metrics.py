"""How far the config reaches into the package, and how long its functions are.

    python tools/design_metrics.py [PACKAGE_DIR]      # default: cnn_jax

Counted from the source (ast), so two trees can be compared:

- functions taking the whole config: a def with a parameter named `config`, `cfg` or `c`, or
  annotated as a ConfigDict. A function handed one group as its own argument does not count.
- modules reading config fields: a module with an attribute read `config.X` (or `cfg.X`,
  `c.X`) that is not a ConfigDict method, or a subscript `config[...]`.
- the longest functions, in lines from `def` to their last line.
"""

import ast
import pathlib
import sys

CONFIG_NAMES = {"config", "cfg", "c"}
CONFIGDICT_METHODS = {
    "copy_and_resolve_references", "get", "items", "keys", "lock", "to_dict", "to_json",
    "unlock", "update", "values",
}  # fmt: skip


def measure(root: pathlib.Path) -> dict:
    whole_config, readers, lengths = [], set(), []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                annotations = [ast.unparse(a.annotation) for a in args if a.annotation]
                if any(a.arg in CONFIG_NAMES for a in args) or any(
                    "ConfigDict" in a for a in annotations
                ):
                    whole_config.append(f"{path}:{node.name}")
                lengths.append((node.end_lineno - node.lineno + 1, f"{path}:{node.name}"))
            reads = (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in CONFIG_NAMES
                and node.attr not in CONFIGDICT_METHODS
            ) or (
                isinstance(node, ast.Subscript)
                and isinstance(node.value, ast.Name)
                and node.value.id in CONFIG_NAMES
            )
            if reads:
                readers.add(str(path))
    return {
        "modules": len(list(root.rglob("*.py"))),
        "functions": len(lengths),
        "whole_config": whole_config,
        "readers": sorted(readers),
        "longest": sorted(lengths, reverse=True)[:5],
    }


def main() -> None:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "cnn_jax")
    m = measure(root)
    print(f"{m['modules']} modules, {m['functions']} functions")
    print(f"functions taking the whole config: {len(m['whole_config'])}")
    print("".join(f"    {f}\n" for f in m["whole_config"]), end="")
    print(f"modules reading config fields: {len(m['readers'])}")
    print("".join(f"    {r}\n" for r in m["readers"]), end="")
    print("longest functions:", ", ".join(f"{name} ({n} lines)" for n, name in m["longest"]))


if __name__ == "__main__":
    main()
