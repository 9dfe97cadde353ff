"""Every Colab notebook runs top to bottom on CPU."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from tests.models.hf_checkpoints import make_checkpoint

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[2] / "colab").glob("*.ipynb"))

# notebook -> strings its outputs must contain (a notebook not listed here fails the test)
EXPECTED = {
    "01_quickstart.ipynb": ("Paris", "converted Qwen3ForCausalLM"),
    "02_moe.ipynb": (
        "converted Qwen2MoeForCausalLM",
        "greedy tokens equal transformers: True",
        "mesh: {'data': 1, 'expert': 4, 'tensor': 2}",
        "expert-parallel logits equal one device: True",
        "expert-parallel greedy tokens: True",
    ),
    "03_moba.ipynb": (
        "reference equals dense mask: True",
        "perplexity MoBA, last 3 layers full",
        "MoBA prefill ->",
        "loss went down: True",
    ),
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "hf", "qwen3", tied=False)
    monkeypatch.setenv("MOBAJAX_HF_CHECKPOINT", str(tmp_path / "hf"))
    monkeypatch.setenv("MOBAJAX_CACHE", os.environ.get("MOBAJAX_CACHE", str(tmp_path / "cache")))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert path.name in EXPECTED, f"add the expected outputs of {path.name} to EXPECTED"
    for expected in EXPECTED[path.name]:
        assert expected in outputs, f"{path.name}: {expected!r} not in the outputs:\n{outputs[-3000:]}"


def test_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= set(EXPECTED)
