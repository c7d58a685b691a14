"""Training-free repairs (analysis 7 of the paper), each priced in average bits so it can be set
beside uniform quantization at the same budget.

- ``protect_first``: the first k layers at a higher width (the paper keeps layers 0-1 at 8 bits).
- ``protect_kurtosis``: matrices whose weights are outlier-heavy (excess kurtosis above a
  threshold) at a higher width. ``granularity="matrix"``: the kurtosis of all the matrix's
  weights; ``"channel"``: the largest kurtosis of any output channel (row).
- ``eora``: EoRA-style low-rank compensation. For each matrix, the quantization error
  ``E = W - Q`` is projected on the eigenspace of its calibration inputs (``X^T X = U L U^T``), the
  rank-r SVD of ``E U L^1/2`` is taken and mapped back, giving ``B A`` that minimises
  ``||(E - B A) X||``; the model then runs with ``Q + B A``. B and A are stored at 16 bits and
  counted in the average bits. At full rank ``Q + B A = W``.
- ``amplify``: peak signal amplification, an inference-time intervention. The logit lens (final
  norm applied) at a "peak" layer is added to the output logits with weight alpha,
  ``logits = out + alpha * lens(peak)`` (a product of experts: ``p ~ p_out * p_peak^alpha``). The
  peak is either one fixed layer, or, per prompt, the most confident layer in the upper half of the
  network (highest top-1 probability, the last layer excluded), so it needs no knowledge of the
  answer. The layer, the rule and alpha are chosen on a held-out split of facts and scored on the
  others.
- ``matching_uniform``: the plain uniform configuration (same width, a smaller group) whose
  average bits are closest to a repair's, for a fair comparison.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from .arch import Arch, resolve, unwrap, weight_matrix
from .data import Fact
from .plan import Plan, avg_bits, uniform_plan
from .quantize import QTensor, QuantSpec, bits_per_weight
from .swap import QuantizedWeights


def protect_first(model: nn.Module, spec: QuantSpec, k: int, high_bits: int = 8,
                  arch: Arch | None = None) -> Plan:
    """``spec`` everywhere, except layers ``0..k-1`` at ``high_bits`` (same group size)."""
    arch = arch or resolve(model)
    if not 0 <= k <= arch.n_layers:
        raise ValueError(f"k must be in 0..{arch.n_layers}, got {k}")
    plan = uniform_plan(model, spec, arch=arch)
    high = QuantSpec(high_bits, spec.group_size, spec.sym, spec.method)
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


def kurtosis_table(model: nn.Module, arch: Arch | None = None) -> pd.DataFrame:
    """Per decoder weight matrix: ``layer``, ``weight_type``, ``kurtosis`` (whole matrix) and
    ``max_channel_kurtosis`` (its most outlier-heavy output row)."""
    arch = arch or resolve(model)
    hf = unwrap(model)
    rows = []
    for i, types in enumerate(arch.weights):
        for t, name in types.items():
            w = weight_matrix(hf.get_submodule(name)).detach()
            rows.append({"module": name, "layer": i, "weight_type": t, "kurtosis": float(excess_kurtosis(w)),
                         "max_channel_kurtosis": float(excess_kurtosis(w, dim=1).max())})
    return pd.DataFrame(rows)


def protect_kurtosis(model: nn.Module, spec: QuantSpec, threshold: float, granularity: str = "matrix",
                     high_bits: int = 8, table: pd.DataFrame | None = None, arch: Arch | None = None) -> Plan:
    """``spec`` everywhere, except matrices whose kurtosis (see ``granularity``) exceeds ``threshold``."""
    column = {"matrix": "kurtosis", "channel": "max_channel_kurtosis"}.get(granularity)
    if column is None:
        raise ValueError(f"granularity must be 'matrix' or 'channel', got {granularity!r}")
    arch = arch or resolve(model)
    table = kurtosis_table(model, arch) if table is None else table
    plan = uniform_plan(model, spec, arch=arch)
    high = QuantSpec(high_bits, spec.group_size, spec.sym, spec.method)
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


def matching_uniform(model: nn.Module, spec: QuantSpec, target_bits: float, arch: Arch | None = None,
                     candidates: Sequence[int] = GROUP_CANDIDATES) -> tuple[QuantSpec, float]:
    """The uniform ``spec`` with the group size (from ``candidates``, ones that fit every layer)
    whose average bits are closest to ``target_bits``, and those bits."""
    arch = arch or resolve(model)
    hf = unwrap(model)
    smallest = min(weight_matrix(hf.get_submodule(n)).shape[1] for n in arch.linear_names())
    best = None
    for g in candidates:
        if g > smallest:
            continue
        s = QuantSpec(spec.bits, g, spec.sym, spec.method)
        bits = avg_bits(model, uniform_plan(model, s, arch=arch), arch)
        if best is None or abs(bits - target_bits) < abs(best[1] - target_bits):
            best = (s, bits)
    if best is None:
        raise ValueError(f"no candidate group size fits the smallest layer ({smallest} inputs)")
    return best


@dataclass
class LowRank:
    """A quantized matrix plus a low-rank correction: de-quantizes to ``Q + B A``."""

    base: QTensor
    B: torch.Tensor  # (out, r)
    A: torch.Tensor  # (r, in)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.base.dequantize(torch.float32) + self.B.float() @ self.A.float()).to(dtype)

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + (self.B.numel() + self.A.numel()) * 2  # stored at 16 bits


def eora_factors(error: torch.Tensor, H: torch.Tensor, rank: int, eps: float = 1e-6,
                 eig: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``B (out, r)``, ``A (r, in)`` with ``B A`` the best rank-r fit of ``error (out, in)`` in the
    norm weighted by the input second moment ``H = X^T X / n``; full rank returns ``error``.
    ``eig``: ``torch.linalg.eigh(H.double())`` when already computed (matrices sharing an input)."""
    evals, U = eig if eig is not None else torch.linalg.eigh(H.double())
    evals = evals.clamp_min(eps * float(evals.max().clamp_min(eps)))
    s = evals.sqrt()
    projected = error.double() @ U * s  # E U L^1/2
    Uu, S, Vh = torch.linalg.svd(projected, full_matrices=False)
    r = min(rank, S.numel())
    B = Uu[:, :r] * S[:r]
    A = (Vh[:r] / s) @ U.t()  # V^T L^-1/2 U^T
    return B.float(), A.float()


