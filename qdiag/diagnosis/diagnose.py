"""The diagnosis: for each configuration of a model, its failure mode (``rule.verdict``), a score
between the reference and a collapsed model, the evidence of every probe, where the failure
starts, and what to try.

    from qdiag.diagnosis import diagnose
    result = diagnose(model, facts, [QuantSpec(4), QuantSpec(2)], calib)
    result.verdicts                     # one row per configuration
    print(result.report())              # the one-page report, as Markdown
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..core.arch import resolve
from ..core.data import Fact
from ..core.io import atomic_write_bytes, records, save_analysis
from ..measure.widths import Width, check_configs, each_width, output_fidelity
from ..quant import format_check, remedy
from ..quant.eora import eora, eora_avg_bits
from ..quant.plan import avg_bits
from ..quant.quantize import QuantSpec
from ..quant.quantizer import requantize
from . import rule
from .probes import measure, reference_state
from .report import figures, markdown

LABEL = ("method", "bits", "group_size", "sym", "avg_bits")


@dataclass
class Diagnosis:
    """Per configuration, the verdict and its evidence (``configurations``: one dict each, as in
    ``diagnosis.json``); ``evidence`` and ``layers`` are the same as tidy tables."""

    configurations: list[dict]
    evidence: pd.DataFrame
    layers: pd.DataFrame
    meta: dict = field(default_factory=dict)

    @property
    def verdicts(self) -> pd.DataFrame:
        """One row per configuration: label, verdict, score and its interval, answers lost."""
        cols = [*LABEL, "verdict", "score", "score_lo", "score_hi", "lost", "lost_lo", "lost_hi", "n_prompts",
                "remedy_of"]
        return pd.DataFrame([{k: c.get(k) for k in cols} for c in self.configurations])

    def report(self, title: str = "") -> str:
        """The one-page report, as Markdown."""
        return markdown(self, title)

    def save(self, out: str | Path, title: str = "") -> None:
        """Write ``diagnosis.json``, ``diagnosis.md``, ``diagnosis.csv`` (the evidence) and the
        figures to ``out``, each whole or not at all."""
        out = Path(out)
        save_analysis(out, "diagnosis", self.meta, self.evidence, figures=figures(self, title),
                      extra={"configurations": self.configurations, "layers": records(self.layers)})
        atomic_write_bytes(out / "diagnosis.md", self.report(title).encode())


def diagnose(model: nn.Module, facts: list[Fact], configs: Sequence[QuantSpec | Width],
             calib: torch.Tensor | None = None, ppl_tokens: torch.Tensor | None = None, ppl_window: int = 512,
             causal: bool = True, batch_size: int = 64, max_prompts: int | None = None, max_tokens: int = 2048,
             try_remedy: bool = False, seed: int = 0, progress: bool = True) -> Diagnosis:
    """Diagnose each configuration against the reference on the prompts of ``facts`` it answers
    right. ``causal=False`` is the triage: the verdict's probes and everything one forward per
    configuration gives, without the patching, ablation and injection reruns. ``ppl_tokens``
    adds the output's KL divergence and top-1 agreement on text. ``try_remedy`` applies the
    suggested weight repairs (protection, EoRA) and diagnoses each repaired model too."""
    configs = check_configs(model, configs)
    n_layers = resolve(model).n_layers
    t0 = time.perf_counter()
    state = reference_state(model, facts, batch_size, max_prompts, max_tokens, causal, seed, progress)
    reference_seconds = time.perf_counter() - t0
    entries, evidence, layers = [], [], []

    def one(w: Width, remedy_of: dict | None = None) -> dict:
        # a repaired model needs its verdict, not the causal probes: it gets the triage
        t0 = time.perf_counter()
        m = measure(model, state, w, causal and remedy_of is None, max_tokens, progress)
        fid = output_fidelity(model, ppl_tokens, w, ppl_window) if ppl_tokens is not None and \
            ppl_tokens.numel() >= ppl_window else None
        entry, ev, lay = _judge(m, fid, w, n_layers, seed)
        entry["remedy_of"] = remedy_of
        entry["fidelity"] = fid
        # made (quantized or read) and measured: what each configuration costs beyond the reference's share
        entry["seconds"] = {"made": round(w.seconds, 2), "measured": round(time.perf_counter() - t0, 2)}
        entries.append(entry)
        label = {k: entry[k] for k in LABEL}
        evidence.append(ev.assign(**label))
        layers.append(lay.assign(**label))
        return entry

    for w in each_width(model, configs, calib, progress, desc="diagnose"):
        entry = one(w)
        if try_remedy:
            for repaired in _remedies(model, w, entry, calib):
                one(repaired, remedy_of={k: entry[k] for k in ("method", "bits", "group_size")})
    ev = pd.concat(evidence, ignore_index=True)
    lay = pd.concat(layers, ignore_index=True)
    order = list(LABEL)
    return Diagnosis(entries, ev[order + [c for c in ev.columns if c not in order]],
                     lay[order + [c for c in lay.columns if c not in order]],
                     {"n_prompts": state.n_prompts, "n_layers": n_layers, "causal": causal,
                      "reference_seconds": round(reference_seconds, 2)})


def _judge(m: dict, fidelity: dict | None, w: Width, n_layers: int, seed: int) -> tuple[dict, pd.DataFrame,
                                                                                      pd.DataFrame]:
    """The verdict and everything reported with it, from one configuration's measurements."""
    value, lo, hi = rule.score(m, seed)
    lost, lost_lo, lost_hi = rule.damage(m, seed)
    verdict = rule.verdict(lo, hi, lost)
    ev = rule.evidence(m, fidelity)
    layers = rule.layer_table(m)
    worst = layers.loc[layers.position.idxmax()]
    where = f"the {worst.component} of layer {int(worst.layer)}"
    carried = {
        "computation_collapse": f"local function of {where} at {value:.2f} (interval {lo:.2f}-{hi:.2f}) of the way "
                                "to a non-functioning component",
        "transitional": f"the score's interval {lo:.2f}-{hi:.2f} ({where}) straddles the midpoint",
        "signal_degradation": f"every component below the midpoint (largest: {where}, {value:.2f}) while "
                              f"{lost:.0%} of the answers are lost",
        "intact": f"every component below the midpoint (largest: {where}, {value:.2f}) and {lost:.0%} of the "
                  "answers lost",
    }[verdict]
    mode = "computation_collapse" if verdict == "computation_collapse" else "signal_degradation"
    informative = ev[~ev.group.isin(["output", "local"]) & ev.points_to.isin(["signal_degradation",
                                                                              "computation_collapse"])]
    disagree = informative[(informative.points_to != mode) & (verdict != "transitional")]
    if verdict == "intact":
        disagree = informative[informative.points_to == "computation_collapse"]
    lens_peak = int(m["lens_q"].mean(0).argmax())
    outside, not_quantization = _outside(w)
    entry = {**w.label, "verdict": verdict, "score": value, "score_lo": lo, "score_hi": hi, "lost": lost,
             "lost_lo": lost_lo, "lost_hi": lost_hi, "n_prompts": int(m["correct"].size),
             "carried_by": carried, "first_domino": rule.first_domino(layers),
             "disagreements": disagree.probe.tolist(),
             "remedy": rule.remedy(verdict, layers, lens_peak, n_layers,
                                   quantized=w.plan is not None or w.checkpoint is not None, outside=outside,
                                   not_quantization=not_quantization),
             "evidence": records(ev)}
    if w.checkpoint is not None:
        entry["checkpoint"] = w.checkpoint.describe()
        if w.checkpoint.format_report is not None:
            entry["format_check"] = format_check.summary(w.checkpoint.format_report)
            entry["not_quantization"] = records(format_check.flagged(w.checkpoint.format_report))
    return entry, ev, layers


