"""`python -m cnn_jax.summary`: the seed deck's LeNet-5 arithmetic, AlexNet's and VGG's totals,
and one-line errors. Shape inference only, so every model is cheap here."""

import importlib.util
import os

import pytest

from cnn_jax import summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _models_table_tool():
    """tools/models_table.py, a script of the repository (not part of the package)."""
    path = os.path.join(REPO, "tools", "models_table.py")
    spec = importlib.util.spec_from_file_location("models_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


models_table = _models_table_tool()


def _config(name, arg=None):
    return models_table.load_config(os.path.join(REPO, "configs", name), arg)


def test_lenet5_rows_are_the_seed_decks_numbers():
    s = summary.summarize(_config("lenet.py"))
    rows = {r.layer: r for r in s.rows}
    assert [r.layer for r in s.rows] == ["C1", "S2", "C3", "S4", "C5", "F6", "output"]
    assert [r.params for r in s.rows] == [156, 12, 1_516, 32, 48_120, 10_164, 0]
    assert rows["C1"].output_shape == (28, 28, 6) and rows["C3"].output_shape == (10, 10, 16)
    assert rows["S4"].output_shape == (5, 5, 16) and rows["F6"].output_shape == (84,)
    # MACs: C3 has 60 connected 5x5 kernels at 10x10 positions; S2 one multiply per output;
    # the RBF output one per (class, feature) pair.
    assert (rows["C1"].macs, rows["S2"].macs, rows["C3"].macs) == (117_600, 1_176, 150_000)
    assert (rows["C5"].macs, rows["F6"].macs, rows["output"].macs) == (48_000, 10_080, 840)
    assert s.total_params == 60_000


def test_cli_prints_the_table_and_totals_with_thousands_separators(capsys):
    summary.main(["summary", f"--config={os.path.join(REPO, 'configs', 'lenet.py')}"])
    out = capsys.readouterr().out
    assert "C3      10x10x16       1,516  150,000" in out
    assert out.rstrip().endswith("Total parameters: 60,000\nTotal MACs: 328,096")


def test_alexnet_total():
    assert summary.summarize(_config("alexnet.py")).total_params == 60_965_224


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config=configs/vgg.py:F"], "unknown VGG configuration 'F'"),
        (["--config=configs/vgg.py", "--config.input.image_size=16"], "too small for vgg"),
        (["--config=configs/lenet.py", "--config.model.name=resnet"], "unknown model 'resnet'"),
        ([], "--config=configs/X.py[:arg] is required"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        summary.main(["summary", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_readme_model_table_is_the_generated_one():
    with open(models_table.README) as f:
        readme = f.read()
    start, end = models_table.readme_table(readme)
    assert readme[start:end].strip() == models_table.models_table(), (
        "regenerate: python tools/models_table.py --write"
    )
