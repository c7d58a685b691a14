"""Results on disk: written whole or not at all (a temporary file renamed into place)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: object) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode())


def write_csv(path: str | os.PathLike, df: pd.DataFrame) -> Path:
    return atomic_write_bytes(path, df.to_csv(index=False).encode())


def _jsonable(x: object) -> object:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


def records(df: pd.DataFrame) -> list[dict]:
    """Rows as plain dicts for JSON, with missing values (NaN, NA) as None."""
    return df.astype(object).where(df.notna(), None).to_dict("records")


def save_analysis(out: str | os.PathLike, name: str, meta: dict, rows: pd.DataFrame, extra: dict | None = None,
                  figures: dict | None = None) -> None:
    """Write ``name.json`` (meta, rows, extra keys), ``name.csv`` (the rows) and one PNG per figure
    (``{file stem: Figure}``); every figure is rendered before anything is written, then closed
    (a notebook draws its own; a script that saves many analyses would otherwise keep them all)."""
    import io as _io

    import matplotlib.pyplot as plt  # only where figures are saved: core stays free of plotting

    pngs = {}
    for stem, fig in (figures or {}).items():
        buf = _io.BytesIO()
        fig.savefig(buf, dpi=120)
        plt.close(fig)
        pngs[stem] = buf.getvalue()
    out = Path(out)
    write_json(out / f"{name}.json", {"meta": meta, "rows": records(rows), **(extra or {})})
    write_csv(out / f"{name}.csv", rows)
    for stem, data in pngs.items():
        atomic_write_bytes(out / f"{stem}.png", data)
