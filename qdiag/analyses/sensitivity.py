"""Sensitivity and the "first domino" (analysis 6 of the paper): quantize one layer, one weight
type, or a prefix of layers 0..k, leave everything else in full precision, and see which part
breaks the answers.

Subsets come from the reference and the fully quantized model at the same width: ``robust``
(both right) and ``failure`` (reference right, quantized wrong). ``robust_acc`` is the share of
Robust prompts a partly quantized model still gets right (1 with nothing quantized, 1 with
everything quantized, by definition); ``failure_acc`` the share of Failure prompts it gets right
(1 with nothing quantized, 0 with everything).

The sweep quantizes the whole model once and takes each configuration's matrices from that run,
so nothing is quantized twice. For RTN this is exactly quantizing those matrices alone; for GPTQ
each matrix was calibrated on inputs from the *quantized* layers before it (as in the full run),
not from full-precision ones, which is the deployment-faithful choice for prefixes and an
approximation for a single quantized layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.arch import resolve
from ..core.data import Fact
from ..core.io import save_analysis
from ..measure import evaluate as ev
from ..measure.widths import Reference, check_configs, each_width, quantized_only
from ..quant.plan import Plan, avg_bits, uniform_plan
from ..quant.quantize import FULL_PRECISION, QuantSpec
from ..quant.swap import QuantizedWeights
from ..report.plots import sensitivity_figure

SCOPES = ("layer", "weight_type", "prefix")


def sensitivity_plans(model: nn.Module, spec: QuantSpec, scope: str) -> list[tuple[str, Plan]]:
    """``(target, plan)`` per configuration of a scope: ``layer`` -> "0", "1", ...; ``weight_type``
    -> "q", "k", ...; ``prefix`` -> "0-0", "0-1", ... (layers 0..k)."""
    arch = resolve(model)
    if scope == "layer":
        return [(str(i), uniform_plan(model, spec, layers=[i])) for i in range(arch.n_layers)]
    if scope == "weight_type":
        return [(t, uniform_plan(model, spec, weight_types=[t])) for t in arch.weight_types]
    if scope == "prefix":
        return [(f"0-{k}", uniform_plan(model, spec, layers=range(k + 1))) for k in range(arch.n_layers)]
    raise ValueError(f"unknown scope {scope!r}; choose from {', '.join(SCOPES)}")


@dataclass
class SensitivityResult:
    """``rows``: one per (scope, target); ``prompts``: per configuration and prompt, ``correct``."""

    rows: pd.DataFrame
    prompts: pd.DataFrame


def check(scopes: Sequence[str]) -> None:
    """Raise on scopes the sweep does not know."""
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ValueError(f"unknown scopes {bad or list(scopes)}; choose from {', '.join(SCOPES)}")


def run_sensitivity(model: nn.Module, facts: list[Fact], specs: list[QuantSpec], calib: torch.Tensor | None = None,
                    scopes: Sequence[str] = SCOPES, ppl_tokens: torch.Tensor | None = None, ppl_window: int = 512,
                    seed: int = 0, progress: bool = True) -> SensitivityResult:
    """For each quantized spec, every configuration of the scopes, plus ``none`` (the reference)
    and ``all`` (every layer); full-precision specs are skipped."""
    check(scopes)
    specs = check_configs(model, quantized_only(specs))
    ref = Reference(model, facts)
    rows, prompts = [], []
    for w in each_width(model, specs, calib, progress=progress, desc="sensitivity"):
        # an existing checkpoint has no spec: its own matrices are swapped in scope by scope (its other
        # changes, norms and embeddings, only in "all")
        spec = w.spec if w.checkpoint is None else QuantSpec(FULL_PRECISION)
        configs = [("none", "-", {}), ("all", "all", w.plan or dict.fromkeys(w.weights.tensors, spec))]
        for scope in scopes:
            configs += [(scope, target, plan) for target, plan in sensitivity_plans(model, spec, scope)]
        right = ref.reference_right(ref.score(model, w))
        subset = right[["fact", "template", "subset"]]
        right = right.drop(columns="subset")
        for scope, target, plan in tqdm(configs, desc=f"sensitivity {w.method} {w.bits}-bit", disable=not progress,
                                        leave=False):
            if w.checkpoint is not None:
                qw = w.weights if scope == "all" else QuantizedWeights({}, {n: w.weights.tensors[n] for n in plan})
                bits = w.checkpoint.avg_bits_of(model, plan) if scope != "all" else w.avg_bits
            else:
                qw = QuantizedWeights(plan, {n: w.weights.tensors[n] for n in plan}) if plan else None
                bits = avg_bits(model, plan)
            with qw.applied(model) if qw and plan else nullcontext():
                scored = ev.score_prompts(model, model.tokenizer, right)
                ppl = ev.perplexity(model, ppl_tokens, ppl_window) if ppl_tokens is not None else float("nan")
            rows.append({"scope": scope, "target": target, "method": w.method, "bits": w.bits,
                         "avg_bits": bits, "ppl": ppl, **ev.subset_accuracy(scored, subset, seed)})
            prompts.append(scored[["fact", "template", "correct"]].assign(method=w.method, bits=w.bits, scope=scope,
                                                                       target=target))
    return SensitivityResult(pd.DataFrame(rows), pd.concat(prompts, ignore_index=True))


def first_domino(rows: pd.DataFrame) -> dict:
    """Where the failure starts, read on the prompts the reference gets right (Robust and Failure
    together, weighted by size): the single layer and the weight type whose quantization alone
    keeps the fewest of them right, and the shortest prefix 0..k that keeps half or fewer."""
    def kept(d: pd.DataFrame) -> pd.Series:
        nr, nf = d.n_robust.fillna(0), d.n_failure.fillna(0)
        return (d.robust_acc.fillna(0) * nr + d.failure_acc.fillna(0) * nf) / (nr + nf)

    out: dict = {}
    for scope, name in (("layer", "worst_layer"), ("weight_type", "worst_weight_type")):
        d = rows[rows.scope == scope]
        if len(d):
            k = kept(d)
            worst = d.loc[k.idxmin()]
            out[name] = int(worst.target) if scope == "layer" else str(worst.target)
            out[f"{name}_kept"] = float(k.min())
    prefix = rows[rows.scope == "prefix"]
    half = prefix[kept(prefix) <= 0.5] if len(prefix) else prefix
    out["half_prefix_end"] = int(half.target.iloc[0].split("-")[1]) if len(half) else None
    return out


def save_sensitivity(res: SensitivityResult, out: str | Path, meta: dict, title: str = "") -> None:
    """Write ``sensitivity.json`` (meta, rows, first_domino), ``sensitivity.csv`` and a figure."""
    save_analysis(out, "sensitivity", meta, res.rows, extra={"first_domino": first_domino(res.rows)},
                  figures={"sensitivity": sensitivity_figure(res.rows, title)})



def findings(rows: pd.DataFrame, method: str, bits: int, n_layers: int) -> dict:
    """The domino numbers and the paper's claims as booleans for one width, keyed ``w<bits>_<name>``:
    the prefixes 0..0, 0..1 and 0..5 (the paper's table), the most fragile layer and weight type,
    whether that layer is in the first quarter of the network."""
    d = rows[(rows.method == method) & (rows.bits == bits)]
    key = f"w{bits}"
    out: dict = {f"{key}_n_robust": int(d.n_robust.iloc[0]), f"{key}_n_failure": int(d.n_failure.iloc[0])}
    for k in (0, 1, 5):
        r = d[(d.scope == "prefix") & (d.target == f"0-{k}")]
        for name in ("robust", "failure"):
            out[f"{key}_prefix{k}_{name}"] = float(r[f"{name}_acc"].iloc[0]) if len(r) else float("nan")
    dom = first_domino(d)
    out[f"{key}_worst_layer"] = dom.get("worst_layer")
    out[f"{key}_worst_layer_early"] = (dom["worst_layer"] < n_layers / 4) if "worst_layer" in dom else None
    out[f"{key}_worst_weight_type"] = dom.get("worst_weight_type")
    out[f"{key}_worst_is_down_or_v"] = (dom["worst_weight_type"] in ("down", "v")) if "worst_weight_type" in dom \
        else None
    out[f"{key}_half_prefix_end"] = dom.get("half_prefix_end")
    return out
