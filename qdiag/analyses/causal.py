"""Causal tests (analysis 3 of the paper) on the prompts the reference answers correctly.

- **Cross-model patching** ("sufficiency"): run the quantized model and write the reference's
  activation into one site (``resid``, ``attn`` or ``mlp`` output) of one layer, or of a window
  of consecutive layers starting there, at one token (``last_subject`` or ``last``).
  ``recovery = (p_patched - p_quant) / (p_fp - p_quant)`` of the correct answer's probability,
  aggregated as a ratio of means over prompts (per-prompt ratios explode where ``p_fp`` and
  ``p_quant`` are close, as on the Robust subset); the per-prompt probabilities are kept.
- **Zero ablation** ("necessity"): zero one site at one token, in each model; ``effect = 1 -
  mean(p_ablated) / mean(p_clean)``, the share of the answer's probability lost. Each model's
  effects over all (layer, site, position) cells form its dependency profile; ``profile_r`` is the
  Pearson correlation of the two profiles.
- **Clean-signal injection**: replace the quantized model's residual stream entering layer ``s``
  (every token) with the reference's and let the quantized layers ``s..`` continue: does the
  output recover, and does the last token's residual stream stay close (cosine) to the
  reference's in the layers after ``s``? ``s = 0`` is the plain quantized model.

Subsets: ``failure`` (reference right, quantized wrong), ``robust`` (both right) and ``all`` (every
prompt the reference gets right).
"""

from __future__ import annotations

from collections.abc import Sequence
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
from ..core.io import records, save_analysis, write_csv
from ..measure import evaluate as ev
from ..measure.patch import SITES, Edit, Rerun
from ..measure.readout import answer_prob
from ..measure.trace import collect
from ..measure.widths import Reference, Width, check_configs, each_width, quantized_only
from ..quant.quantize import QuantSpec
from ..report.plots import ablation_figure, injection_figure, patching_figure

KIND = {"resid": "resid", "attn": "attn_out", "mlp": "mlp_out"}
SUBSETS = ("failure", "robust", "all")


@dataclass
class CausalResult:
    """Tidy tables, one row per cell and subset; see the module docstring for the measures."""

    patching: pd.DataFrame
    ablation: pd.DataFrame
    ablation_similarity: pd.DataFrame
    injection: pd.DataFrame
    injection_cosine: pd.DataFrame
    prompts: pd.DataFrame  # per prompt and patching cell: p_fp, p_quant, p_patched


def _cells(n_layers: int, sites: Sequence[str], positions: Sequence[str]) -> list[tuple[int, str, str]]:
    return [(layer, s, p) for layer in range(n_layers) for s in sites for p in positions]


def _by_layer(cells, make) -> dict[int, list]:
    groups: dict[int, list] = {}
    for c in cells:
        groups.setdefault(c[0], []).append((c, make(*c)))
    return groups


def _sweep(run: Rerun, cells, make, answer: torch.Tensor) -> dict[tuple, torch.Tensor]:
    """Answer probability per cell ``{(layer, site, position): (batch,)}``; cells that start at the
    same layer run side by side."""
    out = {}
    for group in _by_layer(cells, make).values():
        logits, _ = run.run([edits for _, edits in group])
        probs = answer_prob(logits, answer)
        for (cell, _), p in zip(group, probs):
            out[cell] = p
    return out


def _ratio_row(num: np.ndarray, den: np.ndarray, seed: int) -> tuple[float, float, float]:
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(num.mean() / den.mean()) if den.size and den.mean() != 0 else float("nan")
    lo, hi = ev.bootstrap_ratio_ci(num, den, seed=seed)
    return value, lo, hi


def _per_subset(df: pd.DataFrame):
    for sub in SUBSETS:
        g = df if sub == "all" else df[df.subset == sub]
        if len(g):
            yield sub, g


def check(positions: Sequence[str], sites: Sequence[str], window: int) -> list[str]:
    """Raise on options the causal tests cannot run with (before any work); the positions, checked."""
    positions = P.check(positions)
    if "all" in positions:
        raise ValueError("patching works at one token per prompt: use last_subject and/or last")
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise ValueError(f"unknown sites {bad or list(sites)}; choose from {', '.join(SITES)}")
    if window < 1:
        raise ValueError(f"window must be at least 1 layer, got {window}")
    return positions


