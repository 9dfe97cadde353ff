"""Every Colab notebook runs top to bottom on CPU."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from tests.models.hf_checkpoints import make_checkpoint

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[2] / "colab").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "hf", "qwen3", tied=False)
    monkeypatch.setenv("MOBAJAX_HF_CHECKPOINT", str(tmp_path / "hf"))
    monkeypatch.setenv("MOBAJAX_CACHE", os.environ.get("MOBAJAX_CACHE", str(tmp_path / "cache")))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "Paris" in outputs
    assert "converted Qwen3ForCausalLM" in outputs


def test_notebooks_exist():
    assert any(p.name == "01_quickstart.ipynb" for p in NOTEBOOKS)
