"""What a run records about itself beside its rows: the parameters it was given, the versions of
what computed it, and the machine. The command line and the notebooks write the same fields."""

from __future__ import annotations

import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from .. import __version__

PACKAGES = ("torch", "transformers", "nnsight", "gguf", "numpy", "pandas")


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def peak_memory() -> list[float] | None:
    """Each GPU's peak allocated memory so far in this process, in GiB (a model sharded over several
    cards peaks on each); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return [round(torch.cuda.max_memory_allocated(i) / 2**30, 3) for i in range(torch.cuda.device_count())]


def meta(params: dict, **extra) -> dict:
    """``params`` (a notebook's parameters or the command's options) with versions, machine, GPU
    and time; ``extra`` adds what the run found out (number of facts, tokens)."""
    opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in params.items() if not callable(v)}
    return {"qdiag": __version__, **{p: _version(p) for p in PACKAGES},
            "python": platform.python_version(), "machine": platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "peak_gib_per_gpu": peak_memory(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": opts, **extra}
