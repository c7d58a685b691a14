"""The performance cliff: perplexity and factual recall of one model across bit widths and
quantizers (analysis 1 of the paper), as one tidy table."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from . import evaluate as ev
from .arch import resolve
from .data import Fact
from .io import records, save_analysis, write_csv
from .plan import avg_bits, check_specs, uniform_plan
from .quantize import FULL_PRECISION, QuantSpec, parse_bits
from .swap import quantize_model


@dataclass
class CliffResult:
    """``rows``: one per (method, bits); ``prompts``: one per (method, bits, fact, template);
    ``generations``: greedy continuations of a few prompts per (method, bits)."""

    rows: pd.DataFrame
    prompts: pd.DataFrame
    generations: pd.DataFrame


def cliff_specs(bits: Sequence[int | str], methods: Sequence[str], group_size: int | None,
                sym: bool) -> list[QuantSpec]:
    """The configurations of a cliff sweep; full precision once, first. Raises on bad input."""
    if not bits:
        raise ValueError("no bit widths given")
    if not methods:
        raise ValueError("no quantization methods given")
    widths = sorted({parse_bits(b) for b in bits}, reverse=True)
    specs = [QuantSpec(bits=FULL_PRECISION)] if FULL_PRECISION in widths else []
    specs += [QuantSpec(bits=b, group_size=group_size, sym=sym, method=m)
              for m in methods for b in widths if b != FULL_PRECISION]
    return specs


def run_cliff(model: nn.Module, facts: list[Fact], specs: list[QuantSpec], ppl_tokens: torch.Tensor,
              ppl_window: int = 512, calib: torch.Tensor | None = None, n_generations: int = 4,
              seed: int = 0, progress: bool = True) -> CliffResult:
    """Quantize the model with each spec in turn (one at a time, weights swapped), and measure."""
    tok = model.tokenizer
    arch = resolve(model)
    check_specs(model, specs, arch)
    table = ev.prompt_table(facts, tok)
    sample_prompts = [f.prompts()[0] for f in facts[:n_generations]]
    rows, prompts, gens = [], [], []
    fp_scored = None
    for spec in tqdm(specs, desc="cliff", disable=not progress):
        method = "fp" if spec.is_full_precision else spec.method
        if spec.is_full_precision:
            qw, bits_avg, seconds = None, float(FULL_PRECISION), 0.0
        else:
            plan = uniform_plan(model, spec, arch=arch)
            qw = quantize_model(model, plan, calib, progress=progress)
            bits_avg, seconds = avg_bits(model, plan, arch), qw.seconds
        with (qw.applied(model) if qw else nullcontext()):
            ppl = ev.perplexity(model, ppl_tokens, ppl_window, progress=progress)
            scored = ev.score_prompts(model, tok, table, progress=progress)
            texts = ev.generate(model, tok, sample_prompts) if sample_prompts else []
        if fp_scored is None and spec.is_full_precision:
            fp_scored = scored
        row = {"method": method, "bits": spec.bits,
               "group_size": None if spec.is_full_precision else spec.group_size,
               "sym": None if spec.is_full_precision else spec.sym,
               "avg_bits": bits_avg, "ppl": ppl, **ev.accuracy_summary(scored, seed=seed),
               "quant_seconds": seconds}
        if fp_scored is not None:
            counts = ev.subsets(fp_scored, scored).value_counts()
            row["n_robust"], row["n_failure"] = int(counts.get("robust", 0)), int(counts.get("failure", 0))
        rows.append(row)
        prompts.append(scored.assign(method=method, bits=spec.bits))
        gens += [{"method": method, "bits": spec.bits, "prompt": p, "generation": g}
                 for p, g in zip(sample_prompts, texts)]
        del qw
    return CliffResult(pd.DataFrame(rows), pd.concat(prompts, ignore_index=True), pd.DataFrame(gens))


def save_cliff(res: CliffResult, out: str | Path, meta: dict, title: str = "") -> None:
    """Write ``cliff.json`` (meta, rows, generations), ``cliff.csv``, ``cliff_prompts.csv`` and
    ``cliff.png`` to ``out``; each file is written whole or not at all."""
    from .plots import cliff_figure

    save_analysis(out, "cliff", meta, res.rows, extra={"generations": records(res.generations)},
                  figures={"cliff": cliff_figure(res.rows, title=title)})
    write_csv(Path(out) / "cliff_prompts.csv", res.prompts)


# The paper's words, as numbers: a "rank drop" keeps the answer in the top 5, a "rank collapse"
# sends it to the thousands.
TOP_K = 5
COLLAPSE_RANK = 1000


def findings(res: CliffResult) -> dict:
    """The chapter's claims as numbers and booleans, computed from the run (for the book's prose)."""
    rows = res.rows.set_index(["method", "bits"])
    fp = rows.loc[("fp", FULL_PRECISION)]
    out: dict = {"ppl_fp": fp.ppl, "acc_any_fp": fp.acc_any}
    methods = [m for m in res.rows.method.unique() if m != "fp"]
    key = ["fact", "template"]
    right = res.prompts[(res.prompts.method == "fp") & res.prompts.correct][key]
    out["n_fp_right"] = len(right)
    for m in methods:
        for b in rows.loc[m].index:
            r = rows.loc[(m, b)]
            out[f"{m}{b}_ppl_ratio"] = r.ppl / fp.ppl
            out[f"{m}{b}_acc_any"] = r.acc_any
            ranks = res.prompts[(res.prompts.method == m) & (res.prompts.bits == b)].merge(right, on=key)["rank"]
            out[f"{m}{b}_median_rank_fp_right"] = float(ranks.median()) if len(ranks) else float("nan")
            out[f"{m}{b}_top{TOP_K}_share"] = float((ranks <= TOP_K).mean()) if len(ranks) else float("nan")
            median = out[f"{m}{b}_median_rank_fp_right"]
            out[f"{m}{b}_rank_drop"] = bool(median <= TOP_K)
            out[f"{m}{b}_rank_collapse"] = bool(median >= COLLAPSE_RANK)
    if {"rtn", "gptq"} <= set(methods):
        for b in sorted(set(rows.loc["rtn"].index) & set(rows.loc["gptq"].index)):
            out[f"gptq_beats_rtn_{b}"] = bool(rows.loc[("gptq", b)].ppl < rows.loc[("rtn", b)].ppl)
    return {k: v if isinstance(v, (bool, int, str)) else float(v) for k, v in out.items()}
