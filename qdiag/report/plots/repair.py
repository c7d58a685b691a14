"""Figures of sensitivity and repair: the first domino, and repairs against their bits."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns


def sensitivity_figure(rows: pd.DataFrame, title: str = "") -> plt.Figure:
    """Robust and Failure accuracy when only one layer (top), one weight type (middle) or the
    layers 0..k (bottom) are quantized, with 95% bootstrap intervals; dotted: the fully quantized
    model."""
    scopes = [s for s in ("layer", "weight_type", "prefix") if s in set(rows.scope)]
    fig, axes = plt.subplots(len(scopes), 1, figsize=(8, 3.1 * len(scopes)), constrained_layout=True,
                             squeeze=False, sharey=True)
    full = rows[rows.scope == "all"]
    colours = {"robust": "tab:blue", "failure": "tab:red"}
    for ax, scope in zip(axes[:, 0], scopes):
        d = rows[rows.scope == scope].reset_index(drop=True)
        x = np.arange(len(d))
        for name, colour in colours.items():
            err = np.vstack([d[f"{name}_acc"] - d[f"{name}_acc_lo"], d[f"{name}_acc_hi"] - d[f"{name}_acc"]])
            n = int(d[f"n_{name}"].iloc[0]) if len(d) else 0
            ax.errorbar(x, d[f"{name}_acc"], yerr=np.nan_to_num(err), fmt="o-", ms=3, capsize=2, color=colour,
                        label=f"{name} (n={n})")
            if len(full):
                ax.axhline(float(full[f"{name}_acc"].iloc[0]), ls=":", color=colour, lw=1)
        labels = d.target.tolist()
        step = max(1, len(labels) // 15)
        ax.set_xticks(x[::step], [labels[i] for i in range(0, len(labels), step)],
                      rotation=45 if scope == "prefix" else 0)
        ax.set_xlabel({"layer": "the one quantized layer", "weight_type": "the one quantized weight type",
                       "prefix": "quantized layers 0..k"}[scope])
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("share of prompts right")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title or "Sensitivity: which part breaks the answers")
    return fig


def pareto_figure(rows: pd.DataFrame, title: str = "") -> plt.Figure:
    """Failure-subset accuracy (top) and Robust-subset accuracy (bottom) against average bits: each
    repair (coloured) and the uniform configuration of the closest bits (grey squares, joined to it)."""
    fig, axes = plt.subplots(2, 1, figsize=(8, 7.4), constrained_layout=True, sharex=True)
    d = rows[rows.avg_bits.notna()]
    repairs = list(dict.fromkeys(d.repair))
    palette = dict(zip(repairs, sns.color_palette("colorblind", len(repairs))))
    for ax, name in zip(axes, ("failure", "robust")):
        for _, r in d.iterrows():
            label = f"{r.repair} {r.params}".strip()
            ax.errorbar(r.avg_bits, r[f"{name}_acc"], yerr=[[r[f"{name}_acc"] - r[f"{name}_acc_lo"]],
                        [r[f"{name}_acc_hi"] - r[f"{name}_acc"]]], fmt="o", capsize=2, color=palette[r.repair],
                        label=label)
            if "baseline_avg_bits" in r and pd.notna(r.baseline_avg_bits):  # none for an existing checkpoint
                ax.plot([r.avg_bits, r.baseline_avg_bits], [r[f"{name}_acc"], r[f"baseline_{name}_acc"]], ":",
                        color="0.6", lw=1)
        if "baseline_avg_bits" in d:
            base = d[d.baseline_avg_bits.notna()].drop_duplicates(["method", "bits", "baseline_group_size"])
            ax.plot(base.baseline_avg_bits, base[f"baseline_{name}_acc"], "s", color="0.4",
                    label="uniform, closest bits")
        ax.set_xlabel("average bits per weight")
        ax.set_ylabel(f"{name} subset: share right")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="outside lower center", ncol=3)
    fig.suptitle(title or "Repairs against uniform quantization at the same bits")
    return fig


_ROWS = {"file": ("the user's file", "X", "0.2"), "comparator": ("llama.cpp's file at that size", "s", "#0173b2"),
         "prescription": ("qdiag's prescription", "o", "#d55e00"), "random": ("random allocation", "v", "0.6"),
         "eora": ("EoRA on the user's file", "D", "#029e73")}


def equal_bytes_figure(table: pd.DataFrame, title: str = "") -> plt.Figure:
    """Answers lost (top, with 95% intervals) and KL to the reference (bottom, log scale) against
    the bytes of the tensors a prescription may change: at each size llama.cpp offers (a grey band
    per group, labelled), its own file, the prescription and the other rows at the same bytes."""
    fig, axes = plt.subplots(2, 1, figsize=(8.5, 7.6), constrained_layout=True, sharex=True)
    mb = table.bytes / 1e6
    for ax, col in zip(axes, ("lost", "kl")):
        for group, g in table[table.row != "file"].groupby("group", sort=False):
            lo, hi = g.bytes.min() / 1e6, g.bytes.max() / 1e6
            pad = 0.004 * mb.max()
            ax.axvspan(lo - pad, hi + pad, color="0.93", zorder=0)
            if col == "lost":
                ax.annotate(group, ((lo + hi) / 2, 1.02), ha="center", va="bottom", fontsize=8,
                            xycoords=("data", "axes fraction"))
        for row, (label, marker, color) in _ROWS.items():
            d = table[table.row == row]
            if d.empty:
                continue
            y = d[col]
            err = None if col != "lost" else [y - d.lost_lo, d.lost_hi - y]
            ax.errorbar(d.bytes / 1e6, y, yerr=err, fmt=marker, color=color, capsize=2, ms=7 if row != "random" else 5,
                        label=label, alpha=0.9, lw=1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of the reference's\nright answers lost")
    axes[0].set_ylim(-0.03, 1.03)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("KL to the reference (nats/token)")
    axes[1].set_xlabel("bytes of the decoder's matrices, token embedding and head (MB)")
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="outside lower center", ncol=3)
    fig.suptitle(title or "The prescription against the alternatives at equal bytes", y=1.04)
    return fig
