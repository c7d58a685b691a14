"""Is a checkpoint's difference from its base quantization at all? Per tensor, the checkpoint's error
against the base is set beside the error the tensor's own format gives when it rounds the base to
nearest (RTN in that type): ``ratio = ||W_ckpt - W|| / ||RTN_type(W) - W||``.

A quantizer moves each weight to a point of its format's grid; round to nearest is off by a
uniform share of one grid step, whose RMS is ``step / sqrt(12)``; the quantizers people use (GPTQ,
AWQ, importance-weighted k-quants) trade that error between weights but stay near it. A ratio
above ``sqrt(12)`` (``LIMIT``) means the tensor is, on average, more than one whole grid step from
the base: no quantizer of this base on this grid does that, so the difference is **not
quantization damage** (a wrong row permutation, a norm stored with +1 folded in, a tensor from
another model or fine-tune). A tensor in a float type has no grid: any difference beyond the
type's own rounding is flagged. A fine-tune whose change is smaller than one grid step cannot be
told from quantization this way.

The check reads a spread of rows (``rows``, evenly spaced) of each tensor: every GGUF type and the
packed layouts quantize rows independently, and a permutation moves sampled rows too. RTN is
llama.cpp's own quantizer where its tools are built (``llama_cpp``), the gguf package's where it
has one (legacy types, ``TQ*``, ``MXFP4``), and otherwise qdiag's min-max rounding at the type's
width and sub-block, marked ``approximate`` (k-quants and i-quants without llama.cpp).
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch import nn

from ..core.arch import resolve, unwrap, weight_matrix
from . import gguf, llama_cpp
from .quantize import QuantSpec, rtn

LIMIT = math.sqrt(12)
ROWS = 128

# the width, sub-block and symmetry of a type without a quantizer here: its min-max stand-in
_STAND_IN = {"Q2_K": (2, 16, False), "Q3_K": (3, 16, True), "Q4_K": (4, 32, False), "Q5_K": (5, 32, False),
             "Q6_K": (6, 16, True), "IQ2_XXS": (2, 32, True), "IQ2_XS": (2, 32, True), "IQ2_S": (2, 32, True),
             "IQ3_XXS": (3, 32, True), "IQ3_S": (3, 32, True), "IQ1_S": (2, 32, True), "IQ1_M": (2, 32, True),
             "IQ4_NL": (4, 32, True), "IQ4_XS": (4, 32, True), "NVFP4": (4, 16, True)}


def check(model: nn.Module, ckpt, rows: int = ROWS, tools=None) -> pd.DataFrame:
    """One row per tensor of the checkpoint: ``parameter``, ``file_name``, ``type``, ``error`` (the
    checkpoint's, relative to the base tensor's norm), ``format_error`` (RTN's in that type, same
    scale), ``ratio``, ``approximate`` and ``verdict``: ``as the base``, ``quantization``,
    ``quantization, input scales folded in`` (a matrix that is the base times per-input-channel
    scales, then rounded: AWQ's reparametrisation) or ``not quantization damage`` (ratio above
    ``LIMIT``). ``tools``: llama.cpp's bin folder (default: found
    from ``$QDIAG_LLAMA_CPP``), or False for the gguf package's and qdiag's rounding alone."""
    tools = llama_cpp.find() if tools is None else (tools or None)
    hf = unwrap(model)
    params = dict(hf.named_parameters(remove_duplicate=False))
    modules = dict(hf.named_modules())
    linear = set(resolve(model).linear_names())
    out = []
    for pname, kind in ckpt.tensor_types.items():
        owner, _, leaf = pname.rpartition(".")
        base = params[pname].detach()
        is_matrix = owner in ckpt.weights.tensors and leaf == "weight"
        if (owner not in linear or leaf != "weight") and pname not in ckpt.changed:
            out.append({**_row(pname, ckpt, kind, 0.0, 0.0, False), "matrix": False})
            continue
        w = weight_matrix(modules[owner]).detach() if is_matrix else base
        mat = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
        idx = _spread(mat.shape[0], rows)
        ref = mat[idx].float()
        if is_matrix:
            q = ckpt.weights.tensors[owner]
            mine = _rows(q, idx).float().to(ref.device)
        else:
            mine = ckpt.weights.extras[pname].reshape(mat.shape)[idx].float().to(ref.device)
        nominal = getattr(ckpt, "nominal", None)
        fmt, approx = _round(ref, kind, tools, nominal)
        norm = float(ref.norm()) or 1.0
        row = _row(pname, ckpt, kind, float((mine - ref).norm()) / norm, float((fmt - ref).norm()) / norm, approx)
        if row["verdict"] == "not quantization damage" and is_matrix and ref.shape[0] > 1:
            # per-input-channel scales folded into the matrix (AWQ, SmoothQuant; the norms carry 1/s):
            # the same check on the base with the best such scales
            s = (mine * ref).sum(0) / (ref * ref).sum(0).clamp_min(1e-30)
            scaled = ref * s
            fmt_s, _ = _round(scaled, kind, tools, nominal)
            folded = _row(pname, ckpt, kind, float((mine - scaled).norm()) / norm,
                          float((fmt_s - scaled).norm()) / norm, approx)
            if folded["verdict"] == "quantization":
                row = {**folded, "verdict": "quantization, input scales folded in"}
        out.append({**row, "matrix": owner in linear and leaf == "weight"})
    table = pd.DataFrame(out, columns=["parameter", "file_name", "type", "error", "format_error", "ratio",
                                       "approximate", "verdict", "matrix"])
    if (table.verdict == "quantization, input scales folded in").any():  # the norms hold the scales' inverses
        norms = table.parameter.map(lambda n: params[n].dim() == 1) & (table.verdict == "not quantization damage")
        table.loc[norms, "verdict"] = "holds folded input scales"
    return table


def _row(pname: str, ckpt, kind: str, err: float, fmt_err: float, approx: bool) -> dict:
    if err == 0:
        ratio, verdict = 0.0, "as the base"
    else:
        ratio = err / fmt_err if fmt_err > 0 else math.inf
        verdict = "not quantization damage" if ratio > LIMIT else "quantization"
    return {"parameter": pname, "file_name": ckpt.file_names.get(pname, pname), "type": kind, "error": err,
            "format_error": fmt_err, "ratio": ratio, "approximate": approx, "verdict": verdict}


def flagged(table: pd.DataFrame) -> pd.DataFrame:
    """The rows that are not quantization damage."""
    return table[table.verdict == "not quantization damage"]


def refuse_other_model(table: pd.DataFrame, matrices: int) -> None:
    """Raise, naming them, when most of the decoder's ``matrices`` are not the base's weights
    quantized (judged by the exact quantizers only): the file is another model."""
    bad = flagged(table[~table.approximate & table.matrix])
    if matrices and len(bad) > matrices / 2:
        names = ", ".join(bad.file_name.head(6))
        raise ValueError(f"{len(bad)} of the checkpoint's tensors are further from the base than their own format's "
                         f"rounding can take them ({names}{', ...' if len(bad) > 6 else ''}; ratios "
                         f"{bad.ratio.min():.1f} to {bad.ratio.max():.1f}, limit {LIMIT:.2f}): it is not a "
                         "quantization of this base; pass the base the checkpoint was made from")


def _spread(n: int, rows: int) -> torch.Tensor:
    return torch.unique(torch.linspace(0, n - 1, min(n, rows)).round().long())


def _rows(q, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of a stored matrix, de-quantizing only those where the layout allows."""
    if isinstance(q, gguf.GGUFTensor):
        return gguf.GGUFTensor(q.data[idx.to(q.data.device)], q.qtype, q.in_features).dequantize(torch.float32)
    return q.dequantize(torch.float32)[idx.to(_device(q))]


