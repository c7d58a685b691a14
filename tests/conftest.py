"""Fixtures: a fresh tiny model per test, the tokenizer, and the shared datasets (tests that use
them are marked ``data``, so ``-m "not data"`` runs without them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qdiag.testing import tiny_model, tiny_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session", autouse=True)
def _no_store():
    """Tests compute everything and never write the user's store; tests of the store, and the
    notebooks (which share one as the book build does), point QDIAG_STORE at a folder of their own."""
    before = os.environ.get("QDIAG_STORE")
    os.environ["QDIAG_STORE"] = "off"
    yield
    if before is None:
        os.environ.pop("QDIAG_STORE", None)
    else:
        os.environ["QDIAG_STORE"] = before


@pytest.fixture
def model():
    return tiny_model("llama")


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared datasets, from QDIAG_DATA or ../shared/datasets beside the checkout."""
    root = Path(os.environ.get("QDIAG_DATA", SHARED))
    if not (root / "pararel").is_dir():
        pytest.fail(f"datasets not found at {root}: set QDIAG_DATA to the shared/datasets folder")
    return root


def pytest_collection_modifyitems(items):
    """Tests that read the shared datasets are marked ``data``: ``-m "not data"`` runs without them."""
    for item in items:
        if "data_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)
