import pytest
import torch

from qdiag.analyses.sensitivity import first_domino, run_sensitivity, sensitivity_plans
from qdiag.core.models import wrap
from qdiag.quant.plan import avg_bits
from qdiag.quant.quantize import QuantSpec
from qdiag.quant.quantizer import quantize_model
from qdiag.testing import known_facts, tiny_model, tiny_tokenizer

SPEC = QuantSpec(3, group_size=32)  # on the fixture, 3 bits leaves both subsets non-empty


@pytest.fixture(scope="module")
def setting():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.lm_head.weight[len(tok):] = -1
    lm = wrap(model, tok)
    facts = known_facts(model, tok)
    return lm, facts, run_sensitivity(lm, facts, [SPEC], progress=False)


def test_plans_cover_what_their_scope_says():
    lm = wrap(tiny_model("qwen2"), tiny_tokenizer())
    layer = dict(sensitivity_plans(lm, SPEC, "layer"))
    assert list(layer) == ["0", "1"] and all(".layers.1." in n for n in layer["1"])
    types = dict(sensitivity_plans(lm, SPEC, "weight_type"))
    assert set(types) == {"q", "k", "v", "o", "gate", "up", "down"} and len(types["down"]) == 2
    prefix = dict(sensitivity_plans(lm, SPEC, "prefix"))
    assert len(prefix["0-0"]) == 7 and len(prefix["0-1"]) == 14
    with pytest.raises(ValueError, match="unknown scope"):
        sensitivity_plans(lm, SPEC, "head")


def test_a_plan_with_every_layer_in_full_precision_reproduces_the_reference_exactly():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    lm = wrap(model, tok)
    ids = torch.randint(4, 40, (2, 9))
    want = model(ids).logits
    plan = {name: QuantSpec(16) for name, _ in sensitivity_plans(lm, SPEC, "prefix")[-1][1].items()}
    with quantize_model(lm, plan, progress=False).applied(lm):
        got = model(ids).logits
    assert torch.equal(got, want)
    assert avg_bits(lm, plan) == 16


def test_the_ends_of_the_sweep_are_the_reference_and_the_quantized_model(setting):
    lm, facts, res = setting
    rows = res.rows.set_index(["scope", "target"])
    none, full = rows.loc[("none", "-")], rows.loc[("all", "all")]
    assert none.n_failure > 0 and none.n_robust > 0  # the fixture's facts give both subsets
    assert none.failure_acc == 1 and full.failure_acc == 0
    assert none.robust_acc == 1 and full.robust_acc == 1
    # the last prefix is the whole model: the same answers as the fully quantized run
    last = rows.loc[("prefix", "0-1")]
    assert last.failure_acc == 0 and last.robust_acc == 1
    assert none.n_robust + none.n_failure == len(facts)
    assert full.avg_bits == pytest.approx(3.5) and none.avg_bits == 16
    assert set(res.rows.scope) == {"none", "all", "layer", "weight_type", "prefix"}


def test_first_domino_reads_the_rows(setting):
    import pandas as pd

    def row(scope, target, robust, failure):  # 3 Robust and 1 Failure prompt
        return {"scope": scope, "target": target, "robust_acc": robust, "failure_acc": failure, "n_robust": 3,
                "n_failure": 1}

    rows = pd.DataFrame([row("layer", "0", 0.2, 1.0), row("layer", "1", 0.9, 0.0),
                         row("prefix", "0-0", 2 / 3, 0.0), row("prefix", "0-1", 1 / 3, 0.0),
                         row("weight_type", "down", 0.3, 0.0), row("weight_type", "q", 0.8, 1.0)])
    f = first_domino(rows)
    # kept shares: layer 0 (0.6 + 1) / 4 = 0.4 < layer 1 (2.7 + 0) / 4 = 0.675
    assert f["worst_layer"] == 0 and f["worst_layer_kept"] == pytest.approx(0.4)
    assert f["half_prefix_end"] == 0 and f["worst_weight_type"] == "down"


def test_an_existing_checkpoint_is_swept_scope_by_scope(setting, tmp_path):
    from qdiag.core.arch import unwrap
    from qdiag.measure import evaluate as ev
    from qdiag.measure.widths import Reference, checkpoint_width
    from qdiag.testing import write_gguf

    lm, facts, _ = setting
    hf = unwrap(lm)
    w = checkpoint_width(lm, write_gguf(hf, lm.tokenizer, tmp_path / "m.gguf", "Q4_0", norm_scale=1.2))
    res = run_sensitivity(lm, facts, [w], scopes=["layer"], progress=False)
    rows = res.rows.set_index(["scope", "target"])
    # costs: the whole file at its storage bits; one layer's matrices at 4.5 bits and the rest at 16
    sizes = {n: hf.get_submodule(n).weight.numel() for n in w.weights.tensors}
    layer0 = sum(v for n, v in sizes.items() if ".layers.0." in n)
    assert rows.loc[("all", "all")].avg_bits == w.avg_bits == 4.5
    assert rows.loc[("layer", "0")].avg_bits == pytest.approx((4.5 * layer0 + 16 * (sum(sizes.values()) - layer0))
                                                              / sum(sizes.values()))
    none = rows.loc[("none", "-")]  # the reference keeps every prompt it answers right
    assert (none.robust_acc == 1 or none.n_robust == 0) and (none.failure_acc == 1 or none.n_failure == 0)
    # "all" is the whole checkpoint, its changed norms included: scored independently with it applied
    right = Reference(lm, facts).reference_right(Reference(lm, facts).score(lm, w))
    with w.applied(lm):
        kept = ev.score_prompts(lm, lm.tokenizer, right.drop(columns="subset")).correct.mean()
    all_rows = res.prompts[res.prompts.scope == "all"]
    assert all_rows.correct.mean() == pytest.approx(kept)
