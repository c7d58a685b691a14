"""Training-free repairs (analysis 7 of the paper), each priced in average bits so it can be set
beside uniform quantization at the same budget.

- ``protect_first``: the first k layers at a higher width (the paper keeps layers 0-1 at 8 bits).
- ``protect_kurtosis``: matrices whose weights are outlier-heavy (excess kurtosis above a
  threshold) at a higher width. ``granularity="matrix"``: the kurtosis of all the matrix's
  weights; ``"channel"``: the largest kurtosis of any output channel (row).
- EoRA-style low-rank compensation of each matrix's error (``qdiag.eora``).
- Peak signal amplification, an inference-time intervention (``qdiag.amplify``).
- Clean-signal injection at 2 bits: not deployable (it needs the reference), the paper's last try.
- ``matching_uniform``: the plain uniform configuration (same width, a smaller group) whose
  average bits are closest to a repair's, for a fair comparison.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import positions as P
from ..core.arch import resolve, unwrap, weight_matrix
from ..core.data import Fact
from ..core.io import save_analysis
from ..measure import evaluate as ev
from ..measure.amplify import ALPHAS, amplification_grid, choose_amplification
from ..measure.patch import Edit, Rerun
from ..measure.trace import collect
from ..measure.widths import Reference, Width, check_configs, each_width, quantized_only
from ..quant import remedy
from ..quant.eora import eora, eora_avg_bits
from ..quant.plan import Plan, avg_bits, uniform_plan
from ..quant.quantize import QuantSpec
from ..quant.quantizer import quantize_model, requantize
from ..quant.swap import QuantizedWeights
from ..report.plots import pareto_figure


def protect_first(model: nn.Module, spec: QuantSpec, k: int, high_bits: int = 8) -> Plan:
    """``spec`` everywhere, except layers ``0..k-1`` at ``high_bits`` (same group size)."""
    arch = resolve(model)
    if not 0 <= k <= arch.n_layers:
        raise ValueError(f"k must be in 0..{arch.n_layers}, got {k}")
    plan = uniform_plan(model, spec)
    high = spec.at_bits(high_bits)
    plan.update({n: high for n in arch.linear_names(list(range(k)))})
    return plan


def excess_kurtosis(w: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Excess kurtosis ``E[(x - mu)^4] / sigma^4 - 3`` of all entries, or along ``dim`` (0 for a normal
    distribution; large for heavy tails / outliers)."""
    w = w.double()
    mu = w.mean() if dim is None else w.mean(dim, keepdim=True)
    d = w - mu
    m2 = d.pow(2).mean() if dim is None else d.pow(2).mean(dim)
    m4 = d.pow(4).mean() if dim is None else d.pow(4).mean(dim)
    return m4 / m2.pow(2) - 3


def kurtosis_table(model: nn.Module) -> pd.DataFrame:
    """Per decoder weight matrix: ``layer``, ``weight_type``, ``kurtosis`` (whole matrix) and
    ``max_channel_kurtosis`` (its most outlier-heavy output row)."""
    arch = resolve(model)
    hf = unwrap(model)
    rows = []
    for i, types in enumerate(arch.weights):
        for t, name in types.items():
            w = weight_matrix(hf.get_submodule(name)).detach()
            rows.append({"module": name, "layer": i, "weight_type": t, "kurtosis": float(excess_kurtosis(w)),
                         "max_channel_kurtosis": float(excess_kurtosis(w, dim=1).max())})
    return pd.DataFrame(rows)


def protect_kurtosis(model: nn.Module, spec: QuantSpec, threshold: float, granularity: str = "matrix",
                     high_bits: int = 8, table: pd.DataFrame | None = None) -> Plan:
    """``spec`` everywhere, except matrices whose kurtosis (see ``granularity``) exceeds ``threshold``."""
    column = {"matrix": "kurtosis", "channel": "max_channel_kurtosis"}.get(granularity)
    if column is None:
        raise ValueError(f"granularity must be 'matrix' or 'channel', got {granularity!r}")
    table = kurtosis_table(model) if table is None else table
    plan = uniform_plan(model, spec)
    high = spec.at_bits(high_bits)
    plan.update({n: high for n in table.module[table[column] > threshold]})
    return plan


