"""The diagnosis as a person reads it: a one-page Markdown report, the evidence fingerprint
(probes down, configurations across, coloured by position between the reference and a
non-functioning model) and the per-layer localisation."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..quant.quantize import FULL_PRECISION
from ..report.plots import _panels
from .rule import INTACT, MIDPOINT

WORDS = {"intact": "intact", "signal_degradation": "Signal Degradation", "transitional": "transitional",
         "computation_collapse": "Computation Collapse"}



def name(c: dict) -> str:
    """A configuration's short name: ``GPTQ 4-bit g128``, ``weight_noise_0.1``."""
    if c["bits"] == FULL_PRECISION or c.get("group_size") is None and c.get("sym") is None:
        return str(c["method"])
    g = "per channel" if c.get("group_size") is None else f"g{c['group_size']}"
    return f"{str(c['method']).upper()} {c['bits']}-bit {g}"


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.0%}"


def sentence(c: dict) -> str:
    """The verdict of one configuration in one sentence, with what carried it."""
    dom = c.get("first_domino")
    where = f"; the first component to break is the {dom['component']} of layer {dom['layer']}" if dom else ""
    return (f"**{name(c)}**: {WORDS[c['verdict']]} (score {c['score']:.2f}, 95% interval {c['score_lo']:.2f}-"
            f"{c['score_hi']:.2f}; {_pct(c['lost'])} of the reference's {c['n_prompts']} correct answers lost). "
            f"Carried by {c['carried_by']}{where}.")


def markdown(diag, title: str = "") -> str:
    """The one-page report."""
    lines = [f"# Diagnosis{': ' + title if title else ''}", "",
             f"On the {diag.meta.get('n_prompts', '?')} prompts the reference answers correctly. Score: where the "
             "most broken component sits between its reference (0) and a non-functioning one (1), each "
             "component run on the reference's own inputs; Computation Collapse from "
             f"{MIDPOINT} up, Signal Degradation below it once a tenth ({INTACT:.0%}) of the answers are lost.", "",
             "| configuration | avg bits | verdict | score (95% interval) | answers lost | first domino |",
             "| --- | --- | --- | --- | --- | --- |"]
    for c in diag.configurations:
        dom = c.get("first_domino")
        first = f"{dom['component']}, layer {dom['layer']}" if dom else "-"
        lines.append(f"| {name(c)}{' (remedy)' if c.get('remedy_of') else ''} | {c['avg_bits']:.2f} | "
                     f"{WORDS[c['verdict']]} | {c['score']:.2f} ({c['score_lo']:.2f}-{c['score_hi']:.2f}) | "
                     f"{_pct(c['lost'])} | {first} |")
    lines += ["", "## Verdicts", ""]
    for c in diag.configurations:
        lines.append(f"- {sentence(c)}")
        if c["disagreements"]:
            lines.append(f"  Probes that point the other way: {', '.join(c['disagreements'])}.")
        lines.append(f"  Remedy: {c['remedy']['text']}")
        if c.get("checkpoint"):
            lines.append(f"  Checkpoint: {c['checkpoint']} Its repairs are suggested, not applied.")
    lines += ["", "## Evidence", "", "![evidence fingerprint](diagnosis_fingerprint.png)", "",
              "Each probe of the study's table, placed between the reference (0) and a non-functioning "
              "model (1); the local probes (bottom) decide the verdict.", "",
              "![where it breaks](diagnosis_layers.png)", "",
              "Per layer, how far the attention and the MLP, run on the reference's own inputs, have moved "
              "toward a non-functioning component; the dashed line is the midpoint.", ""]
    return "\n".join(lines)


