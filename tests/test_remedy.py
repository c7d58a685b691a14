"""Repairs applied to an existing checkpoint: protected layers are the base re-exported at a higher
width in the checkpoint's family, EoRA brings the matrices back towards the base, the bits are the
checkpoint's storage plus what the repair adds, and a checkpoint with folded scales is refused."""

import pytest
import torch

from qdiag.core.arch import resolve, unwrap, weight_matrix
from qdiag.core.models import wrap
from qdiag.diagnosis.diagnose import _remedies
from qdiag.measure.widths import checkpoint_width
from qdiag.quant import checkpoint, remedy
from qdiag.quant.quantize import QuantSpec, rtn
from qdiag.testing import calib_ids, tiny_model, tiny_tokenizer, write_gguf


@pytest.fixture
def base_and_file(tmp_path):
    hf, tok = tiny_model("llama"), tiny_tokenizer()
    return wrap(hf, tok), write_gguf(hf, tok, tmp_path / "m.gguf", "Q4_0")


def test_protected_layers_are_the_base_at_q8_0_and_cost_what_the_arithmetic_says(base_and_file):
    lm, path = base_and_file
    ckpt = checkpoint.read(lm, path)
    arch, hf = resolve(lm), unwrap(lm)
    first, rest = arch.linear_names([0]), arch.linear_names([1])
    qw, bits = remedy.protect(lm, ckpt, first, 8)
    for n in first:
        w = weight_matrix(hf.get_submodule(n)).detach()
        assert torch.equal(qw.tensors[n].dequantize(), rtn(w, QuantSpec.gguf("q8_0")).dequantize()), n
    assert all(qw.tensors[n] is ckpt.weights.tensors[n] for n in rest)
    n_first = sum(weight_matrix(hf.get_submodule(n)).numel() for n in first)
    n_rest = sum(weight_matrix(hf.get_submodule(n)).numel() for n in rest)
    assert bits == pytest.approx((8.5 * n_first + 4.5 * n_rest) / (n_first + n_rest))  # Q8_0 and Q4_0 by definition


def test_eora_on_a_checkpoint_at_full_rank_gives_back_the_base(base_and_file):
    lm, path = base_and_file
    hf = unwrap(lm)
    ckpt = checkpoint.read(lm, path)
    calib = calib_ids(n=8, length=32)
    corrected = remedy.correct(lm, ckpt, calib, [4, 256])
    (qw, bits), (full, _) = corrected[4], corrected[256]
    total = extra = 0
    for n, q in ckpt.weights.tensors.items():
        w = weight_matrix(hf.get_submodule(n)).detach().float()
        before, after = (w - q.dequantize()).norm(), (w - qw.tensors[n].dequantize()).norm()
        assert after < before, n
        torch.testing.assert_close(full.tensors[n].dequantize(), w, rtol=0, atol=1e-4)
        out, cols = w.shape
        total += out * cols
        extra += 16 * 4 * (out + cols)
    assert bits == pytest.approx(4.5 + extra / total)


def test_a_checkpoint_with_folded_scales_is_not_repaired(tmp_path):
    hf, tok = tiny_model("llama"), tiny_tokenizer()
    lm = wrap(hf, tok)
    ckpt = checkpoint.read(lm, write_gguf(hf, tok, tmp_path / "awq-like.gguf", "Q4_0", norm_scale=2.0))
    assert ckpt.changed
    with pytest.raises(ValueError, match="outside its quantized matrices"):
        remedy.protect(lm, ckpt, resolve(lm).linear_names([0]))
    entry = {"remedy": {"actions": [{"repair": "eora", "rank": 4}], "text": "Try EoRA."}}
    w = checkpoint_width(lm, str(tmp_path / "awq-like.gguf"))
    assert _remedies(lm, w, entry, calib_ids()) == [] and "Not applied" in entry["remedy"]["text"]


def test_the_diagnosis_applies_its_suggested_repairs_to_a_checkpoint(base_and_file):
    lm, path = base_and_file
    w = checkpoint_width(lm, str(path))
    entry = {"remedy": {"actions": [{"repair": "protect_layers", "layers": [1], "bits": 8},
                                    {"repair": "eora", "rank": 2}], "text": ""}}
    repaired = _remedies(lm, w, entry, calib_ids())
    assert [r.method for r in repaired] == ["gguf-Q4_0+protect", "gguf-Q4_0+eora"]
    assert all(r.avg_bits > w.avg_bits for r in repaired)
    ids = torch.tensor([[3, 7, 11, 2]])
    with w.applied(lm):
        plain = lm(input_ids=ids).logits
    for r in repaired:
        with r.applied(lm):
            assert not torch.equal(lm(input_ids=ids).logits, plain)  # each repair changes the model