def _device(q) -> torch.device:
    from .swap import device_of

    return device_of(q) or torch.device("cpu")


def _round(ref: torch.Tensor, kind: str, tools, nominal) -> tuple[torch.Tensor, bool]:
    """``ref (rows, cols)`` rounded to nearest in the storage type ``kind``, and whether that is
    qdiag's stand-in rather than the type's own quantizer."""
    name = kind.upper()
    if name in ("F32", "FLOAT32"):
        return ref, False
    if name in ("F16", "FLOAT16", "BF16", "BFLOAT16"):
        return ref.to(torch.float16 if "16" in name and "B" not in name else torch.bfloat16).float(), False
    if not name.startswith(("GPTQ", "AWQ", "CT")):
        cols = ref.shape[1]
        if tools is not None and cols % gguf.block_size(name) == 0:
            try:
                return llama_cpp.quantize(ref, name, tools).dequantize(torch.float32), False
            except ValueError:  # a type that needs an importance matrix: the stand-in below
                pass
        if name.lower() in gguf.TYPES and cols % gguf.block_size(name) == 0:
            return gguf.quantize_matrix(ref, name).dequantize(torch.float32), False
        bits, group, sym = _STAND_IN.get(name, (gguf.nominal_bits(name), 32, True))
        return rtn(ref, QuantSpec(bits, min(group, cols), sym)).dequantize(torch.float32), True
    bits, group = nominal
    # asymmetric min-max: the finer of the two grids, so the check is never looser than the file's own
    return rtn(ref, QuantSpec(bits, None if group is None else min(group, ref.shape[1]), False)).dequantize(
        torch.float32), False


def summary(table: pd.DataFrame) -> str:
    """One sentence for reports: what is not quantization damage, or that every tensor is."""
    bad = flagged(table)
    if bad.empty:
        return (f"Format check: every tensor's difference from the base is within its format's rounding "
                f"(largest ratio {table.ratio.max():.2f}, limit {LIMIT:.2f}).")
    parts = [f"{r.file_name} ({r.type}, {r.ratio:.1f}x its format's rounding)" if math.isfinite(r.ratio)
             else f"{r.file_name} ({r.type}, changed although its type has no rounding)" for r in bad.itertuples()]
    return (f"Not quantization damage: {len(bad)} tensor(s) differ from the base far beyond what their own format's "
            f"rounding does: {', '.join(parts[:6])}{', ...' if len(parts) > 6 else ''}. Re-export them from the base.")

