"""Figures of the causal tests: patching recovery, zero ablation, clean-signal injection."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from .base import _SUBSET_NAMES, _configs, _palette, _panels, _width, _wrapped


def patching_figure(rows: pd.DataFrame, title: str = "") -> plt.Figure:
    """Recovery heatmaps, layer x token position, one column per site and one row per subset, for
    one configuration: 1 = the reference's answer probability fully restored, 0 = no change."""
    subsets = [s for s in ("failure", "robust") if s in set(rows.subset)] or ["all"]
    sites = [s for s in ("resid", "attn", "mlp") if s in set(rows.site)]
    positions = [p for p in ("last_subject", "last") if p in set(rows.position)]
    fig, axes = plt.subplots(len(subsets), len(sites), figsize=(2.2 * len(sites) + 2, 4.2 * len(subsets)),
                             constrained_layout=True, squeeze=False)
    im = None
    for r, sub in enumerate(subsets):
        for c, site in enumerate(sites):
            d = rows[(rows.subset == sub) & (rows.site == site)]
            grid = d.pivot(index="layer", columns="position", values="recovery").reindex(columns=positions)
            ax = axes[r, c]
            im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", origin="lower", cmap="RdBu_r", vmin=-1, vmax=1)
            ax.set_xticks(range(len(positions)), [p.replace("_", " ") for p in positions])
            ax.set_ylabel("layer")
            n = int(d.n.max()) if len(d) else 0
            ax.set_title(f"{site}\n{sub} (n={n})", fontsize=9)
    fig.colorbar(im, ax=axes, label="recovery of p(correct) (1 = reference restored)", shrink=0.7)
    fig.suptitle(title or "Cross-model patching")
    return fig


def recovery_figure(rows: pd.DataFrame, site: str = "resid", title: str = "") -> plt.Figure:
    """Recovery against the patched layer, one line per width, one panel per (subset, position),
    with 95% bootstrap bands."""
    d = rows[rows.site == site]
    subsets = [s for s in ("failure", "robust") if s in set(d.subset)] or ["all"]
    positions = [p for p in ("last_subject", "last") if p in set(d.position)]
    fig, axes = _panels(len(subsets), len(positions), 4.5, 3.2, sharey=True)
    configs = [c for c in _configs(d) if c[0] != "fp"]
    palette = _palette(configs)
    for r, sub in enumerate(subsets):
        for c, pos in enumerate(positions):
            ax = axes[r, c]
            for k, (m, b) in enumerate(configs):
                g = d[(d.method == m) & (d.bits == b) & (d.subset == sub) & (d.position == pos)].sort_values("layer")
                if g.empty:
                    continue
                ax.plot(g.layer, g.recovery, "o-", ms=3, color=palette[k], label=f"{_width(m, b)} (n={int(g.n.max())})")
                ax.fill_between(g.layer, g.recovery_lo, g.recovery_hi, color=palette[k], alpha=0.15)
            ax.axhline(1, ls="--", color="0.4", lw=1)
            ax.axhline(0, color="0.6", lw=0.8)
            ax.set_title(f"{_SUBSET_NAMES[sub]}, at the {pos.replace('_', ' ')} token", fontsize=9)
            ax.set_xlabel("patched layer")
            ax.set_ylim(-0.5, 1.5)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[r, 0].set_ylabel("recovery")
    fig.suptitle(title or f"Patching the reference's {site} output into the quantized model")
    return fig


def ablation_figure(rows: pd.DataFrame, subset: str = "all", title: str = "") -> plt.Figure:
    """Zero-ablation effect against layer, per site and position: the reference's dependency profile
    (black) and each width's (colours)."""
    d = rows[rows.subset == subset]
    sites = [s for s in ("resid", "attn", "mlp") if s in set(d.site)]
    positions = [p for p in ("last_subject", "last") if p in set(d.position)]
    fig, axes = _panels(len(sites), len(positions), 4.5, 2.8, sharey=True)
    configs = [c for c in _configs(d) if c[0] != "fp"]
    palette = _palette(configs)
    for c, pos in enumerate(positions):
        for r, site in enumerate(sites):
            ax = axes[r, c]
            cell = d[(d.site == site) & (d.position == pos)]
            fp = cell[cell.model == "fp"].groupby("layer")["effect"].mean()  # the same prompts for every width
            ax.plot(fp.index, fp.values, "k-", lw=2, label="reference")
            for k, (m, b) in enumerate(configs):
                g = cell[(cell.model == "quantized") & (cell.method == m) & (cell.bits == b)].sort_values("layer")
                ax.plot(g.layer, g["effect"], "o-", ms=3, color=palette[k], label=_width(m, b))
            ax.axhline(0, color="0.6", lw=0.8)
            ax.set_title(f"zero {site} at the {pos.replace('_', ' ')} token", fontsize=9)
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
    for r in range(len(sites)):
        axes[r, 0].set_ylabel("share of p(answer) lost", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title or "Zero ablation: what each model's answer depends on")
    return fig


def injection_figure(rows: pd.DataFrame, cosine: pd.DataFrame, subset: str = "all", title: str = "") -> plt.Figure:
    """Top: recovery of the answer when the reference's residual stream enters the quantized layers
    from a given layer on. Below, per width: cosine between the injected run's residual stream (last
    token) and the reference's at each later layer."""
    configs = [c for c in _configs(rows) if c[0] != "fp"]
    cols = max(1, min(3, len(configs)))
    nrow = -(-len(configs) // cols)
    fig = plt.figure(figsize=(9, 3.6 + 3.0 * nrow), constrained_layout=True)
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.6, 3.0 * max(1, nrow)])
    ax = top.subplots()
    maps = _wrapped(bottom, len(configs), cols) if configs else []
    palette = _palette(configs)
    for k, (m, b) in enumerate(configs):
        g = rows[(rows.method == m) & (rows.bits == b) & (rows.subset == subset)].sort_values("start_layer")
        ax.plot(g.start_layer, g.recovery, "o-", ms=3, color=palette[k], label=_width(m, b))
        ax.fill_between(g.start_layer, g.recovery_lo, g.recovery_hi, color=palette[k], alpha=0.15)
    ax.axhline(1, ls="--", color="0.4", lw=1)
    ax.set_xlabel("first quantized layer fed the reference's stream")
    ax.set_ylabel("recovery of p(answer)")
    ax.set_title(f"recovery ({_SUBSET_NAMES[subset]})", fontsize=9)
    ax.set_ylim(-0.5, 1.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    im = None
    for mx, (m, b) in zip(maps, configs):
        c = cosine[(cosine.method == m) & (cosine.bits == b)]
        grid = c.pivot(index="start_layer", columns="layer", values="cosine")
        im = mx.imshow(grid.to_numpy(dtype=float), aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
        mx.set_xlabel("layer")
        mx.set_ylabel("injected at layer")
        mx.set_title(f"{_width(m, b)}: cosine with the reference", fontsize=9)
    if im is not None:
        bottom.colorbar(im, ax=maps, label="cosine, last token", shrink=0.8)
    fig.suptitle(title or "Clean-signal injection")
    return fig
