import pytest
import torch

from qdiag.analyses.causal import run_causal
from qdiag.core import positions as P
from qdiag.core.data import Fact
from qdiag.core.models import wrap
from qdiag.measure.patch import Edit, patch_nnsight
from qdiag.measure.trace import collect
from qdiag.quant.plan import uniform_plan
from qdiag.quant.quantize import QuantSpec
from qdiag.quant.quantizer import quantize_model
from qdiag.testing import TEMPLATES, known_facts, tiny_model, tiny_tokenizer

SPEC = QuantSpec(2, group_size=32)


@pytest.fixture(scope="module")
def setting():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.lm_head.weight[len(tok):] = -1  # ids the tokenizer does not have are never predicted
    lm = wrap(model, tok)
    facts = known_facts(model, tok)
    assert len(facts) >= 5
    res = run_causal(lm, facts, [SPEC], batch_size=4, progress=False)
    return lm, facts, res


def test_patching_the_last_residual_at_the_last_token_recovers_exactly(setting):
    _, facts, res = setting
    p = res.patching
    top = p[(p.layer == p.layer.max()) & (p.site == "resid") & (p.position == "last")]
    assert set(top.subset) >= {"all"}
    assert top.recovery.to_numpy() == pytest.approx(1, abs=1e-4)
    prompts = res.prompts[(res.prompts.layer == 1) & (res.prompts.site == "resid") & (res.prompts.position == "last")]
    assert prompts.p_patched.to_numpy() == pytest.approx(prompts.p_fp.to_numpy(), abs=1e-5)
    assert len(prompts) == len(facts)  # every prompt is one the reference gets right


def test_a_cell_matches_nnsight_patching_by_hand(setting):
    lm, facts, res = setting
    qw = quantize_model(lm, uniform_plan(lm, SPEC), progress=False)
    f = facts[0]
    batch = P.encode(lm.tokenizer, f.prompts(), [P.subject_end(f, 0)])
    subj = batch["last_subject"]
    fp_mlp = collect(lm, batch, ("mlp_out",))["mlp_out"][0][torch.arange(1), subj]
    answer = lm.tokenizer(" " + f.obj, add_special_tokens=False).input_ids[0]
    with qw.applied(lm):
        logits = patch_nnsight(lm, batch, [Edit(0, "mlp", subj, fp_mlp)])
    want = torch.softmax(logits, -1)[0, answer].item()
    got = res.prompts.query("fact == @f.id and layer == 0 and site == 'mlp' and position == 'last_subject'")
    assert got.p_patched.item() == pytest.approx(want, abs=1e-5)
    # zero ablation of layer 1's attention at the subject, in the quantized model, over every prompt
    ablated = []
    with qw.applied(lm):
        for g in facts:
            b = P.encode(lm.tokenizer, g.prompts(), [P.subject_end(g, 0)])
            a = lm.tokenizer(" " + g.obj, add_special_tokens=False).input_ids[0]
            z = patch_nnsight(lm, b, [Edit(1, "attn", b["last_subject"], 0.0)])
            ablated.append(torch.softmax(z, -1)[0, a].item())
    abl = res.ablation.query("model == 'quantized' and layer == 1 and site == 'attn' and position == 'last_subject' "
                             "and subset == 'all'")
    assert abl.p_ablated.item() == pytest.approx(sum(ablated) / len(ablated), abs=1e-5)


def test_injection_and_ablation_tables(setting):
    lm, facts, res = setting
    inj = res.injection[res.injection.subset == "all"].set_index("start_layer")
    assert inj.loc[0, "recovery"] == pytest.approx(0, abs=1e-6)  # nothing injected
    assert inj.loc[0, "n"] == len(facts)
    cos = res.injection_cosine
    at_start = cos[cos.layer == cos.start_layer - 1]  # the injected layer itself is the reference's
    assert at_start.cosine.to_numpy() == pytest.approx(1, abs=1e-5)
    sim = res.ablation_similarity
    assert set(sim.subset) >= {"all"} and sim.profile_r.between(-1, 1).all()
    assert set(res.ablation.model) == {"fp", "quantized"}


def test_bad_input():
    lm = wrap(tiny_model(), tiny_tokenizer())
    facts = [Fact("P36", "France", "Paris", (TEMPLATES[0],))]
    with pytest.raises(ValueError, match="one token per prompt"):
        run_causal(lm, facts, [SPEC], positions=["all"])
    with pytest.raises(ValueError, match="unknown sites"):
        run_causal(lm, facts, [SPEC], sites=["embed"])
    with pytest.raises(ValueError, match="no quantized configuration"):
        run_causal(lm, facts, [QuantSpec(16)])