def run_causal(model: nn.Module, facts: list[Fact], specs: list[QuantSpec | Width], calib: torch.Tensor | None = None,
               positions: Sequence[str] = ("last_subject", "last"), sites: Sequence[str] = SITES, window: int = 1,
               ablation: bool = True, injection: bool = True, batch_size: int = 8, seed: int = 0,
               progress: bool = True) -> CausalResult:
    """Patching, ablation and injection for each quantized configuration (full-precision specs
    are skipped: there is nothing to recover)."""
    positions = check(positions, sites, window)
    configs = check_configs(model, quantized_only(specs))
    tok = model.tokenizer
    n_layers = resolve(model).n_layers
    ref = Reference(model, facts, progress=progress)
    if not ref.scored.correct.any():
        raise ValueError(f"the reference answers none of the {len(ref.table)} prompts correctly, so there is nothing "
                         "to recover; use more facts (--facts) or a larger model")
    cells = _cells(n_layers, sites, positions)
    out: dict[str, list] = {k: [] for k in ("patching", "ablation", "similarity", "injection", "cosine", "prompts")}
    fp_ablated: dict[tuple, dict] = {}  # the reference's ablations do not depend on the width: run once per batch
    for w in each_width(model, configs, calib, progress, desc="causal"):
        right = ref.reference_right(ref.score(model, w))
        chunks = P.batches(right, facts, batch_size)
        recs, abl, inj, cos = [], [], [], []
        for chunk in tqdm(chunks, desc=f"causal {w.method} {w.bits}-bit", leave=False, disable=not progress):
            batch = P.encode(tok, chunk.prompt.tolist(), chunk.subject_end.tolist())
            answer = torch.tensor(chunk.answer_id.to_numpy())
            idx = {p: P.token_index(batch, p) for p in positions}
            rows = torch.arange(len(chunk))
            fp = collect(model, batch, ("attn_out", "mlp_out", "resid"))
            fp_run = Rerun(model, batch)
            p_fp = answer_prob(fp_run.logits, answer)
            ident = {"fact": chunk.fact.to_numpy(), "template": chunk.template.to_numpy(),
                     "subset": chunk.subset.to_numpy()}

            def patch_edits(layer, site, pos):
                top = min(layer + window, n_layers)
                return [Edit(j, site, idx[pos], fp[KIND[site]][j][rows, idx[pos]]) for j in range(layer, top)]

            def zero_edits(layer, site, pos):
                return [Edit(layer, site, idx[pos], 0.0)]

            if ablation:
                key = tuple(zip(chunk.fact, chunk.template))
                if key not in fp_ablated:
                    fp_ablated[key] = _sweep(fp_run, cells, zero_edits, answer)
                for cell, p in fp_ablated[key].items():
                    abl.append(pd.DataFrame({**ident, "model": "fp", "layer": cell[0], "site": cell[1],
                                             "position": cell[2], "p_clean": p_fp.numpy(), "p_ablated": p.numpy()}))
            with w.applied(model):
                q_run = Rerun(model, batch)
                p_q = answer_prob(q_run.logits, answer)
                for cell, p in _sweep(q_run, cells, patch_edits, answer).items():
                    recs.append(pd.DataFrame({**ident, "layer": cell[0], "site": cell[1], "position": cell[2],
                                              "p_fp": p_fp.numpy(), "p_quant": p_q.numpy(), "p_patched": p.numpy()}))
                if ablation:
                    for cell, p in _sweep(q_run, cells, zero_edits, answer).items():
                        abl.append(pd.DataFrame({**ident, "model": "quantized", "layer": cell[0], "site": cell[1],
                                                 "position": cell[2], "p_clean": p_q.numpy(),
                                                 "p_ablated": p.numpy()}))
                if injection:
                    last = batch["input_ids"].shape[1] - 1
                    q_resid = collect(model, batch, ("resid",), tokens=torch.full((len(chunk), 1), last))
                    fp_last = [r[:, last] for r in fp["resid"]]
                    base = [torch.nn.functional.cosine_similarity(q_resid["resid"][j][:, 0], fp_last[j], dim=-1)
                            for j in range(n_layers)]
                    inj.append(pd.DataFrame({**ident, "start_layer": 0, "p_fp": p_fp.numpy(), "p_quant": p_q.numpy(),
                                             "p_injected": p_q.numpy()}))
                    cos += [{"start_layer": 0, "layer": j, "cosine": float(base[j].mean()), "n": len(chunk)}
                            for j in range(n_layers)]
                    for s in range(1, n_layers):
                        logits, hidden = q_run.run([[Edit(s - 1, "resid", None, fp["resid"][s - 1])]],
                                                   hidden_at=range(s - 1, n_layers))
                        inj.append(pd.DataFrame({**ident, "start_layer": s, "p_fp": p_fp.numpy(),
                                                 "p_quant": p_q.numpy(),
                                                 "p_injected": answer_prob(logits, answer)[0].numpy()}))
                        for j, h in hidden.items():
                            c = torch.nn.functional.cosine_similarity(h[0].cpu(), fp_last[j], dim=-1)
                            cos.append({"start_layer": s, "layer": j, "cosine": float(c.mean()), "n": len(chunk)})
        info = {"method": w.method, "bits": w.bits}
        prompts = pd.concat(recs, ignore_index=True)
        out["prompts"].append(prompts.assign(**info))
        out["patching"].append(_patching_rows(prompts, seed).assign(**info))
        if ablation:
            a_rows = _ablation_rows(pd.concat(abl, ignore_index=True), seed)
            out["ablation"].append(a_rows.assign(**info))
            out["similarity"].append(_profile_similarity(a_rows).assign(**info))
        if injection:
            out["injection"].append(_injection_rows(pd.concat(inj, ignore_index=True), seed).assign(**info))
            c = pd.DataFrame(cos)
            c["weighted"] = c.cosine * c.n
            g = c.groupby(["start_layer", "layer"], as_index=False)[["weighted", "n"]].sum()
            out["cosine"].append(g.assign(cosine=g.weighted / g.n).drop(columns="weighted").assign(**info))

    def frame(key: str, first: list[str]) -> pd.DataFrame:
        if not out[key]:
            return pd.DataFrame()
        d = pd.concat(out[key], ignore_index=True)
        return d[first + [c for c in d.columns if c not in first]]

    head = ["method", "bits"]
    return CausalResult(frame("patching", head), frame("ablation", head), frame("similarity", head),
                        frame("injection", head), frame("cosine", head), frame("prompts", head))


