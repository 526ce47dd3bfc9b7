"""The notebooks in colabs/ run end to end, headless, in the small setting they pick on a CPU."""
import nbclient
import nbformat
import pytest

import train_cli

NOTEBOOKS = sorted((train_cli.ROOT / "colabs").glob("*.ipynb"))
PICTURES = {"quickstart": 3}  # charts the notebook must show (loss curves, answers, attention)
# Set after the cell tagged "parameters" (papermill's convention): every cell runs as a user's
# would, on fewer steps than the demo's (its charts are not judged here, its code is). Each
# evaluates at a multiple of its log_every: quickstart at STEPS // 2 (25), PaliGemma at STEPS (100).
PARAMETERS = {"quickstart": "STEPS = 50\nSCENES = 1000", "finetune_paligemma": "STEPS = 100"}


def test_every_notebook_is_tested():
  assert {p.stem for p in NOTEBOOKS} == {"quickstart", "bring_your_weights", "scale",
                                         "finetune_paligemma"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
  notebook = nbformat.read(path, as_version=4)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert not any(cell.outputs for cell in code), f"{path.name} is committed with outputs"
  assert "colab-badge.svg" in notebook.cells[0].source
  if path.stem in PARAMETERS:
    at = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get(
        "tags", []))
    notebook.cells.insert(at + 1, nbformat.v4.new_code_cell(
        PARAMETERS[path.stem], metadata={"tags": ["injected-parameters"]}))
  # The kernel is a fresh process: this checkout's mmjax, one CPU device unless the notebook
  # asks for more, and its workdirs (under tempfile.gettempdir()) in this test's directory.
  # Notebooks train for a hundred steps or more: their code is optimised (train_cli.FAST_COMPILE).
  monkeypatch.setenv("PYTHONPATH", train_cli.env(1)["PYTHONPATH"])
  monkeypatch.setenv("XLA_FLAGS", train_cli.xla_flags(devices=None, fast_compile=False))
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parent)}}).execute()
  pictures = sum("image/png" in output.get("data", {}) for cell in code
                 for output in cell.outputs)
  assert pictures >= PICTURES.get(path.stem, 0)
