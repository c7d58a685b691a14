import pandas as pd

from qdiag.analyses.cliff import CliffResult, findings


def result(q_ranks: list[int]) -> CliffResult:
    """FP gets prompts a/0 and b/0 right (c/0 wrong); a 4-bit RTN run puts them at ``q_ranks``."""
    key = [("a", 0), ("b", 0), ("c", 0)]
    fp = pd.DataFrame([{"fact": f, "template": t, "rank": r, "correct": r == 1} for (f, t), r in zip(key, [1, 1, 9])])
    q = pd.DataFrame([{"fact": f, "template": t, "rank": r, "correct": r == 1}
                      for (f, t), r in zip(key, [*q_ranks, 2])])
    prompts = pd.concat([fp.assign(method="fp", bits=16), q.assign(method="rtn", bits=4)])
    rows = pd.DataFrame([{"method": "fp", "bits": 16, "ppl": 10.0, "acc_any": 2 / 3},
                         {"method": "rtn", "bits": 4, "ppl": 15.0, "acc_any": 0.0}])
    return CliffResult(rows, prompts, pd.DataFrame())


def test_findings_from_a_hand_made_run():
    f = findings(result([3, 5]))
    assert f["rtn4_ppl_ratio"] == 1.5 and f["n_fp_right"] == 2
    assert f["rtn4_median_rank_fp_right"] == 4 and f["rtn4_top5_share"] == 1
    assert f["rtn4_rank_drop"] is True and f["rtn4_rank_collapse"] is False
    g = findings(result([2000, 30000]))
    assert g["rtn4_rank_drop"] is False and g["rtn4_rank_collapse"] is True
