"""Tables for the page: the columns a reader needs, each estimate and its interval in one cell.

A results table keeps ``x``, ``x_lo`` and ``x_hi`` as separate numeric columns (for analysis); on a
page they take three columns where one says it: ``0.25 [0.10, 0.40]``."""

from __future__ import annotations

import pandas as pd


def with_intervals(rows: pd.DataFrame, columns: list[str], digits: int = 2, precision: int | None = None,
                   intervals: list[str] | None = None) -> pd.DataFrame:
    """``columns`` of ``rows``, each one that has ``_lo`` / ``_hi`` companions (or, when given, each of
    ``intervals``) shown as ``x [lo, hi]`` to ``digits`` decimals, other numbers rounded to ``precision``
    (default ``digits``); missing values stay blank."""
    missing = [c for c in columns if c not in rows]
    if missing:
        raise KeyError(f"no column {missing} in the table; it has {list(rows.columns)}")
    out = pd.DataFrame(index=rows.index)
    for c in columns:
        if f"{c}_lo" in rows and f"{c}_hi" in rows and (intervals is None or c in intervals):
            out[c] = [_estimate(x, lo, hi, digits) for x, lo, hi in zip(rows[c], rows[f"{c}_lo"], rows[f"{c}_hi"])]
        elif pd.api.types.is_float_dtype(rows[c]):
            out[c] = rows[c].round(digits if precision is None else precision)
        else:
            out[c] = rows[c]
    return out


def _estimate(x, lo, hi, digits: int) -> str:
    if pd.isna(x):
        return ""
    if pd.isna(lo) or pd.isna(hi):
        return f"{x:.{digits}f}"
    return f"{x:.{digits}f}\u00a0[{lo:.{digits}f},\u00a0{hi:.{digits}f}]"  # no-break spaces: one line


def page(rows: pd.DataFrame, columns: list[str], digits: int = 4, intervals: list[str] | None = None):
    """The table a chapter shows: ``with_intervals`` (intervals to two decimals; only for ``intervals``
    when given, to fit the page), other numbers to ``digits`` significant digits (a 2-bit perplexity of
    millions stays short), no index column."""
    table = with_intervals(rows, columns, precision=12, intervals=intervals)
    floats = [c for c in table.columns if pd.api.types.is_float_dtype(table[c])]
    return table.style.hide(axis="index").format(lambda v: "" if pd.isna(v) else f"{v:.{digits}g}", subset=floats)
