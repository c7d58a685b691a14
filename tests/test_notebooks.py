"""Each notebook runs with its own default parameters (a small run) on the default model; the executed
notebooks are the smoke book the browser test renders."""

import pytest
from conftest import NOTEBOOKS


@pytest.mark.notebook
@pytest.mark.integration
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_defaults(notebook, smoke_book):
    assert smoke_book.chapter(notebook).exists()
    assert any(smoke_book.results(notebook).rglob("*.json"))
