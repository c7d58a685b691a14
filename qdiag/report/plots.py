"""Figures shared by the chapters and the CLI; each returns a matplotlib Figure.

Figures are laid out for the book's page: at most about 9 inches wide (panels stacked rather than
side by side), so that at the page's width of about 760 pixels their text stays near its set size."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..quant.quantize import FULL_PRECISION

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


def _width(method: str, bits: int) -> str:
    return "FP (self)" if bits == FULL_PRECISION else f"{method.upper()} {bits}-bit"


def _configs(rows: pd.DataFrame) -> list[tuple[str, int]]:
    seen = rows[["method", "bits"]].drop_duplicates()
    return sorted(map(tuple, seen.to_numpy()), key=lambda mb: (mb[0] != "fp", mb[0], -mb[1]))


def _palette(configs: list) -> list:
    """One colour per quantized width, darker for fewer bits."""
    return sns.color_palette("rocket_r", max(1, len(configs)))


def _panels(n_rows: int, n_cols: int, width: float, height: float, **kw) -> tuple[plt.Figure, np.ndarray]:
    """A grid of ``n_rows x n_cols`` panels, each ``width x height`` inches, always 2-D."""
    return plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows), constrained_layout=True,
                        squeeze=False, **kw)


def _wrapped(fig_or_sub, n: int, max_cols: int = 3, **kw) -> list:
    """``n`` panels in rows of at most ``max_cols`` (the unused ones of the last row hidden)."""
    cols = min(n, max_cols)
    rows = -(-n // cols)
    axes = fig_or_sub.subplots(rows, cols, squeeze=False, **kw).ravel()
    for ax in axes[n:]:
        ax.axis("off")
    return list(axes[:n])


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


_SUBSET_NAMES = {"failure": "Failure (FP right, quantized wrong)", "robust": "Robust (both right)",
                 "all": "all prompts FP gets right"}


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
