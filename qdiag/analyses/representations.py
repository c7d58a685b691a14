"""Representations under quantization (analysis 5 of the paper): is the quantized model's hidden
geometry still the reference's?

Activations: the residual stream after each decoder layer (``hidden_states[l + 1]`` in
transformers' terms) at the chosen token positions of the ParaRel prompts, one row per token,
at most ``max_tokens`` rows (the shortest prompts first, so fewer pads are dropped). Every metric
centres each feature over those tokens (the mean token is subtracted) before comparing.

- ``cka``: linear CKA between reference layer i and quantized layer j, a layer x layer matrix;
- ``subspace_sim``: ``(1/k) sum_i sigma_i(V_fp^T V_q)^2`` for the top-k principal directions of the
  same layer in both models (1: same subspace, 0: orthogonal);
- ``error_alignment``: the same similarity between the error's (quantized minus reference
  activations) top-k principal directions and the reference's: about k/d for error spread evenly,
  near 1 for error along the directions the reference uses most, 0 for no error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import positions as P
from ..core.arch import resolve
from ..core.data import Fact
from ..core.io import save_analysis
from ..measure import metrics as M
from ..measure.evaluate import prompt_table
from ..measure.trace import collect
from ..measure.widths import Width, check_configs, each_width
from ..quant.quantize import QuantSpec
from ..report.plots import cka_figure, subspace_figure


@dataclass
class RepresentationResult:
    """``rows``: one per (method, bits, layer); ``cka``: ``{(method, bits): (layers, layers)}``
    with reference layers down the rows and quantized layers across."""

    rows: pd.DataFrame
    cka: dict[tuple[str, int], np.ndarray]


def hidden_states(model: nn.Module, chunks: list[pd.DataFrame], position: str, max_tokens: int,
                  progress: bool = False) -> list[torch.Tensor]:
    """The residual stream after every layer at ``position``: one ``(n_tokens, d_model)`` per layer."""
    tok = model.tokenizer
    arch = resolve(model)
    parts: list[list[torch.Tensor]] = [[] for _ in range(arch.n_layers)]
    n = 0
    for chunk in tqdm(chunks, desc="hidden states", disable=not progress, leave=False):
        if n >= max_tokens:
            break
        batch = P.encode(tok, chunk.prompt.tolist(), chunk.subject_end.tolist())
        tokens = None if position == "all" else P.token_index(batch, position)[:, None]
        got = collect(model, batch, ("resid",), tokens=tokens)["resid"]
        for layer, x in enumerate(got):
            rows = P.select(x, batch, "all") if tokens is None else x[:, 0]
            parts[layer].append(rows[: max_tokens - n])
        n += parts[0][-1].shape[0]
    return [torch.cat(p) for p in parts]


def compare(fp: list[torch.Tensor], q: list[torch.Tensor], k: int = 50) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-layer ``subspace_sim`` and ``error_alignment`` rows, and the CKA matrix, for two lists
    of per-layer activations over the same tokens."""
    rows = [{"layer": layer, "subspace_sim": M.activation_subspace_similarity(a, b, k),
             "error_alignment": M.error_alignment(a, b, k), "cka_same_layer": M.linear_cka(a, b)}
            for layer, (a, b) in enumerate(zip(fp, q))]
    return pd.DataFrame(rows), M.cka_matrix(fp, q).numpy()


def check(position: str, k: int, max_tokens: int) -> None:
    """Raise on options the representation comparison cannot run with."""
    P.check([position])
    if k < 1:
        raise ValueError(f"k (principal directions) must be at least 1, got {k}")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")


