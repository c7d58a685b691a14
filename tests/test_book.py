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

    def fake_execute(notebook, output, parameters, cwd, tier=None):
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


ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def test_a_device_map_reaches_every_chapter_and_a_bad_one_is_refused():
    params = build.tier_parameters(ROOT / "book", "book")
    mapped = build.with_device_map(params, NOTEBOOKS, "auto")
    assert set(mapped) == {nb.stem for nb in NOTEBOOKS}
    for nb in NOTEBOOKS:
        assert mapped[nb.stem] == {**params.get(nb.stem, {}), "device_map": "auto"}
        assert "device_map" in _parameters(nbformat.read(nb, as_version=4))
    assert build.with_device_map(params, NOTEBOOKS, None) is params
    with pytest.raises(ValueError, match="device_map must be one of"):
        build.with_device_map(params, NOTEBOOKS, "everywhere")
    with pytest.raises(SystemExit):  # the command line refuses it before anything runs
        build.main(["--device-map", "everywhere"])


def test_render_only_refuses_a_book_whose_chapters_were_not_executed(tmp_path, capsys):
    (tmp_path / "notebooks").mkdir()
    notebook(tmp_path / "notebooks" / "01_demo.ipynb")
    (tmp_path / "book" / build.CHAPTERS).mkdir(parents=True)
    with pytest.raises(SystemExit):
        build.main(["--root", str(tmp_path), "--render-only"])
    assert "lacks 01_demo.ipynb" in capsys.readouterr().err


def _parameters(nb) -> dict:
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    scope: dict = {}
    exec(cell.source, scope)
    return {k: v for k, v in scope.items() if not k.startswith("__")}


@pytest.mark.parametrize("tier", ["book", "classroom"])
def test_each_tier_sets_only_parameters_the_notebooks_have(tier):
    params = build.tier_parameters(ROOT / "book", tier)
    names = {p.stem: set(_parameters(nbformat.read(p, as_version=4))) for p in NOTEBOOKS}
    assert set(params) == set(names), "a tier gives parameters for every chapter, and only for chapters"
    for chapter, given in params.items():
        assert set(given) <= names[chapter], f"{tier}: {chapter} has no parameter {set(given) - names[chapter]}"


def test_an_unknown_tier_is_refused():
    with pytest.raises(ValueError, match="classroom"):
        build.tier_parameters(ROOT / "book", "lecture")
    assert build.tier_parameters(ROOT / "book", "smoke") == {}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_chapter_carries_its_course_material(path):
    nb = nbformat.read(path, as_version=4)
    md = [c.source for c in nb.cells if c.cell_type == "markdown"]
    assert md[0].startswith("# ") and "After this chapter you will be able to" in md[1], "learning goals open it"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "find_spec(\"qdiag\")" in first_code.source, "the first code cell installs qdiag where it is missing"
    exec(first_code.source, {})  # here qdiag is installed: it must do nothing (no pip run, no error)
    exercises = next(s for s in md if s.startswith("## Exercises"))
    questions = exercises.split("**Exercise ")[1:]
    assert 3 <= len(questions) <= 5
    names = set(_parameters(nb))
    for q in questions:
        question, _, solution = q.partition("```{admonition} Solution\n:class: dropdown")
        assert solution, "every exercise has a hidden solution"
        assert any(f"`{n}" in question for n in names), f"exercise names no parameter: {question[:80]}"
        assert "this book's" in solution.lower() or "{glue:text}" in solution, "the solution cites the book's own run"
    assert "{download}" in md[-1], "the chapter links its results files"


def test_an_executed_chapter_records_where_it_ran_and_the_status_page_reads_it(tmp_path):
    pytest.importorskip("papermill")
    chapters = tmp_path / "book" / build.CHAPTERS
    nb = notebook(tmp_path / "01_demo.ipynb")
    source = nbformat.read(nb, as_version=4)
    source.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nbformat.write(source, nb)
    seconds = build.execute(nb, chapters / "01_demo.ipynb", {"x": 7}, tmp_path, tier="classroom")
    run = nbformat.read(chapters / "01_demo.ipynb", as_version=4).metadata["qdiag"]
    assert run["seconds"] == pytest.approx(seconds, abs=0.1)
    assert run["machine"] == build.machine() and run["tier"] == "classroom"
    assert run["packages"]["papermill"] == build._version("papermill")
    page = build.status_page(chapters, reused={"01_demo"})
    assert f"Machine 1: {build.machine()}." in page
    assert "the classroom tier" in page
    row = next(line for line in page.splitlines() if line.startswith("| 01_demo |"))
    assert f"| {seconds:.0f} | yes |" in row and "`x=7`" in row and "| classroom |" in row


def test_tqdms_warning_of_a_kernel_without_widgets_stays_out_of_the_page(tmp_path):
    pytest.importorskip("papermill")
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    nb.cells = [nbformat.v4.new_code_cell("import warnings\nwarnings.warn('IProgress not found. Please update')\n"
                                          "warnings.warn('a warning the reader should see')")]
    nbformat.write(nb, tmp_path / "w.ipynb")
    build.execute(tmp_path / "w.ipynb", tmp_path / "out" / "w.ipynb", {}, tmp_path)
    cell = nbformat.read(tmp_path / "out" / "w.ipynb", as_version=4).cells[0]
    shown = "".join(o.get("text", "") for o in cell.outputs)
    assert "a warning the reader should see" in shown
    assert "IProgress" not in shown


@pytest.mark.parametrize("gpu, tier, device_map", [(True, "book", "auto"), (False, "classroom", None)],
                         ids=["gpu", "cpu"])
def test_the_default_tier_is_the_one_the_machine_can_build(gpu, tier, device_map):
    chosen, dm, why = build.choose_tier("auto", None, gpu=gpu)
    assert (chosen, dm) == (tier, device_map)
    assert "--tier" in why  # how to force the other
    assert build.choose_tier("book", None, gpu=False)[:2] == ("book", None)  # asked for: kept
    assert build.choose_tier("classroom", "auto", gpu=True)[:2] == ("classroom", "auto")