def eora(model: nn.Module, qw: QuantizedWeights, moments: dict[str, torch.Tensor], rank: int) -> QuantizedWeights:
    """``qw`` with every matrix that has an input moment corrected by a rank-``rank`` EoRA term."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    hf = unwrap(model)
    tensors = dict(qw.tensors)
    eigs: dict[bytes, tuple] = {}  # q/k/v (and gate/up) read the same input: one eigh for each input
    for name, q in qw.tensors.items():
        if name not in moments:
            continue
        H = moments[name]
        key = hashlib.blake2b(H.contiguous().numpy().tobytes(), digest_size=16).digest()
        if key not in eigs:
            eigs[key] = torch.linalg.eigh(H.double())
        w = weight_matrix(hf.get_submodule(name)).detach().float().cpu()
        B, A = eora_factors(w - q.dequantize(torch.float32).cpu(), H, rank, eig=eigs[key])
        tensors[name] = LowRank(q, B, A)
    return QuantizedWeights(qw.plan, tensors, qw.seconds)


def eora_avg_bits(model: nn.Module, plan: Plan, rank: int, arch: Arch | None = None) -> float:
    """Average bits of a plan plus 16-bit rank-r factors on every planned matrix."""
    arch = arch or resolve(model)
    hf = unwrap(model)
    total_bits = total = 0.0
    for name in arch.linear_names():
        out, cols = weight_matrix(hf.get_submodule(name)).shape
        spec = plan.get(name, QuantSpec(16))
        extra = 16 * min(rank, out, cols) * (out + cols) if name in plan and not spec.is_full_precision else 0
        total_bits += bits_per_weight(spec, cols) * out * cols + extra
        total += out * cols
    return total_bits / total


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


ALPHAS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 9.0)


@torch.no_grad()
def amplification_grid(model: nn.Module, table: pd.DataFrame, alphas: Sequence[float] = ALPHAS,
                       batch_size: int = 16) -> pd.DataFrame:
    """For every prompt of ``table`` (``prompt``, ``answer_id``, ``fact``, ``template``) and every
    (rule, layer, alpha) candidate, whether ``out + alpha * lens(peak)`` puts the answer on top.
    Rules: ``fixed`` (peak = ``layer``, each layer of the upper half but the last) and
    ``confident`` (per prompt, the upper-half layer with the highest top-1 probability; ``layer``
    -1). Run it inside ``qw.applied(model)`` to amplify a quantized model."""
    from . import positions as P
    from .lens import project
    from .trace import collect

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
        resid = collect(model, batch, ("resid",), layers=upper + [n - 1], arch=arch, tokens=last)["resid"]
        dtype = next(unwrap(model).parameters()).dtype
        logits = torch.stack([project(model, h[:, 0].to(dtype), arch=arch) for h in resid], 1).cpu()  # (B, U+1, V)
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


@dataclass
class RepairResult:
    """``rows``: one per repair configuration, scored on the facts of ``scored_facts`` (never the
    ones amplification was chosen on), each beside the uniform configuration of the closest
    average bits (``baseline_*``)."""

    rows: pd.DataFrame
    choice: dict  # what amplification chose, and on which facts
    held_out_facts: list[str]
    scored_facts: list[str]


def _overrides(model: nn.Module, base: QuantizedWeights, plan: Plan) -> QuantizedWeights:
    """``base`` with the matrices whose spec ``plan`` changes re-quantized by RTN at the new spec
    (protected matrices are 8-bit, where RTN and GPTQ agree to a fraction of a percent)."""
    from .quantize import rtn

    hf = unwrap(model)
    tensors = dict(base.tensors)
    for name, spec in plan.items():
        if base.plan.get(name) != spec:
            tensors[name] = rtn(weight_matrix(hf.get_submodule(name)).detach(), spec)
    return QuantizedWeights(plan, tensors, base.seconds)


def run_repair(model: nn.Module, facts: list[Fact], spec: QuantSpec, calib: torch.Tensor | None = None,
               ppl_tokens: torch.Tensor | None = None, ppl_window: int = 512, protect_k: Sequence[int] = (1, 2),
               kurtosis_thresholds: Sequence[float] = (), granularity: str = "matrix",
               eora_ranks: Sequence[int] = (), alphas: Sequence[float] = ALPHAS, inject_layer: int | None = None,
               held_out: float = 0.5, seed: int = 0, progress: bool = True) -> RepairResult:
    """Each repair of ``spec``'s quantized model, its Failure / Robust accuracy on the scored facts
    and its perplexity, next to uniform quantization at the same average bits."""
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    from . import evaluate as ev
    from .sensitivity import subset_accuracy
    from .swap import quantize_model

    if spec.is_full_precision:
        raise ValueError("repairs need a quantized width (16 bits quantizes nothing)")
    tok = model.tokenizer
    arch = resolve(model)
    table = ev.prompt_table(facts, tok)
    choose, score = split_facts(facts, held_out, seed)
    score_ids = {f.id for f in score}
    plain_plan = uniform_plan(model, spec, arch=arch)
    plain = quantize_model(model, plain_plan, calib, progress=progress)
    fp_scored = ev.score_prompts(model, tok, table)
    with plain.applied(model):
        q_scored = ev.score_prompts(model, tok, table)
    right = ev.reference_right(table, fp_scored, q_scored)
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
        return {"ppl": ppl, **subset_accuracy(scored, subset, seed)}

    baselines: dict[int | None, dict] = {}

    def baseline(bits: float) -> dict:
        match, match_bits = matching_uniform(model, spec, bits, arch)
        if match.group_size not in baselines:
            qw = plain if match == spec else quantize_model(model, uniform_plan(model, match, arch=arch), calib,
                                                            progress=progress)
            baselines[match.group_size] = {"baseline_group_size": match.group_size, "baseline_avg_bits": match_bits,
                                           **{f"baseline_{k}": v for k, v in evaluate(qw).items()}}
        return baselines[match.group_size]

    configs: list[tuple[str, dict, object]] = [("none", {}, None)]
    configs += [("protect_first", {"k": k}, protect_first(model, spec, k, arch=arch)) for k in protect_k]
    if kurtosis_thresholds:
        kt = kurtosis_table(model, arch)
        configs += [("protect_kurtosis", {"threshold": t, "granularity": granularity},
                     protect_kurtosis(model, spec, t, granularity, table=kt, arch=arch)) for t in kurtosis_thresholds]
    moments = input_moments_for(model, plain_plan, calib) if eora_ranks else {}
    configs += [("eora", {"rank": r}, r) for r in eora_ranks]
    rows = []
    for name, params, what in tqdm(configs, desc=f"repairs {spec.method} {spec.bits}-bit", disable=not progress):
        if name == "none":
            qw, bits = plain, avg_bits(model, plain_plan, arch)
        elif name == "eora":
            qw, bits = eora(model, plain, moments, what), eora_avg_bits(model, plain_plan, what, arch)
        else:
            qw, bits = _overrides(model, plain, what), avg_bits(model, what, arch)
        rows.append({"repair": name, "params": params, "avg_bits": bits, **evaluate(qw), **baseline(bits)})
    # peak amplification: chosen on the held-out facts, scored on the others
    with plain.applied(model):
        grid = amplification_grid(model, right[~right.fact.isin(score_ids)], alphas=alphas)
    choice = choose_amplification(grid, [f.id for f in choose])
    bits = avg_bits(model, plain_plan, arch)
    rows.append({"repair": "amplify", "params": {k: choice[k] for k in ("rule", "layer", "alpha")}, "avg_bits": bits,
                 **evaluate(plain, amplify=choice), **baseline(bits)})
    if inject_layer is not None:
        rows.append({"repair": "inject", "params": {"layer": inject_layer}, "avg_bits": float("nan"),
                     **_injection_accuracy(model, plain, scored_right, subset, inject_layer, seed)})
    out = pd.DataFrame(rows)
    # "beats uniform": more Failure prompts right than uniform at the closest bits, and no fewer Robust ones
    beats = (out.failure_acc > out.baseline_failure_acc) & (out.robust_acc >= out.baseline_robust_acc)
    out["beats_uniform"] = beats.astype(object)
    out.loc[out.repair.isin(["none", "inject"]), "beats_uniform"] = None
    out.insert(0, "bits", spec.bits)
    out.insert(0, "method", spec.method)
    out["params"] = out.params.map(lambda p: ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in p.items()))
    return RepairResult(out, choice, sorted({f.id for f in choose}), sorted(score_ids))


def input_moments_for(model: nn.Module, plan: Plan, calib: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Input second moments of a plan's matrices, computed once per shared input (q/k/v, gate/up)."""
    from .calibrate import input_moments

    if calib is None:
        raise ValueError("EoRA needs calibration tokens (its eigenspace comes from calibration inputs)")
    return input_moments(model, list(plan), calib)


