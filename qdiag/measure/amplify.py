"""Peak signal amplification (a training-free repair, at inference time).

The logit lens (final norm applied) at a "peak" layer is added to the output logits with weight
alpha, ``logits = out + alpha * lens(peak)`` (a product of experts: ``p ~ p_out * p_peak^alpha``).
The peak is either one fixed layer, or, per prompt, the most confident layer in the upper half of
the network (highest top-1 probability, the last layer excluded), so it needs no knowledge of the
answer. The layer, the rule and alpha are chosen on held-out facts (``choose_amplification``) and
scored on the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn

from ..core import positions as P
from ..core.arch import resolve
from .readout import project
from .trace import collect

ALPHAS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 9.0)


@torch.no_grad()
def amplification_grid(model: nn.Module, table: pd.DataFrame, alphas: Sequence[float] = ALPHAS,
                       batch_size: int = 16) -> pd.DataFrame:
    """For every prompt of ``table`` (``prompt``, ``answer_id``, ``fact``, ``template``) and every
    (rule, layer, alpha) candidate, whether ``out + alpha * lens(peak)`` puts the answer on top.
    Rules: ``fixed`` (peak = ``layer``, each layer of the upper half but the last) and
    ``confident`` (per prompt, the upper-half layer with the highest top-1 probability; ``layer``
    -1). Run it inside ``qw.applied(model)`` to amplify a quantized model."""
    arch = resolve(model)
    n = arch.n_layers
    upper = list(range(n // 2, n - 1))
    if not upper:
        raise ValueError("the model has too few layers for a peak layer below the last")
    out = []
    for start in range(0, len(table), batch_size):
        chunk = table.iloc[start : start + batch_size]
        batch = P.encode(model.tokenizer, chunk.prompt.tolist())
        last = torch.full((len(chunk), 1), batch["input_ids"].shape[1] - 1)
        resid = collect(model, batch, ("resid",), layers=upper + [n - 1], tokens=last)["resid"]
        logits = torch.stack([project(model, h[:, 0]) for h in resid], 1).cpu()  # (B, U+1, V)
        final, lens = logits[:, -1], logits[:, :-1]
        answer = torch.tensor(chunk.answer_id.to_numpy())
        confident = torch.softmax(lens, -1).amax(-1).argmax(1)  # (B,) index into upper
        peak_conf = lens[torch.arange(len(chunk)), confident]
        ident = {"fact": chunk.fact.to_numpy(), "template": chunk.template.to_numpy()}
        for alpha in alphas:
            for rule, layer, peak in [("fixed", upper[j], lens[:, j]) for j in range(len(upper))] + [
                    ("confident", -1, peak_conf)]:
                pred = (final + alpha * peak).argmax(-1)
                out.append(pd.DataFrame({**ident, "rule": rule, "layer": layer, "alpha": alpha,
                                         "correct": (pred == answer).numpy()}))
    return pd.concat(out, ignore_index=True)


def choose_amplification(grid: pd.DataFrame, facts: Sequence[str]) -> dict:
    """The (rule, layer, alpha) with the best accuracy on the prompts of ``facts`` (ids) only; ties
    go to the smaller alpha, then the ``confident`` rule, then the earlier layer."""
    d = grid[grid.fact.isin(set(facts))]
    if d.empty:
        raise ValueError("no held-out prompts to choose the amplification on")
    acc = d.groupby(["rule", "layer", "alpha"], as_index=False).correct.mean()
    acc["rule_order"] = (acc.rule != "confident").astype(int)
    best = acc.sort_values(["correct", "alpha", "rule_order", "layer"], ascending=[False, True, True, True]).iloc[0]
    return {"rule": best.rule, "layer": int(best.layer), "alpha": float(best.alpha),
            "held_out_acc": float(best.correct), "held_out_facts": sorted(set(d.fact))}
