"""Figures of the components and representations: attention, MLP gates and outputs, CKA, subspaces."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .base import _configs, _palette, _width, _wrapped


def attention_figure(rows: pd.DataFrame, position: str, title: str = "") -> plt.Figure:
    """Heatmaps layer x head: normalized attention entropy of the reference and of each
    configuration (left column, 0 to 1; the reference first), and the JSD of each configuration's
    attention from the reference's (right column, 0 to ln 2); one row per configuration."""
    d = rows[(rows.position == position) & rows["head"].notna()]
    configs = [c for c in _configs(d) if c[0] != "fp"]
    nrow = 1 + len(configs)
    fig, axes = plt.subplots(nrow, 2, figsize=(8, 2.5 * nrow + 0.6), constrained_layout=True, squeeze=False)

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
    axes[0, 1].axis("off")
    for i, (m, b) in enumerate(configs, start=1):
        frame = d[(d.method == m) & (d.bits == b)]
        heat(axes[i, 0], frame, "attn_entropy", 1, "viridis", f"{_width(m, b)}: entropy")
        jm = heat(axes[i, 1], frame, "attn_jsd", np.log(2), "magma", f"{_width(m, b)}: JSD from reference")
    fig.colorbar(im, ax=axes[:, 0], label="normalized entropy (1 = uniform)", shrink=0.6, location="bottom")
    if configs:
        fig.colorbar(jm, ax=axes[1:, 1], label="Jensen-Shannon divergence (max ln 2)", shrink=0.6, location="bottom")
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
    fig, axes = plt.subplots(3, 1, figsize=(8, 8.4), constrained_layout=True, sharex=True)
    palette = _palette(configs)
    for c, (m, b) in enumerate(configs):
        frame = d[(d.method == m) & (d.bits == b)].sort_values("layer")
        for ax, key in zip(axes, labels):
            ax.plot(frame.layer, frame[key], "o-", ms=3, color=palette[c], label=_width(m, b))
    for ax, (key, label) in zip(axes, labels.items()):
        ax.axhline(PAPER_MARKS[key], ls="--", color="0.4", lw=1, label="paper, 2-bit")
        ax.set_title(label)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_ylabel("vs the reference, same inputs", fontsize=9)
    axes[1].set_ylim(-0.02, 1.02)
    axes[2].set_ylim(min(-0.1, float(d.mlp_cosine.min()) - 0.05), 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or f"MLP per layer, at the {position.replace('_', ' ')} token")
    return fig


def cka_figure(cka: dict, title: str = "") -> plt.Figure:
    """One layer x layer linear-CKA heatmap per configuration (reference layers down, quantized
    layers across); a bright diagonal means each layer still represents what its reference did."""
    configs = [c for c in sorted(cka, key=lambda mb: (mb[0] != "fp", mb[0], -mb[1]))]
    cols = min(3, len(configs))
    fig = plt.figure(figsize=(2.9 * cols + 1.2, 3.0 * -(-len(configs) // cols) + 0.5), constrained_layout=True)
    axes = _wrapped(fig, len(configs), cols)
    for ax, (m, b) in zip(axes, configs):
        im = ax.imshow(np.asarray(cka[(m, b)]), vmin=0, vmax=1, cmap="viridis", origin="lower")
        ax.set_title(_width(m, b), fontsize=10)
        ax.set_xlabel("quantized layer")
        ax.set_ylabel("reference layer")
    fig.colorbar(im, ax=axes, label="linear CKA", shrink=0.8)
    fig.suptitle(title or "Linear CKA between reference and quantized hidden states")
    return fig


def subspace_figure(rows: pd.DataFrame, title: str = "") -> plt.Figure:
    """Subspace similarity and error alignment against layer, one line per configuration, with
    the paper's marks (0.8 / about 0 for subspace similarity; 0.3 / 0.8 for error alignment) and
    the k/d level of error spread evenly over all directions."""
    configs = [c for c in _configs(rows) if c[0] != "fp"]
    fig, axes = plt.subplots(2, 1, figsize=(8, 6.6), constrained_layout=True, sharex=True)
    palette = _palette(configs)
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