def threshold_for_share(table: pd.DataFrame, share: float, granularity: str = "matrix") -> float:
    """The kurtosis threshold above which ``share`` of the matrices lie (a rule stated before
    looking at any result: protect the most outlier-heavy ``share`` of the matrices)."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    column = {"matrix": "kurtosis", "channel": "max_channel_kurtosis"}[granularity]
    return float(table[column].quantile(1 - share))


GROUP_CANDIDATES = (256, 128, 96, 64, 48, 32, 16)


def matching_uniform(model: nn.Module, spec: QuantSpec, target_bits: float,
                     candidates: Sequence[int] = GROUP_CANDIDATES) -> tuple[QuantSpec, float]:
    """The uniform ``spec`` with the group size (from ``candidates``, ones that fit every layer)
    whose average bits are closest to ``target_bits``, and those bits."""
    if spec.is_gguf:  # a GGUF type fixes its block size: the type itself is the only uniform match
        return spec, avg_bits(model, uniform_plan(model, spec))
    arch = resolve(model)
    hf = unwrap(model)
    smallest = min(weight_matrix(hf.get_submodule(n)).shape[1] for n in arch.linear_names())
    best = None
    for g in candidates:
        if g > smallest:
            continue
        s = QuantSpec(spec.bits, g, spec.sym, spec.method)
        bits = avg_bits(model, uniform_plan(model, s))
        if best is None or abs(bits - target_bits) < abs(best[1] - target_bits):
            best = (s, bits)
    if best is None:
        raise ValueError(f"no candidate group size fits the smallest layer ({smallest} inputs)")
    return best


def split_facts(facts: list[Fact], held_out: float = 0.5, seed: int = 0) -> tuple[list[Fact], list[Fact]]:
    """Facts for choosing a repair's settings, and disjoint facts for scoring it (seeded, per relation)."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    rng = random.Random(seed)
    by_rel: dict[str, list[Fact]] = {}
    for f in facts:
        by_rel.setdefault(f.relation, []).append(f)
    choose, score = [], []
    for rel in sorted(by_rel):
        group = rng.sample(by_rel[rel], len(by_rel[rel]))
        cut = round(len(group) * held_out)
        choose += group[:cut]
        score += group[cut:]
    return choose, score


@dataclass
class RepairResult:
    """``rows``: one per repair configuration, scored on the facts of ``scored_facts`` (never the
    ones amplification was chosen on), each beside the uniform configuration of the closest
    average bits (``baseline_*``)."""

    rows: pd.DataFrame
    choice: list[dict]  # per width: what amplification chose, and on which facts
    held_out_facts: list[str]
    scored_facts: list[str]


def check(eora_ranks: Sequence[int], held_out: float, inject_layer: int | None = None) -> None:
    """Raise on repair options that cannot run (before any work)."""
    if any(r < 1 for r in eora_ranks):
        raise ValueError("EoRA ranks must be at least 1")
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    if inject_layer is not None and inject_layer < 1:
        raise ValueError(f"inject_layer must be at least 1, got {inject_layer}")


def run_repair(model: nn.Module, facts: list[Fact], specs: list[QuantSpec], calib: torch.Tensor | None = None,
               ppl_tokens: torch.Tensor | None = None, ppl_window: int = 512, protect_k: Sequence[int] = (1, 2),
               kurtosis_thresholds: Sequence[float] = (), granularity: str = "matrix",
               eora_ranks: Sequence[int] = (), alphas: Sequence[float] = ALPHAS, inject_layer: int | None = None,
               held_out: float = 0.5, seed: int = 0, progress: bool = True) -> RepairResult:
    """For each quantized spec, each repair of its quantized model, its Failure / Robust accuracy on
    the scored facts and its perplexity, next to uniform quantization at the same average bits.
    Full-precision specs are skipped."""
    check(eora_ranks, held_out, inject_layer)
    specs = check_configs(model, quantized_only(specs))
    choose, score = split_facts(facts, held_out, seed)
    ref = Reference(model, facts)
    rows, choices = [], []
    for w in each_width(model, specs, calib, progress, desc="repair"):
        out, choice = _repair_width(model, ref, w, choose, score, calib, ppl_tokens, ppl_window, protect_k,
                                    kurtosis_thresholds, granularity, eora_ranks, alphas, inject_layer, seed, progress)
        rows.append(out)
        choices.append({"method": w.method, "bits": w.bits, **choice})
    return RepairResult(pd.concat(rows, ignore_index=True), choices, sorted({f.id for f in choose}),
                        sorted({f.id for f in score}))


