import pytest
import torch

from qdiag.analyses.representations import run_representations
from qdiag.core.models import wrap
from qdiag.measure import metrics as M
from qdiag.quant.plan import uniform_plan
from qdiag.quant.quantize import QuantSpec
from qdiag.quant.quantizer import quantize_model
from qdiag.testing import FACTS, FAMILIES, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_full_precision_against_itself_gives_identity_values(family):
    lm = wrap(tiny_model(family), tiny_tokenizer())
    res = run_representations(lm, FACTS, [QuantSpec(16)], k=4, progress=False)
    assert res.rows.subspace_sim.to_numpy() == pytest.approx(1)
    assert (res.rows.error_alignment == 0).all()
    assert res.cka[("fp", 16)].diagonal() == pytest.approx(1)


def test_rows_match_hidden_states_computed_by_hand():
    model, tok = tiny_model("mistral"), tiny_tokenizer()
    lm = wrap(model, tok)
    spec = QuantSpec(2, group_size=32)
    res = run_representations(lm, FACTS, [spec], position="all", k=3, batch_size=1, progress=False)
    qw = quantize_model(lm, uniform_plan(lm, spec), progress=False)

    def hidden():
        # the runner reads the shortest prompts first; every token of every prompt, in that order.
        # Layer outputs from hooks: transformers' last hidden state has the final norm applied.
        prompts = sorted((p for f in FACTS for p in f.prompts()), key=len)
        seen = {0: [], 1: []}
        hooks = [model.model.layers[i].register_forward_hook(lambda m, a, o, i=i: seen[i].append(o[0]))
                 for i in range(2)]
        for p in prompts:
            model(tok(p, return_tensors="pt").input_ids)
        for h in hooks:
            h.remove()
        return [torch.cat(seen[layer]) for layer in range(2)]

    fp = hidden()
    with qw.applied(lm):
        q = hidden()
    for layer in range(2):
        row = res.rows[res.rows.layer == layer].iloc[0]
        assert row.n_tokens == fp[layer].shape[0]
        assert row.cka_same_layer == pytest.approx(M.linear_cka(fp[layer], q[layer]), abs=1e-6)
        assert row.subspace_sim == pytest.approx(M.activation_subspace_similarity(fp[layer], q[layer], 3), abs=1e-5)
        assert res.cka[("rtn", 2)][layer, 1 - layer] == pytest.approx(M.linear_cka(fp[layer], q[1 - layer]), abs=1e-6)


def test_token_budget_and_single_positions():
    lm = wrap(tiny_model(), tiny_tokenizer())
    capped = run_representations(lm, FACTS, [QuantSpec(16)], max_tokens=7, k=2, progress=False)
    assert set(capped.rows.n_tokens) == {7}
    last = run_representations(lm, FACTS, [QuantSpec(16)], position="last_subject", k=2, progress=False)
    assert set(last.rows.n_tokens) == {3}
    with pytest.raises(ValueError, match="k \\(principal directions\\)"):
        run_representations(lm, FACTS, [QuantSpec(16)], k=0)
