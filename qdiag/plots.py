"""Figures shared by the chapters and the CLI; each returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .quantize import FULL_PRECISION

_ACC = {"acc_any": "Acc@any", "acc_majority": "Acc@majority", "acc_all": "Acc@all"}


def _bits_axis(ax, widths) -> None:
    widths = sorted(set(widths), reverse=True)
    ax.set_xticks(range(len(widths)), ["FP" if b == FULL_PRECISION else str(b) for b in widths])
    ax.set_xlabel("weight bits (FP = reference)")


def _pos(widths):
    order = sorted(set(widths), reverse=True)
    return {b: i for i, b in enumerate(order)}


def cliff_figure(rows: pd.DataFrame, title: str = "") -> plt.Figure:
    """Perplexity (log scale) and Acc@any/majority/all with 95% intervals against bit width,
    one line per quantizer; the full-precision point is shared by every line."""
    fp = rows[rows.method == "fp"]
    methods = [m for m in rows.method.unique() if m != "fp"]
    pos = _pos(rows.bits)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), constrained_layout=True)
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
