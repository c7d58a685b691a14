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


def _width(method: str, bits: int) -> str:
    return "FP (self)" if bits == FULL_PRECISION else f"{method.upper()} {bits}-bit"


def _configs(rows: pd.DataFrame) -> list[tuple[str, int]]:
    seen = rows[["method", "bits"]].drop_duplicates()
    return sorted(map(tuple, seen.to_numpy()), key=lambda mb: (mb[0] != "fp", mb[0], -mb[1]))


def attention_figure(rows: pd.DataFrame, position: str, title: str = "") -> plt.Figure:
    """Heatmaps layer x head: normalized attention entropy of the reference and of each
    configuration (top row, 0 to 1), and the JSD of each configuration's attention from the
    reference's (bottom row, 0 to ln 2)."""
    d = rows[(rows.position == position) & rows["head"].notna()]
    configs = [c for c in _configs(d) if c[0] != "fp"]
    ncol = 1 + len(configs)
    fig, axes = plt.subplots(2, ncol, figsize=(2.6 * ncol + 1, 7), constrained_layout=True, squeeze=False)

    def heat(ax, frame, value, vmax, cmap, label):
        grid = frame.pivot(index="layer", columns="head", values=value).astype(float)
        im = ax.imshow(grid.to_numpy(), aspect="auto", vmin=0, vmax=vmax, cmap=cmap, origin="lower")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(label, fontsize=10)
        return im

    first = d[(d.method == configs[0][0]) & (d.bits == configs[0][1])] if configs else d
    im = heat(axes[0, 0], first, "attn_entropy_fp", 1, "viridis", "reference: entropy")
    axes[1, 0].axis("off")
    for i, (m, b) in enumerate(configs, start=1):
        frame = d[(d.method == m) & (d.bits == b)]
        heat(axes[0, i], frame, "attn_entropy", 1, "viridis", f"{_width(m, b)}: entropy")
        jm = heat(axes[1, i], frame, "attn_jsd", np.log(2), "magma", f"{_width(m, b)}: JSD from reference")
    fig.colorbar(im, ax=axes[0, :], label="normalized entropy (1 = uniform)", shrink=0.8)
    if configs:
        fig.colorbar(jm, ax=axes[1, 1:], label="Jensen-Shannon divergence (max ln 2)", shrink=0.8)
    fig.suptitle(title or f"Attention per layer and head, query at the {position.replace('_', ' ')} token")
    return fig


# The paper's reference marks: SFR above 30% is "severe"; about 0.1 Jaccard and 0 cosine at 2 bits.
PAPER_MARKS = {"gate_sfr": 0.3, "neuron_jaccard": 0.1, "mlp_cosine": 0.0}


def mlp_figure(rows: pd.DataFrame, position: str, title: str = "", gated: bool = True) -> plt.Figure:
    """Gate sign flip rate, top-neuron Jaccard and MLP-output cosine against layer, one line per
    configuration, with the paper's 2-bit reference marks dashed."""
    d = rows[(rows.position == position) & rows["head"].isna()]
    configs = [c for c in _configs(d) if c[0] != "fp"]
    gate = "gate" if gated else "first-projection"
    labels = {"gate_sfr": f"{gate} sign flip rate", "neuron_jaccard": "top-neuron Jaccard",
              "mlp_cosine": "MLP output cosine"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), constrained_layout=True)
    palette = sns.color_palette("rocket_r", max(1, len(configs)))
    for c, (m, b) in enumerate(configs):
        frame = d[(d.method == m) & (d.bits == b)].sort_values("layer")
        for ax, key in zip(axes, labels):
            ax.plot(frame.layer, frame[key], "o-", ms=3, color=palette[c], label=_width(m, b))
    for ax, (key, label) in zip(axes, labels.items()):
        ax.axhline(PAPER_MARKS[key], ls="--", color="0.4", lw=1, label="paper, 2-bit")
        ax.set_title(label)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("vs the reference, same inputs")
    axes[1].set_ylim(-0.02, 1.02)
    axes[2].set_ylim(min(-0.1, float(d.mlp_cosine.min()) - 0.05), 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or f"MLP per layer, at the {position.replace('_', ' ')} token")
    return fig


def cka_figure(cka: dict, title: str = "") -> plt.Figure:
    """One layer x layer linear-CKA heatmap per configuration (reference layers down, quantized
    layers across); a bright diagonal means each layer still represents what its reference did."""
    configs = [c for c in sorted(cka, key=lambda mb: (mb[0] != "fp", mb[0], -mb[1]))]
    fig, axes = plt.subplots(1, len(configs), figsize=(3.4 * len(configs) + 1, 3.6), constrained_layout=True,
                             squeeze=False)
    for ax, (m, b) in zip(axes[0], configs):
        im = ax.imshow(np.asarray(cka[(m, b)]), vmin=0, vmax=1, cmap="viridis", origin="lower")
        ax.set_title(_width(m, b), fontsize=10)
        ax.set_xlabel("quantized layer")
        ax.set_ylabel("reference layer")
    fig.colorbar(im, ax=axes[0, :], label="linear CKA", shrink=0.9)
    fig.suptitle(title or "Linear CKA between reference and quantized hidden states")
    return fig


def subspace_figure(rows: pd.DataFrame, title: str = "") -> plt.Figure:
    """Subspace similarity and error alignment against layer, one line per configuration, with
    the paper's marks (0.8 / about 0 for subspace similarity; 0.3 / 0.8 for error alignment) and
    the k/d level of error spread evenly over all directions."""
    configs = [c for c in _configs(rows) if c[0] != "fp"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    palette = sns.color_palette("rocket_r", max(1, len(configs)))
    for c, (m, b) in enumerate(configs):
        frame = rows[(rows.method == m) & (rows.bits == b)].sort_values("layer")
        axes[0].plot(frame.layer, frame.subspace_sim, "o-", ms=3, color=palette[c], label=_width(m, b))
        axes[1].plot(frame.layer, frame.error_alignment, "o-", ms=3, color=palette[c], label=_width(m, b))
    axes[0].axhline(0.8, ls="--", color="0.4", lw=1, label="paper: 4-bit above")
    axes[1].axhline(0.3, ls="--", color="tab:blue", lw=1, label="paper: 4-bit")
    axes[1].axhline(0.8, ls="--", color="tab:red", lw=1, label="paper: 2-bit")
    if "k" in rows and "d_model" in rows:
        axes[1].axhline(float(rows.k.iloc[0] / rows.d_model.iloc[0]), ls=":", color="0.3", lw=1,
                        label="k/d (error spread evenly)")
    axes[0].set_title("top-k principal subspace similarity")
    axes[1].set_title("error alignment with the reference's subspace")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
