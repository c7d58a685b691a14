import pandas as pd
import pytest

from qdiag.analyses import cliff
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


def test_retention_is_the_share_of_known_prompts_a_width_keeps():
    import torch

    from qdiag.analyses.cliff import run_cliff
    from qdiag.core.models import wrap
    from qdiag.measure import evaluate as ev
    from qdiag.measure.widths import each_width
    from qdiag.quant.quantize import QuantSpec
    from qdiag.testing import knowing_model

    hf, tok, known = knowing_model(many=True)
    lm = wrap(hf, tok)
    specs = [QuantSpec(16), QuantSpec(3, 16), QuantSpec(2, 16)]
    tokens = torch.randint(4, 40, (64,), generator=torch.Generator().manual_seed(0))
    res = run_cliff(lm, known[:2], specs, tokens, ppl_window=32, n_generations=0, progress=False, known=known)
    rows = res.rows.set_index("bits")
    assert rows.loc[16, "retention"] == 1 and rows.loc[16, "n_known"] == len(known)
    # independently: the known prompts each width still answers right, scored afresh
    table = ev.prompt_table(known, tok)
    for w in each_width(lm, specs[1:], progress=False):
        with w.applied(lm):
            kept = ev.score_prompts(lm, tok, table).correct.mean()
        assert rows.loc[w.bits, "retention"] == kept
        assert rows.loc[w.bits, "retention_lo"] <= kept <= rows.loc[w.bits, "retention_hi"]
    assert set(res.ranked.method) == {"fp", "rtn"} and len(res.ranked) == 3 * len(known)
    assert "rtn3_retention" in findings(res)


def test_quantizer_findings_compare_quantizers_at_each_width():
    rows = pd.DataFrame({"method": ["fp", "rtn", "awq", "q4_0", "rtn", "hqq"], "bits": [16, 4, 4, 4, 3, 3],
                         "avg_bits": [16, 4.125, 4.125, 4.5, 3.125, 3.25], "ppl": [10, 14, 12, 13, 30, 24],
                         "retention": [1, 0.5, 0.6, 0.7, 0.2, 0.1]})
    f = cliff.quantizer_findings(rows)
    assert (f["best_ppl_4"], f["best_ppl_4_avg_bits"], f["ppl_spread_4"]) == ("awq", 4.125, 14 / 12)
    assert (f["best_retention_4"], f["same_best_4"]) == ("q4_0", False)
    assert (f["best_ppl_3"], f["best_retention_3"], f["same_best_3"]) == ("hqq", "rtn", False)
    assert f["retention_spread_3"] == pytest.approx(0.1)
    assert cliff.quantizer_findings(rows[rows.method.isin(["fp", "rtn"])]) == {}  # one quantizer: nothing to compare