def fingerprint_figure(evidence: pd.DataFrame, configurations: list[dict], title: str = "") -> plt.Figure:
    """Probes down, configurations across, each cell coloured by its position (0: the reference,
    1: a non-functioning model) and labelled with it."""
    keys = ["method", "bits", "group_size"]
    cols = [name(c) for c in configurations]
    probes = list(dict.fromkeys(evidence.probe))
    grid = np.full((len(probes), len(cols)), np.nan)
    for j, c in enumerate(configurations):
        sel = np.ones(len(evidence), bool)
        for k in keys:
            sel &= (evidence[k].isna() & (c[k] is None)) | (evidence[k] == c[k]).to_numpy()
        for _, row in evidence[sel].iterrows():
            grid[probes.index(row.probe), j] = row.position
    fig, axes = _panels(1, 1, min(9.0, max(5.0, 0.8 * len(cols) + 3.5)), 0.32 * len(probes) + 1.6)
    ax = axes[0, 0]
    im = ax.imshow(np.clip(grid, 0, 1), cmap="RdYlGn_r", vmin=0, vmax=1, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(probes)), probes, fontsize=8)
    fig.colorbar(im, ax=ax, label="position: 0 reference, 1 non-functioning")
    ax.set_title(title or "Evidence fingerprint")
    return fig


def layers_figure(layers: pd.DataFrame, configurations: list[dict], title: str = "") -> plt.Figure:
    """Per layer, the local position of the attention (top) and the MLP (bottom), one line per
    configuration (its colour; the line style tells the quantizer), its verdict in the legend."""
    fig, axes = _panels(2, 1, 8, 3.0, sharey=True, sharex=True)
    colours = plt.get_cmap("tab10" if len(configurations) <= 10 else "tab20").colors
    styles = {m: s for m, s in zip(dict.fromkeys(c["method"] for c in configurations), ("-", "--", ":", "-."))}
    for ax, comp in zip(axes[:, 0], ("attention", "mlp")):
        for k, c in enumerate(configurations):
            d = layers[(layers.component == comp) & (layers.method == c["method"]) & (layers.bits == c["bits"])]
            if c.get("group_size") is not None:
                d = d[d.group_size == c["group_size"]]
            ax.plot(d.layer, d.position.clip(0, 1.05), marker="o", ms=3, label=f"{name(c)}: {WORDS[c['verdict']]}",
                    color=colours[k % len(colours)], ls=styles.get(c["method"], "-"), alpha=0.9)
        ax.axhline(MIDPOINT, ls="--", color="grey", lw=1)
        ax.set_xlabel("layer")
        ax.set_title("attention" if comp == "attention" else "MLP")
    for ax in axes[:, 0]:
        ax.set_ylabel("position (0 reference,\n1 non-functioning)", fontsize=9)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), fontsize=7, loc="outside lower center",
               ncol=min(3, len(configurations)))
    if title:
        fig.suptitle(title)
    return fig


def figures(diag, title: str = "") -> dict:
    """The report's figures, by file stem."""
    return {"diagnosis_fingerprint": fingerprint_figure(diag.evidence, diag.configurations, title),
            "diagnosis_layers": layers_figure(diag.layers, diag.configurations, title)}


def verdict_table(diag) -> pd.DataFrame:
    """One row per configuration, as a reader wants it: name, average bits, verdict, score with
    its interval, answers lost, where the failure starts."""
    rows = []
    for c in diag.configurations:
        dom = c.get("first_domino")
        rows.append({"configuration": name(c) + (" (remedy)" if c.get("remedy_of") else ""),
                     "avg bits": round(c["avg_bits"], 2), "verdict": WORDS[c["verdict"]],
                     "score": f"{c['score']:.2f} ({c['score_lo']:.2f}-{c['score_hi']:.2f})",
                     "answers lost": _pct(c["lost"]),
                     "first domino": f"{dom['component']}, layer {dom['layer']}" if dom else "-"})
    return pd.DataFrame(rows)


