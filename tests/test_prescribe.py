"""The prescription on tiny models: within its budget, less damage predicted and measured than the
file it repairs, the damage named where it is (an embedding, not the decoder), and written for the
engine that made the file."""

import copy
import json

import pytest
import torch
import yaml

from qdiag import fixtures
from qdiag.core.arch import unwrap
from qdiag.core.models import wrap
from qdiag.diagnosis.prescribe import parse_budget, prescribe, prescribed_width
from qdiag.measure import evaluate as ev
from qdiag.measure.widths import checkpoint_width, quantized_width
from qdiag.quant import engines
from qdiag.quant.quantize import QuantSpec
from qdiag.testing import calib_ids, tiny_model, tiny_tokenizer, write_gguf

LEGACY = ("Q4_0", "Q5_0", "Q5_1", "Q8_0")  # the types the gguf package writes: no llama.cpp needed


@pytest.fixture
def base():
    return wrap(tiny_model("llama", scale=4, layers=3), tiny_tokenizer())


def kl(model, width):
    return ev.output_fidelity(model, None, width.applied, windows=calib_ids(12, 32, seed=9))["kl"]


def test_a_gguf_prescription_spends_its_budget_where_the_damage_is(base, tmp_path):
    w = checkpoint_width(base, write_gguf(unwrap(base), base.tokenizer, tmp_path / "m.gguf", "Q4_0"))
    p = prescribe(base, w, calib_ids(8, 32, seed=3), budget="+0.5bpw", types=LEGACY, tools=False, progress=False)
    s = p.summary()
    assert s["bytes_to"] <= p.budget == parse_budget("+0.5bpw", s["bytes_from"], int(p.tensors.n.sum()))
    assert s["predicted_kl_to"] < s["measured_kl_from"]
    assert (p.tensors.to != "Q4_0").any() and set(p.tensors.to) <= set(LEGACY) | {"F16"}
    assert "Give more bits" in p.text and "token_embd" not in p.text.split("Give more bits")[0]
    cmd = p.exports["llama-quantize.sh"].splitlines()[-1]
    assert cmd.startswith("llama-quantize --pure") and cmd.split()[-1] in set(p.tensors.to)
    fixed = prescribed_width(base, p, tools=False)
    assert kl(base, fixed) < kl(base, w)  # re-measured, on other text than the prescription saw
    assert p.bytes_of(p.allocation) == p.bytes


def test_a_bigger_budget_never_predicts_more_damage(base, tmp_path):
    w = checkpoint_width(base, write_gguf(unwrap(base), base.tokenizer, tmp_path / "m.gguf", "Q4_0"))
    p = prescribe(base, w, calib_ids(8, 32, seed=3), budget="+0.5bpw", types=LEGACY, tools=False, progress=False)
    damage = []
    for extra in (0.0, 0.5, 1.0, 2.0):
        budget = parse_budget(f"+{extra}bpw", p.file_bytes, int(p.tensors.n.sum()))
        a = p.reallocate(budget)
        assert p.bytes_of(a) <= budget
        damage.append(sum(next(o.damage for o in p.options[t] if o.kind == k) for t, k in a.items()))
    assert damage == sorted(damage, reverse=True)
    rand = p.reallocate(p.budget, "random", seed=1)
    assert p.bytes_of(rand) <= p.budget


def test_damage_in_the_embedding_is_named_and_the_decoder_left_alone(base, tmp_path):
    other = copy.deepcopy(unwrap(base))
    with torch.no_grad():
        e = other.model.embed_tokens.weight
        e.add_(torch.randn(e.shape, generator=torch.Generator().manual_seed(0)) * e.std() * 0.5)
    w = checkpoint_width(base, write_gguf(other, base.tokenizer, tmp_path / "m.gguf", "Q8_0"))
    assert "model.embed_tokens.weight" in w.checkpoint.changed
    p = prescribe(base, w, calib_ids(8, 32, seed=3), budget="+0.25bpw", types=LEGACY, tools=False, progress=False)
    assert p.meta["outside_share"] > 0.5
    assert "outside the decoder's matrices" in p.text and "token_embd.weight" in p.text
    assert "blk." not in p.text  # no decoder-layer advice
    decoder = p.tensors[p.tensors.role == "matrix"]
    assert (decoder["from"] == decoder.to).all()
    fixed = prescribed_width(base, p, tools=False)
    assert kl(base, fixed) < kl(base, w) / 5


def test_a_qdiag_quantization_is_prescribed_for_gptqmodel_and_llm_compressor(base):
    calib = calib_ids(8, 32, seed=3)
    w = quantized_width(base, QuantSpec(3, 32), calib, progress=False)
    p = prescribe(base, w, calib, budget="+0.5bpw", progress=False)
    assert p.engine == "gptqmodel" and set(p.tensors.to) <= {"w2", "w3", "w4", "w8"}
    cfg = json.loads(p.exports["gptqmodel_config.json"])
    for param, kind in p.allocation.items():
        assert engines.dynamic_bits(cfg, param.removesuffix(".weight")) == int(kind[1:])
    q = prescribe(base, w, calib, budget="+0.5bpw", engine="llm-compressor", progress=False)
    engines.check_recipe(yaml.safe_load(q.exports["recipe.yaml"]), [t.removesuffix(".weight") for t in q.allocation])
    fixed = prescribed_width(base, p, calib=calib)
    assert fixed.avg_bits == pytest.approx(8 * p.bytes / int(p.tensors.n.sum()), rel=0.01)


def test_bad_input_is_refused_saying_what_to_do(base, tmp_path):
    w = checkpoint_width(base, write_gguf(unwrap(base), base.tokenizer, tmp_path / "m.gguf", "Q4_0"))
    calib = calib_ids(4, 16)
    with pytest.raises(ValueError, match="give \\+0.25bpw"):
        prescribe(base, w, calib, budget="lots", types=LEGACY, tools=False, progress=False)
    with pytest.raises(ValueError, match="below the .* bytes of the cheapest"):
        prescribe(base, w, calib, budget="1bpw", types=LEGACY, tools=False, progress=False)
    with pytest.raises(ValueError, match="unknown engine"):
        prescribe(base, w, calib, engine="tgi", progress=False)
    wide = wrap(fixtures.tiny_gguf_model(), tiny_tokenizer())  # rows of 256: k-quants fit
    k = checkpoint_width(wide, write_gguf(unwrap(wide), wide.tokenizer, tmp_path / "k.gguf", "Q4_0"))
    with pytest.raises(ValueError, match="needs llama.cpp's quantizer"):
        prescribe(wide, k, calib, types=("Q4_K",), tools=False, progress=False)
    with pytest.raises(ValueError, match="importance matrix is a llama.cpp input"):
        prescribe(base, w, calib, engine="gptqmodel", imatrix="x.gguf", progress=False)
