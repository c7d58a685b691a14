"""What the chapters' figures share: width labels, colours, panel grids."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ...quant.quantize import FULL_PRECISION

_ACC = {"acc_any": "Acc@any", "acc_majority": "Acc@majority", "acc_all": "Acc@all"}


def _bits_axis(ax, widths) -> None:
    widths = sorted(set(widths), reverse=True)
    ax.set_xticks(range(len(widths)), ["FP" if b == FULL_PRECISION else str(b) for b in widths])
    ax.set_xlabel("weight bits (FP = reference)")


def _pos(widths):
    order = sorted(set(widths), reverse=True)
    return {b: i for i, b in enumerate(order)}


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


_SUBSET_NAMES = {"failure": "Failure (FP right, quantized wrong)", "robust": "Robust (both right)",
                 "all": "all prompts FP gets right"}
