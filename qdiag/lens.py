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

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from . import evaluate as ev
from . import positions as P
from .arch import Arch, resolve, unwrap
from .data import Fact
from .plan import check_specs, uniform_plan
from .quantize import QuantSpec
from .swap import quantize_model
from .trace import collect


def project(model: nn.Module, hidden: torch.Tensor, final_norm: bool = True, arch: Arch | None = None) -> torch.Tensor:
    """Logits of ``hidden (..., d_model)`` as if it were the last layer's output: ``(..., vocab)``,
    on the unembedding's device (``hidden`` is moved there, in the model's dtype)."""
    hf = unwrap(model)
    arch = arch or resolve(hf)
    unembed = hf.get_submodule(arch.unembed)
    hidden = hidden.to(unembed.weight.device, unembed.weight.dtype)
    h = hf.get_submodule(arch.final_norm)(hidden) if final_norm else hidden
    logits = unembed(h).float()
    cap = getattr(getattr(hf.config, "text_config", None) or hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def prob_and_rank(logits: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability and rank (1 = top) of ``answer`` under ``logits (..., vocab)``; ``answer (...)``."""
    target = logits.gather(-1, answer[..., None])
    rank = 1 + (logits > target).sum(-1)
    prob = torch.softmax(logits, -1).gather(-1, answer[..., None])[..., 0]
    return prob, rank


@torch.no_grad()
def logit_lens(model, batch: dict, answer: torch.Tensor, final_norm: bool = True,
               arch: Arch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability and rank of each prompt's ``answer`` token at every layer, read at the last
    token: two ``(batch, layers)`` tensors."""
    arch = arch or resolve(model)
    last = torch.full((batch["input_ids"].shape[0], 1), batch["input_ids"].shape[1] - 1)
    resid = collect(model, batch, ("resid",), arch=arch, tokens=last)["resid"]
    dtype = next(unwrap(model).parameters()).dtype
    device = next(unwrap(model).parameters()).device
    probs, ranks = [], []
    for h in resid:
        logits = project(model, h[:, 0].to(device, dtype), final_norm, arch)
        p, r = prob_and_rank(logits, answer.to(device))
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


def _lens_all(model, chunks: list[pd.DataFrame], final_norm: bool, arch: Arch, progress: bool,
              desc: str) -> pd.DataFrame:
    out = []
    for chunk in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        batch = P.encode(model.tokenizer, chunk.prompt.tolist())
        prob, rank = logit_lens(model, batch, torch.tensor(chunk.answer_id.to_numpy()), final_norm, arch)
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


def run_lens(model, facts: list[Fact], specs: list[QuantSpec], calib: torch.Tensor | None = None,
             final_norm: bool = True, batch_size: int = 16, seed: int = 0, progress: bool = True) -> LensResult:
    """The logit lens of the reference and of each configuration, on each configuration's Robust
    and Failure subsets (and on all prompts). Subsets come from the output's greedy answer."""
    tok = model.tokenizer
    arch = resolve(model)
    check_specs(model, specs, arch)
    table = ev.prompt_table(facts, tok)
    chunks = P.batches(table, facts, batch_size)
    key = ["fact", "template"]
    fp_scored = ev.score_prompts(model, tok, table, progress=progress)
    fp_lens = _lens_all(model, chunks, final_norm, arch, progress, "logit lens fp")
    rows, prompts = [], []
    for spec in tqdm(specs, desc="logit lens", disable=not progress):
        method = "fp" if spec.is_full_precision else spec.method
        if spec.is_full_precision:
            scored, q_lens = fp_scored, fp_lens
        else:
            qw = quantize_model(model, uniform_plan(model, spec, arch=arch), calib, progress=progress)
            with qw.applied(model):
                scored = ev.score_prompts(model, tok, table, progress=progress)
                q_lens = _lens_all(model, chunks, final_norm, arch, progress, f"logit lens {method} {spec.bits}-bit")
            del qw
        subset = ev.subsets(fp_scored, scored).reset_index()
        models = {"fp": fp_lens} if spec.is_full_precision else {"fp": fp_lens, "quantized": q_lens}
        for name, lens_rows in models.items():
            d = lens_rows.merge(subset, on=key)
            for sub, g in [("robust", d[d.subset == "robust"]), ("failure", d[d.subset == "failure"]), ("all", d)]:
                if len(g):
                    rows.append(summarize(g, seed).assign(method=method, bits=spec.bits, model=name, subset=sub))
        prompts.append(q_lens.merge(subset, on=key).assign(method=method, bits=spec.bits))
    cols = ["method", "bits", "model", "subset", "layer", "prob", "prob_lo", "prob_hi", "rank", "rank_lo",
            "rank_hi", "n"]
    return LensResult(pd.concat(rows, ignore_index=True)[cols], pd.concat(prompts, ignore_index=True))


def save_lens(res: LensResult, out, meta: dict, title: str = "") -> None:
    """Write ``logit_lens.json`` (meta, rows), ``logit_lens.csv``, ``logit_lens_prompts.csv`` and
    ``logit_lens.png``."""
    from pathlib import Path

    from .io import save_analysis, write_csv
    from .plots import lens_figure

    save_analysis(out, "logit_lens", meta, res.rows, figures={"logit_lens": lens_figure(res.rows, title)})
    write_csv(Path(out) / "logit_lens_prompts.csv", res.prompts)


# As in the cliff chapter: an answer within the top 5 is "present" (cliff.TOP_K).
TOP_K = 5


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
