"""The logit lens (analysis 2 of the paper): read each layer's residual stream at the last token
through the model's own final norm and unembedding, and ask how likely the correct answer already
is there.

``final_norm=True`` (the default, and the paper's choice) applies the final norm before the
unembedding, so the last layer's lens equals the model's output; ``False`` unembeds the raw
residual stream, whose scale grows with depth, so early layers look flatter than they are.
Families that soft-cap their logits (gemma2/3) are soft-capped here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core import positions as P
from ..core.data import Fact
from ..core.io import save_analysis, write_csv
from ..measure import evaluate as ev
from ..measure.readout import TOP_K, prob_and_rank, project
from ..measure.trace import collect
from ..measure.widths import Reference, Width, each_width
from ..quant.quantize import QuantSpec
from ..report.plots import lens_figure


@torch.no_grad()
def logit_lens(model, batch: dict, answer: torch.Tensor, final_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability and rank of each prompt's ``answer`` token at every layer, read at the last
    token: two ``(batch, layers)`` tensors."""
    last = torch.full((batch["input_ids"].shape[0], 1), batch["input_ids"].shape[1] - 1)
    resid = collect(model, batch, ("resid",), tokens=last)["resid"]
    probs, ranks = [], []
    for h in resid:  # project moves each layer's stream to the unembedding's device (another card, if sharded)
        logits = project(model, h[:, 0], final_norm)
        p, r = prob_and_rank(logits, answer)
        probs.append(p.cpu())
        ranks.append(r.cpu())
    return torch.stack(probs, 1), torch.stack(ranks, 1)


@dataclass
class LensResult:
    """``rows``: one per (method, bits, model, subset, layer), ``model`` being ``fp`` (the
    reference) or ``quantized``, and (method, bits) the configuration whose Robust / Failure
    subsets the row is on; ``prompts``: per prompt and layer, the probability and rank."""

    rows: pd.DataFrame
    prompts: pd.DataFrame


def _lens_all(model, chunks: list[pd.DataFrame], final_norm: bool, progress: bool, desc: str) -> pd.DataFrame:
    out = []
    for chunk in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        batch = P.encode(model.tokenizer, chunk.prompt.tolist())
        prob, rank = logit_lens(model, batch, torch.tensor(chunk.answer_id.to_numpy()), final_norm)
        n, n_layers = prob.shape
        out.append(pd.DataFrame({"fact": np.repeat(chunk.fact.to_numpy(), n_layers),
                                 "template": np.repeat(chunk.template.to_numpy(), n_layers),
                                 "layer": np.tile(np.arange(n_layers), n),
                                 "prob": prob.reshape(-1).numpy(), "rank": rank.reshape(-1).numpy()}))
    return pd.concat(out, ignore_index=True)


def summarize(per_prompt: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Mean probability and median rank per layer, with 95% bootstrap intervals over prompts."""
    rows = []
    for layer, g in per_prompt.groupby("layer"):
        p_lo, p_hi = ev.bootstrap_ci(g.prob.to_numpy(), seed=seed)
        r_lo, r_hi = ev.bootstrap_ci(g["rank"].to_numpy(), seed=seed, stat="median")
        rows.append({"layer": int(layer), "prob": float(g.prob.mean()), "prob_lo": p_lo, "prob_hi": p_hi,
                     "rank": float(g["rank"].median()), "rank_lo": r_lo, "rank_hi": r_hi, "n": len(g)})
    return pd.DataFrame(rows)


def run_lens(model, facts: list[Fact], specs: list[QuantSpec | Width], calib: torch.Tensor | None = None,
             final_norm: bool = True, batch_size: int = 16, seed: int = 0, progress: bool = True) -> LensResult:
    """The logit lens of the reference and of each configuration, on each configuration's Robust
    and Failure subsets (and on all prompts). Subsets come from the output's greedy answer."""
    ref = Reference(model, facts, progress=progress)
    chunks = P.batches(ref.table, facts, batch_size)
    key = ["fact", "template"]
    fp_lens = _lens_all(model, chunks, final_norm, progress, "logit lens fp")
    rows, prompts = [], []
    for w in each_width(model, specs, calib, progress, desc="logit lens"):
        if w.is_reference:
            scored, q_lens = ref.scored, fp_lens
        else:
            with w.applied(model):
                scored = ev.score_prompts(model, model.tokenizer, ref.table, progress=progress)
                q_lens = _lens_all(model, chunks, final_norm, progress, f"logit lens {w.method} {w.bits}-bit")
        subset = ref.subsets(scored)
        models = {"fp": fp_lens} if w.is_reference else {"fp": fp_lens, "quantized": q_lens}
        for name, lens_rows in models.items():
            d = lens_rows.merge(subset, on=key)
            for sub, g in [("robust", d[d.subset == "robust"]), ("failure", d[d.subset == "failure"]), ("all", d)]:
                if len(g):
                    rows.append(summarize(g, seed).assign(method=w.method, bits=w.bits, model=name, subset=sub))
        prompts.append(q_lens.merge(subset, on=key).assign(method=w.method, bits=w.bits))
    cols = ["method", "bits", "model", "subset", "layer", "prob", "prob_lo", "prob_hi", "rank", "rank_lo",
            "rank_hi", "n"]
    return LensResult(pd.concat(rows, ignore_index=True)[cols], pd.concat(prompts, ignore_index=True))


def save_lens(res: LensResult, out, meta: dict, title: str = "") -> None:
    """Write ``lens.json`` (meta, rows), ``lens.csv``, ``lens_prompts.csv`` and ``lens.png``."""
    save_analysis(out, "lens", meta, res.rows, figures={"lens": lens_figure(res.rows, title)})
    write_csv(Path(out) / "lens_prompts.csv", res.prompts)


def findings(rows: pd.DataFrame, method: str) -> dict:
    """Per width of ``method``, on its Failure subset (and Robust where it has one): where the
    answer peaks and how strongly, quantized against the reference, keyed ``w<bits>_<name>``.
    ``w<bits>_forms``: the quantized model's median rank reaches the top 5 at some layer. A subset
    with no prompts gets ``n`` 0, NaN numbers and None claims."""
    out: dict = {}
    names = ("n", "peak_layer", "peak_prob", "fp_peak_layer", "fp_peak_prob", "peak_ratio", "best_rank", "forms",
             "final_prob")
    for b, g in rows[rows.method == method].groupby("bits", sort=False):
        for sub in ("failure", "robust"):
            s = g[g.subset == sub]
            key = f"w{b}_{sub}"
            if s.empty:  # no prompt in this subset: the keys exist, with no value
                out.update({f"{key}_{n}": 0 if n == "n" else None if n == "forms" else float("nan") for n in names})
                continue
            q, fp = s[s.model == "quantized"].set_index("layer"), s[s.model == "fp"].set_index("layer")
            out[f"{key}_n"] = int(q.n.iloc[0])
            out[f"{key}_peak_layer"] = int(q.prob.idxmax())
            out[f"{key}_peak_prob"] = float(q.prob.max())
            out[f"{key}_fp_peak_layer"] = int(fp.prob.idxmax())
            out[f"{key}_fp_peak_prob"] = float(fp.prob.max())
            out[f"{key}_peak_ratio"] = float(q.prob.max() / fp.prob.max()) if fp.prob.max() > 0 else float("nan")
            out[f"{key}_best_rank"] = float(q["rank"].min())
            out[f"{key}_forms"] = bool(q["rank"].min() <= TOP_K)
            out[f"{key}_final_prob"] = float(q.prob.iloc[-1])
    return out
