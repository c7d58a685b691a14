"""Fixtures: a fresh tiny model per test, the tokenizer, and the shared datasets (tests that use
them are marked ``data``, so ``-m "not data"`` runs without them)."""

from __future__ import annotations

import importlib
import os
import shutil
import time
from pathlib import Path

import pytest

from qdiag.testing import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


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
    """The shared datasets, from QDIAG_DATA, ../shared/datasets beside the checkout, or qdiag's download
    cache (``make data`` fills it where there is a network)."""
    from qdiag.core.data import cache_dir

    given = os.environ.get("QDIAG_DATA")
    candidates = [Path(given)] if given else [SHARED, cache_dir()]
    root = next((c for c in candidates if (c / "pararel" / "patterns").is_dir()), None)
    if root is None:
        pytest.fail(f"datasets not found at {' or '.join(map(str, candidates))}: set QDIAG_DATA to the "
                    "shared/datasets folder, or run `make data` to download them")
    return root


class SmokeBook:
    """The book at the notebooks' own default parameters, in a folder of its own: each notebook executed
    once, when a test first asks for it, and the HTML rendered from them when a test asks for that, so
    the notebook tests and the browser test share one execution. A chapter that failed fails again."""

    def __init__(self, folder: Path, data: Path):
        build = importlib.import_module("qdiag.book.build")  # the module; qdiag.book.build is its function

        self.build, self.book, self.runs, self.failed = build, folder / "book", {}, {}
        shutil.copytree(ROOT / "book", self.book, ignore=shutil.ignore_patterns(
            "_build", "_cache", build.CHAPTERS, "results", "status.md"))
        self.env = {"QDIAG_DATA": str(data), "QDIAG_QUANT_CACHE": str(folder / "quantized"),
                    "QDIAG_STORE": str(folder / "store")}  # GPTQ and the screening shared, as in the book build

    def chapter(self, notebook: Path) -> Path:
        """The executed notebook; its results are under ``results`` beside it."""
        if notebook.stem in self.failed:
            raise RuntimeError(f"{notebook.stem} failed earlier in this session") from self.failed[notebook.stem]
        out = self.book / self.build.CHAPTERS / notebook.name
        if notebook.stem not in self.runs:
            t0 = time.perf_counter()
            try:
                with self.build._environment(**self.env):
                    self.build.execute(notebook, out, {}, cwd=self.book, tier="smoke")
            except Exception as e:
                self.failed[notebook.stem] = e
                raise
            self.runs[notebook.stem] = time.perf_counter() - t0
        return out

    def results(self, notebook: Path) -> Path:
        """The folder the chapter wrote its results to."""
        return self.build._results_dir(notebook, {}, self.book)

    def html(self) -> Path:
        """Every chapter executed, the status page written, the book rendered (strict); its HTML folder."""
        html = self.book / "_build" / "html"
        if not (html / "index.html").exists():
            for nb in NOTEBOOKS:
                self.chapter(nb)
            (self.book / "status.md").write_text(self.build.status_page(self.book / self.build.CHAPTERS))
            if self.build.render(self.book) != 0:
                raise RuntimeError("jupyter-book build failed (warnings are errors): see the output above")
        return html


NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory, data_dir) -> SmokeBook:
    return SmokeBook(tmp_path_factory.mktemp("smoke"), data_dir)


def pytest_collection_modifyitems(items):
    """Tests that read the shared datasets are marked ``data``: ``-m "not data"`` runs without them."""
    for item in items:
        if "data_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)