def test_a_diagnosis_with_try_remedy_diagnoses_the_repaired_checkpoint(tmp_path, monkeypatch):
    """End to end: a suggested protection and EoRA applied to a GGUF file, each diagnosed as a remedy
    of it (the rule is made to suggest both: a tiny model's Q4_0 file is intact)."""
    from qdiag.diagnosis import diagnose, rule
    from qdiag.testing import knowing_model

    hf, tok, facts = knowing_model(layers=4, many=True)
    lm = wrap(hf, tok)
    w = checkpoint_width(lm, str(write_gguf(hf, tok, tmp_path / "m.gguf", "Q4_0")))
    actions = [{"repair": "protect_layers", "layers": [0], "bits": 8}, {"repair": "eora", "rank": 2}]
    monkeypatch.setattr(rule, "remedy", lambda *a, **k: {"actions": actions, "text": "forced"})
    diag = diagnose(lm, facts, [w], calib_ids(n=4, length=16), try_remedy=True, causal=False, progress=False)
    rows = [(c["method"], c["remedy_of"] and c["remedy_of"]["method"]) for c in diag.configurations]
    assert rows == [("gguf-Q4_0", None), ("gguf-Q4_0+protect", "gguf-Q4_0"), ("gguf-Q4_0+eora", "gguf-Q4_0")]
    bits = [c["avg_bits"] for c in diag.configurations]
    assert bits[0] == 4.5 and bits[1] > 4.5 and bits[2] > 4.5


def _perturbed_embedding(tmp_path, qtype="Q8_0"):
    import copy

    from qdiag.testing import knowing_model

    hf, tok, facts = knowing_model(layers=4, many=True)
    other = copy.deepcopy(hf)
    with torch.no_grad():
        e = other.model.embed_tokens.weight
        e.add_(torch.randn(e.shape, generator=torch.Generator().manual_seed(0)) * e.std())
    return wrap(hf, tok), facts, write_gguf(other, tok, tmp_path / "emb.gguf", qtype), hf


def test_restore_takes_the_named_tensor_from_the_base_and_leaves_the_rest(tmp_path):
    lm, _, path, hf = _perturbed_embedding(tmp_path)
    ckpt = checkpoint.read(lm, path)
    assert ckpt.changed == ["model.embed_tokens.weight"]
    fixed = remedy.restore(lm, ckpt, ["token_embd.weight"])
    assert fixed.changed == [] and ckpt.changed == ["model.embed_tokens.weight"]  # the original is untouched
    with fixed.weights.applied(lm):
        assert torch.equal(hf.model.embed_tokens.weight, unwrap(wrap(hf, lm.tokenizer)).model.embed_tokens.weight)
        ids = torch.tensor([[3, 7, 11, 2]])
        restored = lm(input_ids=ids).logits
    plain = checkpoint.read(lm, write_gguf(hf, lm.tokenizer, tmp_path / "plain.gguf", "Q8_0"))
    with plain.weights.applied(lm):
        assert torch.allclose(lm(input_ids=ids).logits, restored)  # the file the base itself gives
    assert all(fixed.weights.tensors[n] is ckpt.weights.tensors[n] for n in resolve(lm).linear_names())
    assert not fixed.format_report.verdict.eq("not quantization damage").any()
    with pytest.raises(ValueError, match="no tensors blk.9"):
        remedy.restore(lm, ckpt, ["blk.9.attn_q.weight"])


def test_a_file_with_only_the_embedding_perturbed_is_prescribed_the_embedding(tmp_path):
    """The issue's case: every decoder component computes as the reference's, answers are lost, and
    the remedy names the embedding, gives no decoder advice, and its restored file gets them back."""
    from qdiag.diagnosis import diagnose

    lm, facts, path, hf = _perturbed_embedding(tmp_path)
    plain = diagnose(lm, facts, [checkpoint_width(lm, str(write_gguf(hf, lm.tokenizer, tmp_path / "p.gguf")))],
                     calib_ids(n=4, length=16), causal=False, progress=False).configurations[0]
    diag = diagnose(lm, facts, [checkpoint_width(lm, str(path))], calib_ids(n=4, length=16), try_remedy=True,
                    causal=False, progress=False)
    first, restored = diag.configurations
    assert first["remedy"]["actions"] == [{"repair": "restore", "tensors": ["token_embd.weight"]}]
    assert "token_embd.weight" in first["remedy"]["text"] and "layers [" not in first["remedy"]["text"]
    assert first["lost"] > plain["lost"] + 0.2
    assert restored["method"] == "gguf-Q8_0+restore" and restored["lost"] == plain["lost"]