def _repair_width(model: nn.Module, ref: Reference, w: Width, choose: list[Fact], score: list[Fact],
                  calib: torch.Tensor | None, ppl_tokens: torch.Tensor | None, ppl_window: int,
                  protect_k: Sequence[int], kurtosis_thresholds: Sequence[float], granularity: str,
                  eora_ranks: Sequence[int], alphas: Sequence[float], inject_layer: int | None, seed: int,
                  progress: bool) -> tuple[pd.DataFrame, dict]:
    tok = model.tokenizer
    score_ids = {f.id for f in score}
    plain = w.weights
    right = ref.reference_right(ref.score(model, w))
    subset = right[["fact", "template", "subset"]]
    right = right.drop(columns="subset")
    scored_right = right[right.fact.isin(score_ids)]
    if scored_right.empty:
        raise ValueError("the reference answers none of the scored facts' prompts correctly; use more facts")

    def evaluate(qw, amplify: dict | None = None) -> dict:
        with qw.applied(model) if qw is not None else nullcontext():
            if amplify is None:
                scored = ev.score_prompts(model, tok, scored_right)
            else:
                grid = amplification_grid(model, scored_right, alphas=[amplify["alpha"]])
                pick = grid[(grid.rule == amplify["rule"]) & (grid.layer == amplify["layer"])]
                scored = pick[["fact", "template", "correct"]]
            ppl = ev.perplexity(model, ppl_tokens, ppl_window) if ppl_tokens is not None else float("nan")
        return {"ppl": ppl, **ev.subset_accuracy(scored, subset, seed)}

    if w.checkpoint is None:
        rows, plain_bits, baseline = _repaired_quantization(model, w, evaluate, calib, protect_k, kurtosis_thresholds,
                                                            granularity, eora_ranks, progress)
    else:
        rows, plain_bits = _repaired_checkpoint(model, w, evaluate, calib, protect_k, kurtosis_thresholds,
                                                granularity, eora_ranks, progress)
        baseline = _no_baseline  # qdiag has no quantizer of the checkpoint's own kind to compare with
    # peak amplification: chosen on the held-out facts, scored on the others
    with plain.applied(model):
        grid = amplification_grid(model, right[~right.fact.isin(score_ids)], alphas=alphas)
    choice = choose_amplification(grid, [f.id for f in choose])
    rows.append({"repair": "amplify", "params": {k: choice[k] for k in ("rule", "layer", "alpha")},
                 "avg_bits": plain_bits, **evaluate(plain, amplify=choice), **baseline(plain_bits)})
    if inject_layer is not None:
        rows.append({"repair": "inject", "params": {"layer": inject_layer}, "avg_bits": float("nan"),
                     **_injection_accuracy(model, plain, scored_right, subset, inject_layer, seed)})
    out = pd.DataFrame(rows)
    # "beats uniform": more Failure prompts right than uniform at the closest bits, and no fewer Robust ones
    if "baseline_failure_acc" in out:
        beats = (out.failure_acc > out.baseline_failure_acc) & (out.robust_acc >= out.baseline_robust_acc)
        out["beats_uniform"] = beats.astype(object)
        out.loc[out.repair.isin(["none", "inject"]), "beats_uniform"] = None
    else:  # an existing checkpoint: no uniform quantization of its kind to compare with
        out["beats_uniform"] = None
    out.insert(0, "bits", w.bits)
    out.insert(0, "method", w.method)
    out["params"] = out.params.map(lambda p: ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in p.items()))
    return out, choice


