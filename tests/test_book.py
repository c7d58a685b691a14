"""The book build: a chapter whose inputs have not changed is reused, with its results; any
change to the notebook, its parameters, qdiag's source or the data executes it again."""

import importlib
import json
from pathlib import Path

import nbformat
import pytest

build = importlib.import_module("qdiag.book.build")  # the module (qdiag.book.build is also its function)


def notebook(path: Path, out_dir: str = "results/demo") -> Path:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(f"x = 1\nout_dir = {out_dir!r}")
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell("print(x)")]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / "qdiag").mkdir(parents=True)
    (root / "qdiag" / "a.py").write_text("A = 1\n")
    (root / "book").mkdir()
    nb = notebook(root / "demo.ipynb")
    runs = []

    def fake_execute(notebook, output, parameters, cwd):
        runs.append(parameters)
        output.write_text(json.dumps({"ran": len(runs), "parameters": parameters}))
        results = cwd / build._results_dir(notebook, parameters, cwd)
        results.mkdir(parents=True, exist_ok=True)
        (results / "r.json").write_text(str(len(runs)))
        return 12.5

    monkeypatch.setattr(build, "execute", fake_execute)
    monkeypatch.delenv("QDIAG_DATA", raising=False)
    return root, nb, runs


def test_an_unchanged_chapter_is_reused_with_its_results(project):
    root, nb, runs = project
    cache, out, cwd = root / "cache", root / "book" / "out.ipynb", root / "book"
    key = build.execution_key(nb, {"x": 2}, root)
    assert build.execute_cached(nb, out, {"x": 2}, cwd, cache, key) == (12.5, False)
    (cwd / "results" / "demo" / "r.json").unlink()  # results deleted (make clean): restored
    out.unlink()
    assert build.execute_cached(nb, out, {"x": 2}, cwd, cache, key) == (12.5, True)
    assert len(runs) == 1
    assert json.loads(out.read_text())["ran"] == 1
    assert (cwd / "results" / "demo" / "r.json").read_text() == "1"
    assert build.execute_cached(nb, out, {"x": 2}, cwd, None, key) == (12.5, False)  # --fresh
    assert len(runs) == 2


def test_any_input_change_is_a_new_key(project, monkeypatch, tmp_path):
    root, nb, _ = project
    key = build.execution_key(nb, {"x": 2}, root)
    assert build.execution_key(nb, {"x": 2}, root) == key
    assert build.execution_key(nb, {"x": 3}, root) != key
    (root / "qdiag" / "a.py").write_text("A = 2\n")
    assert build.execution_key(nb, {"x": 2}, root) != key
    key = build.execution_key(nb, {"x": 2}, root)
    data = tmp_path / "data"
    data.mkdir()
    (data / "f.txt").write_text("a")
    monkeypatch.setenv("QDIAG_DATA", str(data))
    with_data = build.execution_key(nb, {"x": 2}, root)
    assert with_data != key
    (data / "f.txt").write_text("ab")
    assert build.execution_key(nb, {"x": 2}, root) != with_data
    notebook(nb, out_dir="results/other")
    assert build.execution_key(nb, {"x": 2}, root) != key


def test_a_failed_execution_leaves_nothing_to_reuse(project, monkeypatch):
    root, nb, _ = project
    cache, out, cwd = root / "cache", root / "book" / "out.ipynb", root / "book"

    def broken(*a, **k):
        raise RuntimeError("cell failed")

    monkeypatch.setattr(build, "execute", broken)
    with pytest.raises(RuntimeError):
        build.execute_cached(nb, out, {}, cwd, cache, "k")
    assert not (cache / "k").exists()