def verdict_markdown(diag) -> str:
    """The verdict table as a Markdown table (for pages that include it)."""
    t = verdict_table(diag)
    lines = ["| " + " | ".join(t.columns) + " |", "|" + " --- |" * len(t.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in t.itertuples(index=False)]
    return "\n".join(lines) + "\n"


_SHORT = {"intact": "intact", "signal_degradation": "degr.", "transitional": "trans.",
          "computation_collapse": "collapse"}


def _verdict_grid(ax, d: pd.DataFrame, column: str, xlabel: str) -> None:
    """Bits down, ``column``'s values across; each cell coloured by its score (0 reference, 1
    collapsed) and labelled with its verdict and score."""
    bits = sorted(d.bits.unique(), reverse=True)
    cols = list(dict.fromkeys(d[column]))
    grid = np.full((len(bits), len(cols)), np.nan)
    for r in d.itertuples():
        i, j = bits.index(r.bits), cols.index(getattr(r, column))
        grid[i, j] = r.score
        ax.text(j, i, f"{_SHORT[r.verdict]}\n{r.score:.2f}", ha="center", va="center", fontsize=8)
    ax.imshow(np.clip(grid, 0, 1), cmap="RdYlGn_r", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(bits)), [f"{b}-bit" for b in bits])
    ax.set_xlabel(xlabel)


def phase_figure(verdicts: pd.DataFrame, title: str = "") -> plt.Figure:
    """Bits down, group size across: each cell coloured by its score (0 reference, 1 collapsed)
    and labelled with its verdict; one panel per method."""
    methods = list(dict.fromkeys(verdicts.method))
    fig, axes = _panels(1, len(methods), 4.2, 3.2)
    for ax, m in zip(axes[0], methods):
        d = verdicts[verdicts.method == m].copy()
        d["group"] = d.group_size.map(lambda g: "channel" if g is None or (isinstance(g, float) and math.isnan(g))
                                      else f"g{int(g)}")
        _verdict_grid(ax, d, "group", "group size")
        ax.set_title(f"{m.upper()}")
    if title:
        fig.suptitle(title)
    return fig


def quantizer_figure(verdicts: pd.DataFrame, title: str = "") -> plt.Figure:
    """Bits down, quantizer across: does the verdict follow the bits or the quantizer?"""
    n = verdicts.method.nunique()
    fig, axes = _panels(1, 1, max(4.2, 1.3 * n), 3.4)
    _verdict_grid(axes[0][0], verdicts, "method", "quantizer")
    if title:
        fig.suptitle(title)
    return fig


def _short_model(model: str) -> str:
    return str(model).rstrip("/").split("/")[-1]


def _diagnosed(table: pd.DataFrame) -> pd.DataFrame:
    return table.dropna(subset=["verdict"]) if "verdict" in table else table.iloc[0:0].assign(verdict=None)


def models_figure(table: pd.DataFrame, title: str = "") -> plt.Figure:
    """Bits down, model and quantizer across (a sweep's verdicts, ``sweep.side_by_side``): does
    the mode at a width hold from one model to the next?"""
    d = _diagnosed(table).copy()
    d["configuration"] = [f"{_short_model(m)}\n{str(q).upper()}" for m, q in zip(d.model, d.method)]
    fig, axes = _panels(1, 1, max(4.2, 1.4 * d.configuration.nunique()), 3.4)
    if d.empty:
        axes[0][0].text(0.5, 0.5, "no diagnosis in this sweep", ha="center", va="center")
        axes[0][0].set_axis_off()
    else:
        _verdict_grid(axes[0][0], d, "configuration", "model and quantizer")
    if title:
        fig.suptitle(title)
    return fig