def _no_baseline(bits: float) -> dict:
    return {}


def _repaired_quantization(model: nn.Module, w: Width, evaluate, calib: torch.Tensor | None,
                           protect_k: Sequence[int], kurtosis_thresholds: Sequence[float], granularity: str,
                           eora_ranks: Sequence[int], progress: bool):
    """The repairs of one of qdiag's own quantizations, each beside uniform quantization at the
    closest bits: the rows, the width's own bits and the baseline lookup (for amplification)."""
    spec, plain_plan, plain = w.spec, w.plan, w.weights
    configs: list[tuple[str, dict, object]] = [("none", {}, None)]
    configs += [("protect_first", {"k": k}, protect_first(model, spec, k)) for k in protect_k]
    if kurtosis_thresholds:
        kt = kurtosis_table(model)
        configs += [("protect_kurtosis", {"threshold": t, "granularity": granularity},
                     protect_kurtosis(model, spec, t, granularity, table=kt)) for t in kurtosis_thresholds]
    configs += [("eora", {"rank": r}, r) for r in eora_ranks]
    plain_bits = avg_bits(model, plain_plan)
    bits_of = [plain_bits if name == "none" else eora_avg_bits(model, plain_plan, what)
               if name == "eora" else avg_bits(model, what) for name, _, what in configs]

    # uniform quantization at the closest bits: the other group sizes first, quantized and scored one at
    # a time while this width's own weights wait in host memory (one configuration on the GPU at a time)
    matches = {m.group_size: (m, b)
               for m, b in (matching_uniform(model, spec, bits) for bits in [*bits_of, plain_bits])}
    baselines: dict[int | None, dict] = {}
    with plain.parked() if any(m != spec for m, _ in matches.values()) else nullcontext():
        for g, (match, match_bits) in matches.items():
            if match != spec:
                qw = quantize_model(model, uniform_plan(model, match), calib, progress=progress)
                baselines[g] = {"baseline_group_size": g, "baseline_avg_bits": match_bits,
                                **{f"baseline_{k}": v for k, v in evaluate(qw).items()}}
                del qw

    def baseline(bits: float) -> dict:
        match, match_bits = matching_uniform(model, spec, bits)
        if match.group_size not in baselines:  # the width itself
            baselines[match.group_size] = {"baseline_group_size": match.group_size, "baseline_avg_bits": match_bits,
                                           **{f"baseline_{k}": v for k, v in evaluate(plain).items()}}
        return baselines[match.group_size]

    corrected = eora(model, plain, calib, eora_ranks) if eora_ranks else {}
    rows = []
    for (name, params, what), bits in tqdm(list(zip(configs, bits_of)), desc=f"repairs {spec.method} {spec.bits}-bit",
                                           disable=not progress, leave=False):
        qw = plain if name == "none" else corrected[what] if name == "eora" else requantize(model, plain, what)
        rows.append({"repair": name, "params": params, "avg_bits": bits, **evaluate(qw), **baseline(bits)})
    return rows, plain_bits, baseline


def _repaired_checkpoint(model: nn.Module, w: Width, evaluate, calib: torch.Tensor | None, protect_k: Sequence[int],
                         kurtosis_thresholds: Sequence[float], granularity: str, eora_ranks: Sequence[int],
                         progress: bool):
    """The same repairs of an existing checkpoint (``quant.remedy``): protected matrices re-exported
    from the base at 8 bits in its family, EoRA against the base; no uniform baseline (qdiag has
    no quantizer of the checkpoint's own to compare with). The rows and the checkpoint's bits."""
    ckpt, arch = w.checkpoint, resolve(model)
    remedy.check(ckpt)
    configs: list[tuple[str, dict, object]] = [("none", {}, None)]
    configs += [("protect_first", {"k": k}, arch.linear_names(list(range(k)))) for k in protect_k]
    if kurtosis_thresholds:
        kt = kurtosis_table(model)
        column = {"matrix": "kurtosis", "channel": "max_channel_kurtosis"}[granularity]
        configs += [("protect_kurtosis", {"threshold": t, "granularity": granularity},
                     kt.module[kt[column] > t].tolist()) for t in kurtosis_thresholds]
    corrected = remedy.correct(model, ckpt, calib, eora_ranks) if eora_ranks else {}
    configs += [("eora", {"rank": r}, r) for r in eora_ranks]
    rows = []
    for name, params, what in tqdm(configs, desc=f"repairs {w.method}", disable=not progress, leave=False):
        qw, bits = (w.weights, w.avg_bits) if name == "none" else corrected[what] if name == "eora" else \
            remedy.protect(model, ckpt, what)
        rows.append({"repair": name, "params": params, "avg_bits": bits, **evaluate(qw)})
    return rows, w.avg_bits


