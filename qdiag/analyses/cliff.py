"""The performance cliff: perplexity and factual recall of one model across bit widths and
quantizers (analysis 1 of the paper), as one tidy table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..core.data import Fact
from ..core.io import records, save_analysis, write_csv
from ..measure import evaluate as ev
from ..measure.readout import COLLAPSE_RANK, TOP_K
from ..measure.widths import Reference, Width, each_width, output_fidelity
from ..quant.quantize import FULL_PRECISION, QuantSpec
from ..report.plots import cliff_figure

# Output fidelity beside perplexity: what llama.cpp users and quantization toolkits compare first.
FIDELITY = ("ppl", "kl", "kl_lo", "kl_hi", "top1_agreement", "top1_agreement_lo", "top1_agreement_hi")


@dataclass
class CliffResult:
    """``rows``: one per (method, bits); ``prompts``: one per (method, bits, fact, template);
    ``generations``: greedy continuations of a few prompts per (method, bits); ``known``: the
    screened reference-right prompts scored per (method, bits), with their ``subset`` (empty when
    no known facts were given)."""

    rows: pd.DataFrame
    prompts: pd.DataFrame
    generations: pd.DataFrame
    known: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def ranked(self) -> pd.DataFrame:
        """The prompts ranks are read on: the screened known ones when there are any."""
        return self.known if not self.known.empty else self.prompts


def run_cliff(model: nn.Module, facts: list[Fact], specs: list[QuantSpec | Width], ppl_tokens: torch.Tensor,
              ppl_window: int = 512, calib: torch.Tensor | None = None, n_generations: int = 4,
              seed: int = 0, progress: bool = True, known: list[Fact] | None = None) -> CliffResult:
    """Quantize the model with each spec in turn (one at a time, weights swapped), and measure:
    perplexity and output fidelity on text, recall on the random ``facts``, and, when ``known``
    (screened reference-right prompts) is given, ``retention``: the share of those each width keeps."""
    tok = model.tokenizer
    ref = Reference(model, facts)
    kref = Reference(model, known) if known else None
    sample_prompts = [f.prompts()[0] for f in facts[:n_generations]]
    rows, prompts, gens, kept = [], [], [], []
    for w in each_width(model, specs, calib, progress, desc="cliff"):
        # perplexity, KL and top-1 agreement from the same forward over the same windows
        fidelity = output_fidelity(model, ppl_tokens, w, ppl_window, seed=seed)
        scored = ref.score(model, w, progress=progress)
        with w.applied(model):
            texts = ev.generate(model, tok, sample_prompts) if sample_prompts else []
        counts = ref.subsets(scored).subset.value_counts()
        retained = _retention(model, kref, w, seed, progress) if kref is not None else pd.DataFrame()
        rows.append({**w.label, **{k: fidelity[k] for k in FIDELITY}, **ev.accuracy_summary(scored, seed=seed),
                     **_retention_summary(retained, seed),
                     "n_robust": int(counts.get("robust", 0)), "n_failure": int(counts.get("failure", 0)),
                     "quant_seconds": w.seconds})
        kept.append(retained.assign(method=w.method, bits=w.bits))
        prompts.append(scored.assign(method=w.method, bits=w.bits))
        gens += [{"method": w.method, "bits": w.bits, "prompt": p, "generation": g}
                 for p, g in zip(sample_prompts, texts)]
    return CliffResult(pd.DataFrame(rows), pd.concat(prompts, ignore_index=True), pd.DataFrame(gens),
                       pd.concat(kept, ignore_index=True))


def _retention(model: nn.Module, kref: Reference, w: Width, seed: int, progress: bool) -> pd.DataFrame:
    """The known prompts the reference still answers right (a screened prompt can flip on
    re-scoring in another batch), scored with ``w``, with their subset."""
    scored = kref.score(model, w, progress=progress)
    right = kref.reference_right(scored)
    return right.merge(scored[["fact", "template", "prob", "rank", "correct"]], on=["fact", "template"])


def _retention_summary(retained: pd.DataFrame, seed: int) -> dict:
    if retained.empty:
        return {}
    kept = (retained.subset == "robust").to_numpy(dtype=float)
    lo, hi = ev.bootstrap_ci(kept, seed=seed)
    return {"retention": float(kept.mean()), "retention_lo": lo, "retention_hi": hi, "n_known": int(kept.size),
            "known_median_rank": float(retained["rank"].median())}


def save_cliff(res: CliffResult, out: str | Path, meta: dict, title: str = "") -> None:
    """Write ``cliff.json`` (meta, rows, generations), ``cliff.csv``, ``cliff_prompts.csv`` and
    ``cliff.png`` to ``out``; each file is written whole or not at all."""
    save_analysis(out, "cliff", meta, res.rows, extra={"generations": records(res.generations)},
                  figures={"cliff": cliff_figure(res.rows, title=title)})
    write_csv(Path(out) / "cliff_prompts.csv", res.prompts)
    if not res.known.empty:
        write_csv(Path(out) / "cliff_known.csv", res.known)


def findings(res: CliffResult) -> dict:
    """The chapter's claims as numbers and booleans, computed from the run (for the book's prose)."""
    rows = res.rows.set_index(["method", "bits"])
    fp = rows.loc[("fp", FULL_PRECISION)]
    out: dict = {"ppl_fp": fp.ppl, "acc_any_fp": fp.acc_any}
    methods = [m for m in res.rows.method.unique() if m != "fp"]
    key = ["fact", "template"]
    # ranks on the screened known prompts when there are any, else on the random facts' right ones
    source = res.ranked
    right = source[(source.method == "fp") & source.correct][key]
    out["n_fp_right"] = len(right)
    out["n_fp_right_random"] = int(((res.prompts.method == "fp") & res.prompts.correct).sum())
    for m in methods:
        for b in rows.loc[m].index:
            r = rows.loc[(m, b)]
            out[f"{m}{b}_ppl_ratio"] = r.ppl / fp.ppl
            out[f"{m}{b}_acc_any"] = r.acc_any
            ranks = source[(source.method == m) & (source.bits == b)].merge(right, on=key)["rank"]
            if "retention" in r:
                out[f"{m}{b}_retention"] = r.retention
            out[f"{m}{b}_median_rank_fp_right"] = float(ranks.median()) if len(ranks) else float("nan")
            out[f"{m}{b}_top{TOP_K}_share"] = float((ranks <= TOP_K).mean()) if len(ranks) else float("nan")
            median = out[f"{m}{b}_median_rank_fp_right"]
            out[f"{m}{b}_rank_drop"] = bool(median <= TOP_K)
            out[f"{m}{b}_rank_collapse"] = bool(median >= COLLAPSE_RANK)
    if {"rtn", "gptq"} <= set(methods):
        for b in sorted(set(rows.loc["rtn"].index) & set(rows.loc["gptq"].index)):
            out[f"gptq_beats_rtn_{b}"] = bool(rows.loc[("gptq", b)].ppl < rows.loc[("rtn", b)].ppl)
            if "retention" in rows.columns:
                out[f"gptq_keeps_more_{b}"] = bool(rows.loc[("gptq", b)].retention > rows.loc[("rtn", b)].retention)
    return {k: v if isinstance(v, (bool, int, str)) else float(v) for k, v in out.items()}


def quantizer_findings(rows: pd.DataFrame) -> dict:
    """Does the quantizer matter, or only the bits? Per nominal width with two or more quantizers:
    the one with the lowest perplexity, the one keeping most screened prompts, and the spreads
    (worst over best perplexity; most minus fewest prompts kept), with each one's average bits."""
    out: dict = {}
    rows = rows[rows.method != "fp"]
    for b, d in rows.groupby("bits"):
        if d.method.nunique() < 2:
            continue
        best = d.loc[d.ppl.idxmin()]
        out[f"best_ppl_{b}"] = str(best.method)
        out[f"best_ppl_{b}_avg_bits"] = float(best.avg_bits)
        out[f"ppl_spread_{b}"] = float(d.ppl.max() / d.ppl.min())
        if "retention" in d and d.retention.notna().any():
            keep = d.loc[d.retention.idxmax()]
            out[f"best_retention_{b}"] = str(keep.method)
            out[f"retention_spread_{b}"] = float(d.retention.max() - d.retention.min())
            out[f"same_best_{b}"] = bool(best.method == keep.method)
    return out
