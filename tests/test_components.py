import math

import pytest
import torch

from qdiag.analyses.components import run_components
from qdiag.core.models import wrap
from qdiag.quant.plan import uniform_plan
from qdiag.quant.quantize import QuantSpec
from qdiag.quant.quantizer import quantize_model
from qdiag.testing import FACTS, FAMILIES, tiny_model, tiny_tokenizer


def sharpened(family: str = "llama"):
    """A tiny model whose attention is far from uniform (random init gives near-uniform maps)."""
    model = tiny_model(family)
    for name, p in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            p.mul_(40)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_full_precision_against_itself_gives_identity_values(family):
    lm = wrap(tiny_model(family), tiny_tokenizer())
    rows = run_components(lm, FACTS, [QuantSpec(16)], positions=["last_subject", "last", "all"], progress=False)
    assert (rows.attn_jsd == 0).all()
    assert (rows.attn_entropy == rows.attn_entropy_fp).all()
    layer = rows[rows["head"].isna()]
    assert (layer.gate_sfr == 0).all() and (layer.neuron_jaccard == 1).all()
    assert layer.mlp_cosine.to_numpy() == pytest.approx(1)
    assert set(layer.n_tokens[layer.position == "last"]) == {3}  # three prompts, one token each


def test_metrics_match_a_hand_computation_at_the_last_token():
    model, tok = sharpened(), tiny_tokenizer()
    lm = wrap(model, tok)
    spec = QuantSpec(2, group_size=32)
    rows = run_components(lm, FACTS, [spec], positions=["last"], batch_size=1, progress=False)
    qw = quantize_model(lm, uniform_plan(lm, spec), progress=False)

    def run():
        gates = {}
        hooks = [model.model.layers[i].mlp.gate_proj.register_forward_hook(
            lambda m, a, o, i=i: gates.__setitem__(i, o[0, -1])) for i in range(2)]
        out = []
        for f in FACTS:
            for prompt in f.prompts():
                ids = tok(prompt, return_tensors="pt").input_ids
                attn = model(ids, output_attentions=True).attentions
                out.append(([a[0, :, -1] for a in attn], dict(gates), ids.shape[1]))
        for h in hooks:
            h.remove()
        return out

    fp = run()
    with qw.applied(lm):
        q = run()
    for layer in range(2):
        jsd, ent, sfr = torch.zeros(4), torch.zeros(4), 0.0
        for (a_fp, g_fp, n), (a_q, g_q, _) in zip(fp, q):
            p, r = a_fp[layer], a_q[layer]
            m = (p + r) / 2
            jsd += 0.5 * (p * (p / m).log()).nansum(-1) + 0.5 * (r * (r / m).log()).nansum(-1)
            ent += -(r * r.log()).nansum(-1) / math.log(n)
            sfr += ((g_fp[layer] >= 0) != (g_q[layer] >= 0)).float().mean().item()
        got = rows[(rows.layer == layer) & rows["head"].notna()].sort_values("head")
        assert got.attn_jsd.to_numpy() == pytest.approx((jsd / 3).numpy(), abs=1e-5)
        assert got.attn_entropy.to_numpy() == pytest.approx((ent / 3).numpy(), abs=1e-5)
        assert rows[(rows.layer == layer) & rows["head"].isna()].gate_sfr.item() == pytest.approx(sfr / 3)
    assert rows.attn_jsd.max() > 0.01  # the hand check above compared something non-trivial


def test_padding_does_not_change_the_result():
    lm = wrap(sharpened("qwen2"), tiny_tokenizer())
    spec = [QuantSpec(3, group_size=32)]
    one = run_components(lm, FACTS, spec, positions=["last_subject", "all"], batch_size=1, progress=False)
    many = run_components(lm, FACTS, spec, positions=["last_subject", "all"], batch_size=3, progress=False)
    cols = ["attn_entropy", "attn_jsd", "gate_sfr", "neuron_jaccard", "mlp_cosine"]
    assert many[cols].to_numpy() == pytest.approx(one[cols].to_numpy(), abs=1e-5, nan_ok=True)


def test_bad_input():
    lm = wrap(tiny_model(), tiny_tokenizer())
    with pytest.raises(ValueError, match="unknown token positions"):
        run_components(lm, FACTS, [QuantSpec(16)], positions=["middle"])
    with pytest.raises(ValueError, match="top_fraction"):
        run_components(lm, FACTS, [QuantSpec(16)], top_fraction=0)
    with pytest.raises(ValueError, match="no facts"):
        run_components(lm, [], [QuantSpec(16)])


def test_findings_read_the_paper_thresholds_from_the_rows():
    import pandas as pd

    from qdiag.analyses.components import findings

    rows = pd.DataFrame([
        {"method": "rtn", "bits": b, "position": "last", "layer": layer, "head": None, "n_tokens": 5,
         "attn_entropy_fp": 0.5, "attn_entropy": e, "attn_jsd": 0.1, "gate_sfr": sfr, "neuron_jaccard": jac,
         "mlp_cosine": cos}
        for b, e, sfr, jac, cos in [(2, 0.9, 0.35, 0.12, 0.05), (4, 0.55, 0.1, 0.6, 0.9)] for layer in range(6)])
    rows["head"] = rows["head"].astype("Int64")
    f = findings(rows, "last", "rtn")
    assert f["w2_entropy_mid"] == pytest.approx(0.9) and f["w2_entropy_rise"] == pytest.approx(0.4)
    assert f["w2_entropy_above"] and not f["w4_entropy_above"]
    assert f["w2_sfr_severe"] and not f["w4_sfr_severe"]
    assert f["w2_jaccard_as_paper"] and f["w2_cosine_as_paper"] and not f["w4_cosine_as_paper"]
    with pytest.raises(ValueError, match="no gptq rows"):
        findings(rows, "last", "gptq")
