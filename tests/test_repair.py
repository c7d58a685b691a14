import pandas as pd
import pytest
import torch

from qdiag.analyses import repair as R
from qdiag.core.data import Fact
from qdiag.core.models import wrap
from qdiag.measure.amplify import choose_amplification
from qdiag.quant.plan import avg_bits, uniform_plan
from qdiag.quant.quantize import QuantSpec
from qdiag.testing import calib_ids, tiny_model, tiny_tokenizer

SPEC = QuantSpec(4, group_size=32)


def test_protecting_the_first_layer_costs_what_the_arithmetic_says():
    lm = wrap(tiny_model("llama"), tiny_tokenizer())
    plan = R.protect_first(lm, SPEC, k=1)
    # two layers of equal size: half the weights at 8 + 16/32 bits, half at 4 + 16/32
    assert avg_bits(lm, plan) == pytest.approx((8.5 + 4.5) / 2)
    assert R.protect_first(lm, SPEC, k=0) == uniform_plan(lm, SPEC)
    with pytest.raises(ValueError, match="k must be in"):
        R.protect_first(lm, SPEC, k=3)


def test_kurtosis_by_hand_and_the_rule_protects_outlier_matrices():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(200, 300, generator=g)
    assert R.excess_kurtosis(normal).item() == pytest.approx(0, abs=0.1)
    x = torch.tensor([1.0, -1.0, 1.0, -1.0])  # two-point distribution: kurtosis 1, excess -2
    assert R.excess_kurtosis(x).item() == pytest.approx(-2)
    model = tiny_model("llama")
    target = model.model.layers[1].mlp.down_proj.weight
    target.data[0, 0] = 50 * target.abs().max()  # one outlier weight
    lm = wrap(model, tiny_tokenizer())
    table = R.kurtosis_table(lm)
    plan = R.protect_kurtosis(lm, SPEC, threshold=20, table=table)
    high = [n for n, s in plan.items() if s.bits == 8]
    assert high == ["model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="granularity"):
        R.protect_kurtosis(lm, SPEC, 1.0, granularity="head")
    t = R.threshold_for_share(table, 0.25)
    assert (table["kurtosis"] > t).sum() == round(0.25 * len(table))


def test_matching_uniform_picks_the_closest_group_size():
    lm = wrap(tiny_model("llama"), tiny_tokenizer())
    # groups of 64, 32, 16 cost 4 + 16/64, 4 + 16/32, 4 + 16/16 bits
    spec, bits = R.matching_uniform(lm, SPEC, target_bits=4.55, candidates=(64, 32, 16))
    assert spec.group_size == 32 and bits == pytest.approx(4.5)
    spec, bits = R.matching_uniform(lm, SPEC, target_bits=5.0)
    assert spec.group_size == 16 and bits == pytest.approx(5.0)


def test_the_split_is_disjoint_and_alpha_is_chosen_on_held_out_facts_only():
    facts = [Fact("P1", f"s{i}", "o", ("[X] is [Y]",)) for i in range(10)]
    choose, score = R.split_facts(facts, seed=3)
    assert not {f.id for f in choose} & {f.id for f in score} and len(choose) + len(score) == 10
    # alpha 0 is right on the held-out facts, alpha 9 on the scored ones: the choice must be 0
    rows = []
    for f in facts:
        held = f in choose
        for alpha in (0.0, 9.0):
            rows.append({"fact": f.id, "template": 0, "rule": "fixed", "layer": 1, "alpha": alpha,
                         "correct": (alpha == 0.0) == held})
    best = choose_amplification(pd.DataFrame(rows), [f.id for f in choose])
    assert best["alpha"] == 0.0 and best["held_out_acc"] == 1
    assert set(best["held_out_facts"]) == {f.id for f in choose}


def test_run_repair_scores_on_facts_it_did_not_choose_on():
    from qdiag.testing import known_facts

    model, tok = tiny_model("llama", layers=4), tiny_tokenizer()
    model.lm_head.weight[len(tok):] = -1
    lm = wrap(model, tok)
    facts = known_facts(model, tok)
    res = R.run_repair(lm, facts, [QuantSpec(3, group_size=32)], calib_ids(4, 16), protect_k=(1,),
                       kurtosis_thresholds=(0.5,), eora_ranks=(4,), inject_layer=2, progress=False)
    rows = res.rows.set_index("repair")
    assert list(rows.index) == ["none", "protect_first", "protect_kurtosis", "eora", "amplify", "inject"]
    assert not set(res.held_out_facts) & set(res.scored_facts)
    assert set(res.choice[0]["held_out_facts"]) <= set(res.held_out_facts)
    assert rows.loc["none", "avg_bits"] == pytest.approx(3.5)
    assert rows.loc["protect_first", "avg_bits"] == pytest.approx((8.5 + 3 * 3.5) / 4)
    assert rows.loc["eora", "avg_bits"] > 3.5
    # the plain configuration is its own uniform baseline
    assert rows.loc["none", "baseline_group_size"] == 32
    assert rows.loc["none", "failure_acc"] == rows.loc["none", "baseline_failure_acc"] == 0
    assert rows.loc["none", "robust_acc"] == 1
    assert rows.loc["none", "beats_uniform"] is None and rows.loc["eora", "beats_uniform"] in (True, False)


def test_findings_leave_injection_out_of_the_deployable_repairs():
    rows = pd.DataFrame({"bits": 4, "repair": ["none", "protect_first", "eora", "inject"],
                         "params": ["", "k=2", "rank=16", "layer=15"], "failure_acc": [0.0, 0.05, 0.0, 0.4],
                         "n_failure": 20, "n_robust": 4, "beats_uniform": [None, True, False, None]})
    found = R.findings(rows, 4)
    assert found["w4_best_repair"] == "protect_first (k=2)" and found["w4_best_failure_acc"] == 0.05
    assert found["w4_any_repairs"] is False  # injection's 0.4 needs the reference: not a repair
    assert found["w4_inject_acc"] == 0.4
    assert found["w4_beats"] == "protect_first (k=2)" and found["w4_does_not_beat"] == "eora (rank=16)"
