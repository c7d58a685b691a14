"""Figures of what the model outputs: the cliff, the quantizers side by side, answer ranks, the logit lens."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ...quant.quantize import FULL_PRECISION
from .base import _ACC, _SUBSET_NAMES, _bits_axis, _configs, _palette, _pos, _width


def cliff_figure(rows: pd.DataFrame, title: str = "") -> plt.Figure:
    """Perplexity (log scale) and Acc@any/majority/all with 95% intervals against bit width,
    one line per quantizer; the full-precision point is shared by every line."""
    fp = rows[rows.method == "fp"]
    methods = [m for m in rows.method.unique() if m != "fp"]
    pos = _pos(rows.bits)
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.8), constrained_layout=True)
    axes = axes.ravel()
    palette = dict(zip(methods, sns.color_palette("colorblind", len(methods))))
    for k, m in enumerate(methods):
        d = pd.concat([fp, rows[rows.method == m]]).sort_values("bits", ascending=False)
        x = d.bits.map(pos) + 0.08 * (k - (len(methods) - 1) / 2)  # side by side, not on top

        axes[0].plot(x, d.ppl, "o-", color=palette[m], label=m.upper())
        for ax, key in zip(axes[1:], _ACC):
            err = np.vstack([d[key] - d[f"{key}_lo"], d[f"{key}_hi"] - d[key]])
            ax.errorbar(x, d[key], yerr=err, fmt="o-", capsize=3, color=palette[m], label=m.upper())
    axes[0].set_yscale("log")
    axes[0].set_ylabel("WikiText-2 perplexity (log)")
    axes[0].set_title("Perplexity")
    for ax, (key, name) in zip(axes[1:], _ACC.items()):
        ax.set_title(name)
        ax.set_ylabel("share of facts (95% bootstrap CI)")
        ax.set_ylim(-0.02, max(0.05, rows[f"{key}_hi"].max() * 1.15))
    for ax in axes:
        _bits_axis(ax, rows.bits)
        ax.grid(alpha=0.3)
    axes[0].legend(title="quantizer")
    if title:
        fig.suptitle(title)
    return fig


def quantizer_figure(rows: pd.DataFrame, title: str = "") -> plt.Figure:
    """Perplexity relative to the reference and the share of known prompts kept (Acc@any where no
    screening ran), against average bits per weight: one marker per quantizer, its widths joined,
    so quantizers compare at equal storage. Panels stacked, for a page's width."""
    fp = rows[rows.method == "fp"].iloc[0]
    q = rows[rows.method != "fp"]
    keep = "retention" if "retention" in q and q.retention.notna().any() else "acc_any"
    methods = list(dict.fromkeys(q.method))
    palette = dict(zip(methods, sns.color_palette("colorblind", len(methods))))
    markers = dict(zip(methods, "osD^vP*Xph<>"))
    fig, axes = plt.subplots(2, 1, figsize=(7.5, 7.5), sharex=True, constrained_layout=True)
    for m in methods:
        d = q[q.method == m].sort_values("avg_bits")
        axes[0].plot(d.avg_bits, d.ppl / fp.ppl, marker=markers[m], color=palette[m], label=m)
        axes[1].plot(d.avg_bits, d[keep], marker=markers[m], color=palette[m], label=m)
        for _, r in d.iterrows():
            axes[1].annotate(f"{r.bits}", (r.avg_bits, r[keep]), textcoords="offset points", xytext=(4, 4),
                             fontsize=9, color=palette[m])
    axes[0].set_yscale("log")
    axes[0].axhline(1, color="grey", lw=1, ls="--")
    axes[0].set_ylabel("perplexity / reference (log)")
    axes[1].set_ylabel("share of known prompts kept" if keep == "retention" else "Acc@any")
    axes[1].axhline(fp[keep], color="grey", lw=1, ls="--")
    axes[1].set_xlabel("average bits per weight (scales and zero points included; labels: nominal bits)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(title="quantizer", ncol=2, fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def rank_figure(prompts: pd.DataFrame, method: str, title: str = "") -> plt.Figure:
    """Distribution of the correct answer's rank per bit width (log scale), for prompts the
    reference gets right: a "rank drop" stays near the top, a "rank collapse" falls to thousands."""
    key = ["fact", "template"]
    fp_right = prompts[(prompts.method == "fp") & prompts.correct][key]
    d = prompts[prompts.method.isin(["fp", method])].merge(fp_right, on=key)
    d = d.assign(width=d.bits.map(lambda b: "FP" if b == FULL_PRECISION else f"{b}-bit"))
    order = [("FP" if b == FULL_PRECISION else f"{b}-bit") for b in sorted(d.bits.unique(), reverse=True)]
    fig, ax = plt.subplots(figsize=(7, 3.6), constrained_layout=True)
    sns.stripplot(data=d, x="width", y="rank", order=order, ax=ax, alpha=0.5, jitter=0.25, size=3, color="0.3")
    sns.boxplot(data=d, x="width", y="rank", order=order, ax=ax, whis=(5, 95), showfliers=False,
                boxprops={"alpha": 0.4})
    ax.set_yscale("log")
    ax.axhline(5, ls="--", color="tab:orange", lw=1, label="top 5")
    ax.set_ylabel("rank of the correct first token (1 = top)")
    ax.set_xlabel(f"{method.upper()} weight bits; prompts the reference answers correctly (n={len(fp_right)})")
    ax.legend(loc="upper left")
    if title:
        ax.set_title(title)
    return fig


def lens_figure(rows: pd.DataFrame, title: str = "") -> plt.Figure:
    """Logit lens: probability (top) and median rank (bottom, log) of the correct answer at every
    layer, on the Failure and Robust subsets of each width; solid = the quantized model, dashed = the
    reference on the same prompts. Bands: 95% bootstrap intervals."""
    subsets = [s for s in ("failure", "robust") if s in set(rows.subset)]
    configs = [c for c in _configs(rows) if c[0] != "fp"]
    fig, axes = plt.subplots(2, max(1, len(subsets)), figsize=(4.6 * max(1, len(subsets)), 7),
                             constrained_layout=True, squeeze=False, sharex=True)
    palette = _palette(configs)
    for c, sub in enumerate(subsets):
        for k, (m, b) in enumerate(configs):
            for model, style in (("quantized", "-"), ("fp", "--")):
                g = rows[(rows.method == m) & (rows.bits == b) & (rows.subset == sub) & (rows.model == model)]
                g = g.sort_values("layer")
                if g.empty:
                    continue
                label = f"{_width(m, b)} (n={int(g.n.iloc[0])})" if model == "quantized" else None
                axes[0, c].plot(g.layer, g.prob, style, color=palette[k], label=label)
                axes[1, c].plot(g.layer, g["rank"], style, color=palette[k])
                if model == "quantized":
                    axes[0, c].fill_between(g.layer, g.prob_lo, g.prob_hi, color=palette[k], alpha=0.12)
        axes[0, c].set_title(_SUBSET_NAMES[sub], fontsize=10)
        axes[0, c].set_ylabel("p(correct answer)")
        axes[1, c].set_ylabel("median rank (1 = top)")
        axes[1, c].set_yscale("log")
        axes[1, c].set_xlabel("layer")
        axes[0, c].plot([], [], "k--", label="reference, same prompts")
        axes[0, c].legend(fontsize=7)
        for ax in axes[:, c]:
            ax.grid(alpha=0.3)
    fig.suptitle(title or "Logit lens: where the answer forms")
    return fig