def _injection_accuracy(model: nn.Module, qw: QuantizedWeights, prompts: pd.DataFrame, subset: pd.DataFrame,
                        layer: int, seed: int) -> dict:
    """Accuracy when the reference's residual stream (every token) enters the quantized model at
    ``layer``: not a deployable repair (it needs the reference), the paper's last 2-bit attempt."""
    from . import positions as P
    from .patch import Edit, Rerun
    from .sensitivity import subset_accuracy
    from .trace import collect

    arch = resolve(model)
    if not 1 <= layer < arch.n_layers:
        raise ValueError(f"inject_layer must be in 1..{arch.n_layers - 1}, got {layer}")
    out = []
    for start in range(0, len(prompts), 8):
        chunk = prompts.iloc[start : start + 8]
        batch = P.encode(model.tokenizer, chunk.prompt.tolist())
        fp = collect(model, batch, ("resid",), layers=[layer - 1], arch=arch)["resid"][0]
        with qw.applied(model):
            logits, _ = Rerun(model, batch, arch).run([[Edit(layer - 1, "resid", None, fp)]])
        right = logits[0].argmax(-1).cpu() == torch.tensor(chunk.answer_id.to_numpy())
        out.append(chunk[["fact", "template"]].assign(correct=right.numpy()))
    return {"ppl": float("nan"), **subset_accuracy(pd.concat(out), subset, seed)}


def save_repair(res: RepairResult, out, meta: dict, title: str = "") -> None:
    """Write ``repair.json`` (meta, rows, the amplification choice and the fact split),
    ``repair.csv`` and the Pareto figure ``repair.png``."""
    from .io import save_analysis
    from .plots import pareto_figure

    save_analysis(out, "repair", meta, res.rows, extra={"amplification": res.choice,
                                                         "held_out_facts": res.held_out_facts,
                                                         "scored_facts": res.scored_facts},
                  figures={"repair": pareto_figure(res.rows, title)})


def findings(rows: pd.DataFrame, bits: int) -> dict:
    """One width's repair results for the prose, keyed ``w<bits>_<name>``: which repairs beat uniform
    quantization at the closest bits, the best Failure accuracy and by which repair, and whether
    any repair gets a tenth of the Failure prompts back ("repairable" in the paper's loose sense)."""
    d = rows[rows.bits == bits]
    key = f"w{bits}"
    named = d.repair + d.params.map(lambda p: f" ({p})" if p else "")
    tried = d[~d.repair.isin(["none"])]
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
    return out
