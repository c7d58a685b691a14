"""The package's floors point one way: building blocks never import analyses, analyses never
import each other, and no module imports itself back through another (no cycle)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qdiag"

# What each floor may import from the package (besides itself and the top-level ``qdiag``).
ALLOWED = {
    "core": set(),
    "quant": {"core"},
    "measure": {"core", "quant"},
    "report": {"core", "quant"},
    "analyses": {"core", "quant", "measure", "report"},
    "diagnosis": {"core", "quant", "measure", "report"},
    "book": {"core", "report"},
    # the analyses' commands: below the CLI and the sweep, which both run them
    "commands": {"core", "quant", "measure", "report", "analyses", "diagnosis"},
}


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(qdiag module imported, at module level?)`` for every import in a file."""
    tree = ast.parse(path.read_text())
    here = path.relative_to(PACKAGE.parent).with_suffix("").parts
    top_level = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - node.level])
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" for a in node.names]
            for m in [mod, *names]:
                if m.startswith("qdiag"):
                    out.append((m, id(node) in top_level))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top_level) for a in node.names if a.name.startswith("qdiag")]
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def floor(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_floor_imports_only_the_floors_below(path):
    mine = floor(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
    if mine not in ALLOWED:
        return  # cli, testing and the package root sit on top
    for mod, _ in imports(path):
        theirs = floor(mod)
        if theirs is None or theirs == mine or theirs not in ALLOWED:
            continue
        assert theirs in ALLOWED[mine], f"{path.name} ({mine}) imports {mod} ({theirs})"


@pytest.mark.parametrize("path", sorted((PACKAGE / "analyses").glob("*.py")), ids=lambda p: p.name)
def test_analyses_do_not_import_each_other(path):
    for mod, _ in imports(path):
        if mod.startswith("qdiag.analyses."):
            assert mod.split(".")[2] == path.stem or mod.split(".")[2] == "__init__", f"{path.name} imports {mod}"


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module level", "imports inside functions too"])
def test_no_import_cycle(top_level_only):
    # a cycle through an import inside a function works at run time but still ties two modules together
    names = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in MODULES}
    graph = {m: {i for i, top in imports(p) if (top or not top_level_only) and i in names and i != m}
             for m, p in names.items()}
    for m in graph:  # package __init__ re-exports point down; edges into a package go to its __init__ only
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".")}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(d):] + [d])}")
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_importing_qdiag_loads_nothing_heavy():
    import subprocess
    import sys

    heavy = "('torch', 'nnsight', 'transformers', 'pandas')"
    code = f"import qdiag, sys; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
