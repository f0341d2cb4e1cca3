"""The notebooks in notebooks/ run top to bottom in a fresh Jupyter kernel at CPU size, and are
committed without outputs (so their diffs stay readable).

Each notebook has a cell tagged `parameters` (papermill's convention) whose defaults are Colab-sized;
the test inserts a cell after it with CPU-sized values, as papermill does, and executes the
notebook with `nbclient` in a new `python3` kernel (this interpreter) on one CPU device.
"""

import json
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs nbformat (test extra)")
nbclient = pytest.importorskip("nbclient", reason="needs nbclient and ipykernel (test extra)")

try:  # tests/ is a package (tests/__init__.py) or a plain directory on sys.path
    from tests.test_cli import subprocess_env
except ImportError:
    from test_cli import subprocess_env

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# CPU-sized parameters of each notebook (RUN_DIR is added per test).
CPU_PARAMETERS = {
    "quickstart.ipynb": {"CONFIG": "tests/configs/small_pipeline.py", "MAX_NEW_TOKENS": 8},
}
TIMEOUT_S = 900


def test_every_notebook_is_clean_and_parameterised():
    assert [p.name for p in NOTEBOOKS] == sorted(CPU_PARAMETERS)
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} cell {i} has outputs"
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: one cell tagged 'parameters'"
        defined = {line.split("=")[0].strip() for line in tagged[0].source.splitlines() if "=" in line}
        assert set(CPU_PARAMETERS[path.name]) <= defined, f"{path.name}: CPU parameters not in its parameters cell"
        assert "colab.research.google.com" in nb.cells[0].source, f"{path.name}: no Open in Colab badge"


def execute(path: pathlib.Path, parameters: dict, monkeypatch, cache: pathlib.Path):
    nb = nbformat.read(path, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()),
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, injected)
    env = subprocess_env(cache)
    for key in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    return nb


def outputs(cell) -> tuple[str, list[str]]:
    """(stdout text, MIME types of the rich outputs) of an executed cell."""
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    rich = [mime for o in cell.outputs if o.output_type == "display_data" for mime in o.data]
    return text, rich


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    nb = execute(REPO / "notebooks" / "quickstart.ipynb", {**CPU_PARAMETERS["quickstart.ipynb"],
                                                           "RUN_DIR": str(run_dir)}, monkeypatch, tmp_path / "cache")
    text = {i: outputs(c) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    printed = "".join(t for t, _ in text.values())
    assert "backend: cpu | devices: 1" in printed
    assert "pipeline finished=True" in printed
    for stage in ("sft", "ppo", "dpo"):
        assert f"--- {stage} (" in printed
    images = sum(rich.count("image/png") for _, rich in text.values())
    assert images == len(list((run_dir / "plots").glob("*.png"))) >= 5
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["policies"]) == {"sft", "ppo", "dpo"}
    assert any("text/markdown" in rich for _, rich in text.values())