def _patching_rows(prompts: pd.DataFrame, seed: int) -> pd.DataFrame:
    rows = []
    for (layer, site, pos), g in prompts.groupby(["layer", "site", "position"], sort=False):
        for sub, s in _per_subset(g):
            num, den = (s.p_patched - s.p_quant).to_numpy(), (s.p_fp - s.p_quant).to_numpy()
            rec, lo, hi = _ratio_row(num, den, seed)
            rows.append({"layer": layer, "site": site, "position": pos, "subset": sub, "recovery": rec,
                         "recovery_lo": lo, "recovery_hi": hi, "p_fp": s.p_fp.mean(), "p_quant": s.p_quant.mean(),
                         "p_patched": s.p_patched.mean(), "n": len(s)})
    return pd.DataFrame(rows)


def _ablation_rows(abl: pd.DataFrame, seed: int) -> pd.DataFrame:
    rows = []
    for (model, layer, site, pos), g in abl.groupby(["model", "layer", "site", "position"], sort=False):
        for sub, s in _per_subset(g):
            kept, lo, hi = _ratio_row(s.p_ablated.to_numpy(), s.p_clean.to_numpy(), seed)
            rows.append({"model": model, "layer": layer, "site": site, "position": pos, "subset": sub,
                         "effect": 1 - kept, "effect_lo": 1 - hi, "effect_hi": 1 - lo, "p_clean": s.p_clean.mean(),
                         "p_ablated": s.p_ablated.mean(), "n": len(s)})
    return pd.DataFrame(rows)


def _profile_similarity(rows: pd.DataFrame) -> pd.DataFrame:
    """Pearson correlation of the two models' ablation effects over all cells, per subset."""
    out = []
    for sub, g in rows.groupby("subset", sort=False):
        wide = g.pivot_table(index=["layer", "site", "position"], columns="model", values="effect")
        if {"fp", "quantized"} <= set(wide.columns) and len(wide) > 1:
            r = float(np.corrcoef(wide.fp, wide.quantized)[0, 1]) if wide.std().min() > 0 else float("nan")
        else:
            r = float("nan")
        out.append({"subset": sub, "profile_r": r, "n_cells": len(wide)})
    return pd.DataFrame(out)


def _injection_rows(inj: pd.DataFrame, seed: int) -> pd.DataFrame:
    rows = []
    for s_layer, g in inj.groupby("start_layer"):
        for sub, s in _per_subset(g):
            num, den = (s.p_injected - s.p_quant).to_numpy(), (s.p_fp - s.p_quant).to_numpy()
            rec, lo, hi = _ratio_row(num, den, seed)
            rows.append({"start_layer": int(s_layer), "subset": sub, "recovery": rec, "recovery_lo": lo,
                         "recovery_hi": hi, "p_fp": s.p_fp.mean(), "p_quant": s.p_quant.mean(),
                         "p_injected": s.p_injected.mean(), "n": len(s)})
    return pd.DataFrame(rows)