def run_representations(model: nn.Module, facts: list[Fact], specs: list[QuantSpec | Width],
                        calib: torch.Tensor | None = None, position: str = "all", k: int = 50,
                        max_tokens: int = 2048, batch_size: int = 16,
                        progress: bool = True) -> RepresentationResult:
    """Compare the reference's hidden states with each configuration's; a full-precision spec
    compares the model with itself (run again: the identity check goes through the whole path)."""
    check(position, k, max_tokens)
    configs = check_configs(model, specs)
    chunks = P.batches(prompt_table(facts, model.tokenizer), facts, batch_size)
    fp = hidden_states(model, chunks, position, max_tokens, progress)
    rows, cka = [], {}
    for w in each_width(model, configs, calib, progress, desc="representations"):
        with w.applied(model):
            q = hidden_states(model, chunks, position, max_tokens, progress and not w.is_reference)
        per_layer, cka[(w.method, w.bits)] = compare(fp, q, k)
        rows.append(per_layer.assign(method=w.method, bits=w.bits, avg_bits=w.avg_bits, position=position,
                                     n_tokens=fp[0].shape[0], k=min(k, *fp[0].shape), d_model=fp[0].shape[1]))
    cols = ["method", "bits", "avg_bits", "position", "layer", "n_tokens", "k", "d_model", "subspace_sim",
            "error_alignment", "cka_same_layer"]
    return RepresentationResult(pd.concat(rows, ignore_index=True)[cols], cka)


def save_representations(res: RepresentationResult, out: str | Path, meta: dict, title: str = "") -> None:
    """Write ``representations.json`` (meta, rows, and ``cka``: one ``{method, bits, matrix}`` per
    configuration, reference layers down the rows), ``representations.csv`` and two figures."""
    prefix = f"{title}: " if title else ""
    cka = [{"method": m, "bits": b, "matrix": np.round(mat, 6).tolist()} for (m, b), mat in res.cka.items()]
    figures = {"representations_cka": cka_figure(res.cka, f"{prefix}linear CKA, reference x quantized layers"),
               "representations_subspace": subspace_figure(res.rows, f"{prefix}principal subspaces per layer")}
    save_analysis(out, "representations", meta, res.rows, extra={"cka": cka}, figures=figures)


# The paper's words as numbers (shared/paper-notes.md, analysis 5): subspace similarity "above 0.8
# at 4-bit, about 0 at 2-bit"; error alignment "about 0.3 at 4-bit, about 0.8 at 2-bit"; the CKA
# diagonal "survives at 4-bit, goes dark at 2-bit". "About" is read as within 0.1, "dark" as a mean
# diagonal below 0.3 and "survives" as above 0.8.
SUBSPACE_HIGH, ABOUT = 0.8, 0.1
CKA_SURVIVES, CKA_DARK = 0.8, 0.3


def findings(res: RepresentationResult, method: str) -> dict:
    """Per width of ``method``, the layer-averaged metrics and the paper's claims as booleans,
    keyed ``w<bits>_<name>`` (for the chapter's prose)."""
    rows = res.rows[res.rows.method == method]
    if rows.empty:
        raise ValueError(f"no {method} rows")
    out: dict = {"n_tokens": int(rows.n_tokens.iloc[0]), "k": int(rows.k.iloc[0]), "d_model": int(rows.d_model.iloc[0])}
    out["k_over_d"] = out["k"] / out["d_model"]
    for b, g in rows.groupby("bits", sort=False):
        key = f"w{b}"
        diag = float(np.diag(res.cka[(method, b)]).mean())
        out[f"{key}_cka_diag"] = diag
        out[f"{key}_cka_survives"] = bool(diag > CKA_SURVIVES)
        out[f"{key}_cka_dark"] = bool(diag < CKA_DARK)
        out[f"{key}_subspace"] = float(g.subspace_sim.mean())
        out[f"{key}_subspace_min"] = float(g.subspace_sim.min())
        out[f"{key}_subspace_high"] = bool(out[f"{key}_subspace"] > SUBSPACE_HIGH)
        out[f"{key}_subspace_near0"] = bool(out[f"{key}_subspace"] < ABOUT)
        out[f"{key}_alignment"] = float(g.error_alignment.mean())
        out[f"{key}_alignment_near03"] = bool(abs(out[f"{key}_alignment"] - 0.3) <= ABOUT)
        out[f"{key}_alignment_near08"] = bool(abs(out[f"{key}_alignment"] - 0.8) <= ABOUT)
    return out
