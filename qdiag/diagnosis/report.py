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
COLOURS = {"intact": "#4c956c", "signal_degradation": "#e9c46a", "transitional": "#f4a261",
           "computation_collapse": "#c1121f"}


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
    fig, axes = _panels(1, 1, max(5.0, 1.1 * len(cols) + 3.5), 0.32 * len(probes) + 1.6)
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
    """Per layer, the local position of the attention (left) and the MLP (right), one line per
    configuration coloured by its verdict."""
    fig, axes = _panels(1, 2, 5.0, 3.4, sharey=True)
    for ax, comp in zip(axes[0], ("attention", "mlp")):
        for c in configurations:
            d = layers[(layers.component == comp) & (layers.method == c["method"]) & (layers.bits == c["bits"])]
            if c.get("group_size") is not None:
                d = d[d.group_size == c["group_size"]]
            ax.plot(d.layer, d.position.clip(0, 1.05), marker="o", ms=3, label=name(c),
                    color=COLOURS[c["verdict"]], alpha=0.85)
        ax.axhline(MIDPOINT, ls="--", color="grey", lw=1)
        ax.set_xlabel("layer")
        ax.set_title("attention" if comp == "attention" else "MLP")
    axes[0, 0].set_ylabel("position (0 reference, 1 non-functioning)")
    axes[0, 1].legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title)
    return fig


def figures(diag, title: str = "") -> dict:
    """The report's figures, by file stem."""
    return {"diagnosis_fingerprint": fingerprint_figure(diag.evidence, diag.configurations, title),
            "diagnosis_layers": layers_figure(diag.layers, diag.configurations, title)}
