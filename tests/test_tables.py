"""Page tables: an estimate and its interval in one cell, other columns as they are."""

import numpy as np
import pandas as pd
import pytest

from qdiag.report.tables import page, with_intervals


def test_intervals_join_their_estimate_and_other_columns_stay():
    rows = pd.DataFrame({"method": ["rtn", "gptq"], "acc": [0.25, np.nan], "acc_lo": [0.1, np.nan],
                         "acc_hi": [0.4, np.nan], "ppl": [31.987, 28.4651], "n": [40, 12]})
    t = with_intervals(rows, ["method", "acc", "ppl", "n"])
    assert list(t.columns) == ["method", "acc", "ppl", "n"]
    assert t.acc.tolist() == ["0.25\u00a0[0.10,\u00a00.40]", ""]
    assert t.ppl.tolist() == [31.99, 28.47] and t.n.tolist() == [40, 12]


def test_an_interval_with_a_missing_end_shows_the_estimate_alone():
    rows = pd.DataFrame({"acc": [0.5], "acc_lo": [np.nan], "acc_hi": [0.7]})
    assert with_intervals(rows, ["acc"], digits=1).acc.tolist() == ["0.5"]


def test_a_column_that_is_not_there_is_named():
    with pytest.raises(KeyError, match="retention"):
        with_intervals(pd.DataFrame({"acc": [0.5]}), ["retention"])


def test_the_page_table_hides_the_index_and_keeps_numbers_short():
    rows = pd.DataFrame({"kl": [0.012345], "ppl": [7293259.26], "acc": [0.5], "acc_lo": [0.25], "acc_hi": [0.75]},
                        index=[7])
    html = page(rows, ["kl", "ppl", "acc"]).to_html()
    assert "0.01235" in html and "7.293e+06" in html and "0.50\u00a0[0.25,\u00a00.75]" in html
    assert ">7<" not in html


def test_intervals_only_where_asked():
    rows = pd.DataFrame({"acc": [0.5], "acc_lo": [0.25], "acc_hi": [0.75], "rob": [0.9], "rob_lo": [0.8],
                         "rob_hi": [1.0]})
    t = with_intervals(rows, ["acc", "rob"], intervals=["acc"])
    assert t.acc.tolist() == ["0.50\u00a0[0.25,\u00a00.75]"] and t.rob.tolist() == [0.9]