def save_causal(res: CausalResult, out: str | Path, meta: dict, title: str = "") -> None:
    """Write ``causal.json`` (meta, ``rows`` = patching, and ``ablation``, ``ablation_similarity``,
    ``injection``, ``injection_cosine``), ``causal.csv``, ``causal_prompts.csv`` and figures."""
    figures = {}
    for (m, b), g in res.patching.groupby(["method", "bits"], sort=False):
        figures[f"patching_{m}{b}"] = patching_figure(g, title=f"{title} {m.upper()} {b}-bit".strip())
    if len(res.ablation):
        figures["ablation"] = ablation_figure(res.ablation, title=title)
    if len(res.injection):
        figures["injection"] = injection_figure(res.injection, res.injection_cosine, title=title)
    extra = {"ablation": records(res.ablation), "ablation_similarity": records(res.ablation_similarity),
             "injection": records(res.injection), "injection_cosine": records(res.injection_cosine)}
    save_analysis(out, "causal", meta, res.patching, extra=extra, figures=figures)
    write_csv(Path(out) / "causal_prompts.csv", res.prompts)


# The paper's words as numbers: patching "restores the prediction" = at least half of the lost
# probability comes back at some layer; "no response" = under a tenth at every layer. Dependency
# profiles: "the same nodes" = correlation r >= 0.7, "no structured dependence" = |r| < 0.3 (the
# conventional strong / weak readings of a correlation). Injection "collapses" = under a tenth.
RESTORES, NO_RESPONSE = 0.5, 0.1
SAME_NODES, NO_STRUCTURE = 0.7, 0.3


def findings(res: CausalResult, method: str) -> dict:
    """Per width of ``method``, the numbers behind the chapter's claims, keyed ``w<bits>_<name>``.
    Patching maxima leave out the last layer's residual at the last token (the output itself)."""
    out: dict = {}
    p = res.patching[res.patching.method == method]
    n_layers = int(p.layer.max()) + 1 if len(p) else 0
    out["n_layers"] = n_layers
    for b, g in p.groupby("bits", sort=False):
        key = f"w{b}"
        nontrivial = g[~((g.layer == n_layers - 1) & (g.site == "resid") & (g.position == "last"))]
        for sub in ("failure", "all"):
            for pos in ("last_subject", "last"):
                s = nontrivial[(nontrivial.subset == sub) & (nontrivial.site == "resid") & (nontrivial.position == pos)]
                if s.empty:  # no prompt in this subset: the keys exist, with no value
                    for n in ("max_recovery", "max_layer", "n", "restores", "no_response"):
                        empty = 0 if n == "n" else None if n in ("restores", "no_response") else float("nan")
                        out[f"{key}_{sub}_{pos}_{n}"] = empty
                    continue
                best = s.loc[s.recovery.idxmax()]
                out[f"{key}_{sub}_{pos}_max_recovery"] = float(best.recovery)
                out[f"{key}_{sub}_{pos}_max_layer"] = int(best.layer)
                out[f"{key}_{sub}_{pos}_n"] = int(best.n)
                out[f"{key}_{sub}_{pos}_restores"] = bool(best.recovery >= RESTORES)
                out[f"{key}_{sub}_{pos}_no_response"] = bool(s.recovery.max() < NO_RESPONSE)
        sim = res.ablation_similarity
        if len(sim):
            r = sim[(sim.method == method) & (sim.bits == b) & (sim.subset == "all")].profile_r
            if len(r):
                out[f"{key}_profile_r"] = float(r.iloc[0])
                out[f"{key}_same_nodes"] = bool(r.iloc[0] >= SAME_NODES)
                out[f"{key}_no_structure"] = bool(abs(r.iloc[0]) < NO_STRUCTURE)
        inj = res.injection
        if len(inj):
            i = inj[(inj.method == method) & (inj.bits == b) & (inj.subset == "all")].set_index("start_layer")
            mid = n_layers // 2
            if mid in i.index:
                out[f"{key}_inject_mid_layer"] = mid
                out[f"{key}_inject_mid_recovery"] = float(i.loc[mid, "recovery"])
                out[f"{key}_inject_mid_collapses"] = bool(i.loc[mid, "recovery"] < NO_RESPONSE)
                out[f"{key}_inject_best_recovery"] = float(i.recovery.max())
            c = res.injection_cosine
            c = c[(c.method == method) & (c.bits == b) & (c.start_layer == mid) & (c.layer == n_layers - 1)]
            if len(c):
                out[f"{key}_inject_mid_final_cosine"] = float(c.cosine.iloc[0])
    return out