def _injection_accuracy(model: nn.Module, qw: QuantizedWeights, prompts: pd.DataFrame, subset: pd.DataFrame,
                        layer: int, seed: int) -> dict:
    """Accuracy when the reference's residual stream (every token) enters the quantized model at
    ``layer``: not a deployable repair (it needs the reference), the paper's last 2-bit attempt."""
    arch = resolve(model)
    if not 1 <= layer < arch.n_layers:
        raise ValueError(f"inject_layer must be in 1..{arch.n_layers - 1}, got {layer}")
    out = []
    for start in range(0, len(prompts), 8):
        chunk = prompts.iloc[start : start + 8]
        batch = P.encode(model.tokenizer, chunk.prompt.tolist())
        fp = collect(model, batch, ("resid",), layers=[layer - 1])["resid"][0]
        with qw.applied(model):
            logits, _ = Rerun(model, batch).run([[Edit(layer - 1, "resid", None, fp)]])
        right = logits[0].argmax(-1).cpu() == torch.tensor(chunk.answer_id.to_numpy())
        out.append(chunk[["fact", "template"]].assign(correct=right.numpy()))
    return {"ppl": float("nan"), **ev.subset_accuracy(pd.concat(out), subset, seed)}


def save_repair(res: RepairResult, out, meta: dict, title: str = "") -> None:
    """Write ``repair.json`` (meta, rows, the amplification choice and the fact split),
    ``repair.csv`` and the Pareto figure ``repair.png``."""
    save_analysis(out, "repair", meta, res.rows, extra={"amplification": res.choice,
                                                         "held_out_facts": res.held_out_facts,
                                                         "scored_facts": res.scored_facts},
                  figures={"repair": pareto_figure(res.rows, title)})


def findings(rows: pd.DataFrame, bits: int) -> dict:
    """One width's repair results for the prose, keyed ``w<bits>_<name>``: which repairs beat uniform
    quantization at the closest bits, the best Failure accuracy of a deployable repair and which,
    whether any gets a tenth of the Failure prompts back ("repairable" in the paper's loose sense),
    and, apart, clean-signal injection's (not deployable: it needs the reference model)."""
    d = rows[rows.bits == bits]
    key = f"w{bits}"
    named = d.repair + d.params.map(lambda p: f" ({p})" if p else "")
    tried = d[~d.repair.isin(["none", "inject"])]
    out: dict = {f"{key}_n_failure": int(d.n_failure.iloc[0]), f"{key}_n_robust": int(d.n_robust.iloc[0])}
    beats = named[d.beats_uniform.eq(True)].tolist()
    out[f"{key}_beats"] = ", ".join(beats) if beats else "none"
    fails = named[d.beats_uniform.eq(False)].tolist()
    out[f"{key}_does_not_beat"] = ", ".join(fails) if fails else "none"
    if len(tried):
        best = tried.loc[tried.failure_acc.idxmax()]
        out[f"{key}_best_failure_acc"] = float(best.failure_acc)
        out[f"{key}_best_repair"] = f"{best.repair} ({best.params})"
        out[f"{key}_any_repairs"] = bool(best.failure_acc >= 0.1)
    inject = d[d.repair == "inject"]
    out[f"{key}_inject_acc"] = float(inject.failure_acc.iloc[0]) if len(inject) else float("nan")
    return out