def _outside(w: Width) -> tuple[list[str], list[str]]:
    """The checkpoint's tensors outside the decoder's matrices that differ from the base (by their
    names in the file), and every tensor the format check finds is not quantization damage."""
    ck = w.checkpoint
    if ck is None:
        return [], []
    report = ck.format_report
    flagged = list(format_check.flagged(report).file_name) if report is not None else []
    folded = set(report[report.verdict == "holds folded input scales"].parameter) if report is not None else set()
    outside = [ck.file_names.get(p, p) for p in ck.changed if p not in folded]
    return outside, flagged


def _remedies(model: nn.Module, w: Width, entry: dict, calib: torch.Tensor | None) -> list[Width]:
    """The suggested weight repairs of a quantized configuration, applied: one ``Width`` each. An
    existing checkpoint gets them through ``quant.remedy``: first its tensors that are not
    quantization damage (or that it changes outside its matrices) restored from the base, then, on
    that, protected layers re-exported from the base in the checkpoint's family and EoRA against
    the base; one whose matrices carry folded scales gets none of those (the report says why)."""
    if w.weights is None or (w.plan is None and w.checkpoint is None):
        return []
    out = []
    actions = entry["remedy"]["actions"]
    restore = next((a for a in actions if a["repair"] == "restore"), None)
    if restore is not None and w.checkpoint is not None:
        ckpt = remedy.restore(model, w.checkpoint, restore["tensors"])
        w = Width(f"{w.method}+restore", w.bits, w.group_size, w.sym, w.avg_bits, w.seconds,
                  apply=ckpt.weights.applied, weights=ckpt.weights, checkpoint=ckpt)
        out.append(w)
    if w.checkpoint is not None and remedy.blocking(w.checkpoint) and any(a["repair"] != "restore" for a in actions):
        entry["remedy"]["text"] += (" Not applied here: this checkpoint changes parameters outside its quantized "
                                    "matrices (folded scales), so its matrices cannot be repaired against the base.")
        return out
    for action in actions:
        if action["repair"] == "protect_layers" and action["layers"]:
            if w.checkpoint is not None:
                names = resolve(model).linear_names(action["layers"])
                qw, bits = remedy.protect(model, w.checkpoint, names, action["bits"])
                plan = None
            else:
                arch = resolve(model)
                high = w.spec.at_bits(action["bits"])
                plan = {**w.plan, **{n: high for n in arch.linear_names(action["layers"])}}
                qw, bits = requantize(model, w.weights, plan), avg_bits(model, plan)
            out.append(Width(f"{w.method}+protect", w.bits, w.group_size, w.sym, bits, w.seconds,
                             apply=qw.applied, weights=qw, plan=plan))
        elif action["repair"] == "eora" and calib is not None:
            if w.checkpoint is not None:
                qw, bits = remedy.correct(model, w.checkpoint, calib, [action["rank"]])[action["rank"]]
            else:
                qw = eora(model, w.weights, calib, [action["rank"]])[action["rank"]]
                bits = eora_avg_bits(model, w.plan, action["rank"])
            out.append(Width(f"{w.method}+eora", w.bits, w.group_size, w.sym, bits, w.seconds, apply=qw.applied))
    return out