def models_findings(table: pd.DataFrame, widths: tuple | list = (4, 2)) -> dict:
    """Per width the prose names: each model's verdict in words, and whether every model diagnosed
    there gets the study's mode (Signal Degradation at 4 bits, Computation Collapse at 2; None where
    none was diagnosed); ``models``: how many models the sweep finished."""
    d = _diagnosed(table)
    out: dict = {"models": int(d.model.nunique())}
    paper = {4: "signal_degradation", 2: "computation_collapse"}
    for b in widths:
        at = d[d.bits == b]
        out[f"models_{b}"] = "; ".join(f"{_short_model(m)} {str(q).upper()}: {WORDS[v]}"
                                       for m, q, v in zip(at.model, at.method, at.verdict)) or "none diagnosed"
        out[f"as_paper_{b}"] = bool((at.verdict == paper[b]).all()) if b in paper and len(at) else None
    return out


def quantizer_findings(verdicts: pd.DataFrame, widths: tuple | list = ()) -> dict:
    """Per nominal width: whether the quantizers diagnosed share one verdict (None where fewer than
    two were diagnosed at that width: a llama.cpp type fixes its own width), and each one's verdict
    in words (for the book's prose); ``widths`` the prose names always get both keys."""
    out: dict = {}
    for b in sorted(set(verdicts.bits) | set(widths)):
        d = verdicts[verdicts.bits == b]
        out[f"same_verdict_{b}"] = bool(d.verdict.nunique() == 1) if d.method.nunique() >= 2 else None
        out[f"verdicts_{b}"] = "; ".join(f"{m}: {WORDS[v]}" for m, v in zip(d.method, d.verdict)) or "none diagnosed"
    return out


def findings(diag, method: str) -> dict:
    """Per width of ``method``, the verdict, score and answers lost, and the mode each of the
    study's probes points to, keyed ``w<bits>_<name>`` (for the book's prose)."""
    out: dict = {}
    for c in diag.configurations:
        if c["method"] != method or c.get("remedy_of"):
            continue
        key = f"w{c['bits']}"
        out[f"{key}_verdict"] = WORDS[c["verdict"]]
        out[f"{key}_score"] = float(c["score"])
        out[f"{key}_lost"] = float(c["lost"])
        dom = c.get("first_domino")
        out[f"{key}_first_domino"] = f"the {dom['component']} of layer {dom['layer']}" if dom else "none"
        for row in c["evidence"]:
            probe = "".join(ch if ch.isalnum() else "_" for ch in row["probe"].lower()).strip("_")
            out[f"{key}_{probe}"] = WORDS.get(row["points_to"], row["points_to"])
    return out


# The study's diagnostic table, in its order (shared/paper-notes.md), as probe names here.
PAPER_PROBES = ["answer rank", "logit-lens emergence", "patching sufficiency (last subject token)",
                "dependency-profile correlation", "attention entropy (middle layers)", "attention JSD",
                "gate sign-flip rate", "top-1% neuron Jaccard", "MLP output cosine", "CKA diagonal",
                "subspace similarity", "error alignment", "clean-signal injection"]
# At 4 bits the paper reports a working model whose signal is weaker: a probe that reads "intact"
# (no change) or "degradation" agrees with it; at 2 bits, "collapse".
PAPER_SAYS = {4: ("intact", "signal_degradation"), 2: ("computation_collapse",)}


def comparison(diag, method: str) -> pd.DataFrame:
    """The study's table, probe by probe: the mode each probe points to at 4 and at 2 bits (the
    paper's typical widths) for ``method``, and whether that agrees with the paper; probes not measured
    in this run (the triage skips the causal ones) are left out."""
    rows = []
    configs = {c["bits"]: c for c in diag.configurations if c["method"] == method and not c.get("remedy_of")}
    for probe in PAPER_PROBES:
        row = {"probe": probe}
        for bits, says in PAPER_SAYS.items():
            ev = {r["probe"]: r for r in configs[bits]["evidence"]} if bits in configs else {}
            got = ev.get(probe, {}).get("points_to")
            row[f"{bits} bits"] = WORDS.get(got, got) if got else None
            row[f"{bits} bits as the paper"] = None if got in (None, "n/a") else got in says
        if any(row[f"{b} bits"] for b in PAPER_SAYS):
            rows.append(row)
    return pd.DataFrame(rows)
