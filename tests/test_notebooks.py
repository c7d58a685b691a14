"""Each notebook runs with its own default parameters (a small run) on the default model."""

from pathlib import Path

import pytest

from qdiag.book import execute

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9]*.ipynb"))


@pytest.fixture(scope="module")
def quant_cache(tmp_path_factory):
    """GPTQ results shared by the notebooks, as in the book build (same model, same calibration)."""
    return tmp_path_factory.mktemp("quantized")


@pytest.fixture(scope="module")
def run_store(tmp_path_factory):
    """The run store shared by the notebooks (the screening runs once), as in the book build."""
    return tmp_path_factory.mktemp("store")


@pytest.mark.notebook
@pytest.mark.integration
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_defaults(notebook, tmp_path, data_dir, monkeypatch, quant_cache, run_store):
    monkeypatch.setenv("QDIAG_DATA", str(data_dir))
    monkeypatch.setenv("QDIAG_QUANT_CACHE", str(quant_cache))
    monkeypatch.setenv("QDIAG_STORE", str(run_store))
    out = tmp_path / notebook.name
    execute(notebook, out, {}, cwd=tmp_path)
    assert out.exists()
    assert any((tmp_path / "results").rglob("*.json"))
