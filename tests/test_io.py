import json
import os
import stat

import pandas as pd
import pytest

from qdiag.core.io import atomic_write_bytes, records, save_analysis


def test_files_get_the_usual_mode_not_a_private_one(tmp_path):
    path = atomic_write_bytes(tmp_path / "a.txt", b"x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "b.txt", object())  # not bytes: fails while writing
    assert list(tmp_path.iterdir()) == []


def test_missing_values_become_null(tmp_path):
    df = pd.DataFrame({"a": [1.0, float("nan")], "b": pd.array([1, None], dtype="Int64")})
    assert records(df) == [{"a": 1.0, "b": 1}, {"a": None, "b": None}]
    save_analysis(tmp_path, "x", {"k": 1}, df)
    doc = json.loads((tmp_path / "x.json").read_text())
    assert doc["rows"][1] == {"a": None, "b": None} and doc["meta"] == {"k": 1}
