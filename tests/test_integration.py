"""The real default model (SmolLM2-135M, de-quantized from Q4_1): loads, resolves, quantizes and
restores exactly. One model per module: every test leaves its weights as it found them, which the
last test checks."""

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from qdiag.cli import main
from qdiag.core import data
from qdiag.core.arch import resolve, unwrap
from qdiag.core.models import load_model
from qdiag.measure import evaluate as ev
from qdiag.quant import checkpoint
from qdiag.quant.plan import avg_bits, uniform_plan
from qdiag.quant.quantize import QuantSpec, rtn
from qdiag.quant.quantizer import quantize_model
from qdiag.testing import requantize_gguf

pytestmark = pytest.mark.integration


def default_gguf():
    from qdiag.core.models import locate

    folder, name = locate("smollm2-135m")
    return Path(folder) / name


def digest(model) -> str:
    h = hashlib.sha256()
    for name, p in unwrap(model).state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def smollm():
    lm = load_model("smollm2-135m")
    yield lm, digest(lm)


@pytest.fixture(scope="module")
def ppl_tokens(smollm, data_dir):
    return data.text_tokens(smollm[0].tokenizer, data.load_text("test", data_dir), 2048)


def test_default_model_is_a_llama_with_576_inputs(smollm):
    arch = resolve(smollm[0])
    assert arch.family == "llama" and arch.n_layers == 30
    assert unwrap(smollm[0]).get_submodule(arch.weights[0]["q"]).in_features == 576


def test_ragged_group_is_counted(smollm):
    lm, _ = smollm
    plan = uniform_plan(lm, QuantSpec(bits=4, group_size=128))
    # 576 = 4 x 128 + 64 (5 groups), 1536 = 12 x 128 (12 groups)
    assert 4.13 < avg_bits(lm, plan) < 4.14


def test_rtn_orders_perplexity_by_bits(smollm, ppl_tokens):
    lm, _ = smollm
    fp = ev.perplexity(lm, ppl_tokens, 512)
    ppl = {}
    for bits in (8, 4, 2):
        qw = quantize_model(lm, uniform_plan(lm, QuantSpec(bits=bits, group_size=128)))
        with qw.applied(lm):
            ppl[bits] = ev.perplexity(lm, ppl_tokens, 512)
    assert fp < ppl[4] < ppl[2] and ppl[8] < ppl[4]
    assert abs(ppl[8] / fp - 1) < 0.05


def test_gptq_beats_rtn_at_3_bits(smollm, ppl_tokens, data_dir):
    lm, _ = smollm
    calib = data.calibration_tokens(lm.tokenizer, 16, 256, seed=0, root=data_dir)
    ppl = {}
    for method in ("rtn", "gptq"):
        qw = quantize_model(lm, uniform_plan(lm, QuantSpec(bits=3, group_size=128, method=method)), calib,
                            progress=False)
        with qw.applied(lm):
            ppl[method] = ev.perplexity(lm, ppl_tokens, 512)
    assert ppl["gptq"] < ppl["rtn"]


def test_nnsight_trace_sees_the_quantized_weights(smollm):
    lm, _ = smollm
    prompt = "The capital of France is"
    with lm.trace(prompt):
        fp = lm.lm_head.output.save()
    qw = quantize_model(lm, uniform_plan(lm, QuantSpec(bits=2, group_size=128)))
    with qw.applied(lm):
        with lm.trace(prompt):
            q = lm.lm_head.output.save()
        direct = unwrap(lm)(**lm.tokenizer(prompt, return_tensors="pt")).logits
    torch.testing.assert_close(q, direct)
    assert not torch.allclose(fp, q)


def test_patching_invariants_on_the_default_model(smollm):
    from qdiag.analyses.lens import logit_lens
    from qdiag.core import positions as P
    from qdiag.measure.patch import Edit, Rerun, patch_nnsight
    from qdiag.measure.trace import collect

    lm, _ = smollm
    hf = unwrap(lm)
    batch = P.encode(lm.tokenizer, ["The capital of France is", "Paris is the capital of"])
    last = P.token_index(batch, "last")
    fp_logits = hf(**batch).logits[:, -1].float()
    fp = collect(lm, batch, ("resid", "mlp_out"))
    # the logit lens at the last layer is the model's own output distribution
    answer = fp_logits.argmax(-1)
    prob, rank = logit_lens(lm, batch, answer)
    torch.testing.assert_close(prob[:, -1], torch.softmax(fp_logits, -1)[torch.arange(2), answer])
    assert rank[:, -1].tolist() == [1, 1]
    qw = quantize_model(lm, uniform_plan(lm, QuantSpec(bits=2, group_size=128)), progress=False)
    with qw.applied(lm):
        run = Rerun(lm, batch)
        q = collect(lm, batch, ("resid", "mlp_out"))
        # patching the quantized model's own activations into itself changes nothing
        own = [[Edit(layer, "mlp", last, q["mlp_out"][layer][:, -1])] for layer in (0, 14, 29)]
        logits, _ = run.run(own)
        for out in logits:
            torch.testing.assert_close(out, run.logits, atol=1e-3, rtol=1e-3)  # float32 rounding over 30 layers
        # the reference's residual after the last layer, at the last token, is the reference's output
        logits, _ = run.run([[Edit(29, "resid", last, fp["resid"][29][:, -1])]])
        torch.testing.assert_close(logits[0], fp_logits, atol=1e-4, rtol=1e-4)
        # the sweep and nnsight agree on a mid-network patch
        edit = [Edit(10, "mlp", last, fp["mlp_out"][10][:, -1])]
        torch.testing.assert_close(run.run([edit])[0][0], patch_nnsight(lm, batch, edit), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def known(smollm, data_dir):
    """The prompts of 200 random facts the reference answers right, and those facts."""
    from qdiag.diagnosis import perturb as pt

    lm, _ = smollm
    facts = data.sample_facts(data.load_pararel(data_dir), 200, seed=0)
    right = pt.reference_right_prompts(lm, facts)
    return lm, right, [f for f in facts if f.id in set(right.fact)]


@pytest.mark.parametrize("breaker", ["scrambled_gates", "uniform_attention"])
def test_the_diagnosis_tells_a_matched_pair_apart_on_the_default_model(known, breaker):
    """Components of the first two layers broken, against residual noise losing as many of the
    reference's answers: Computation Collapse and Signal Degradation, with the first domino where
    the break was made; the model against itself is intact."""
    from qdiag.diagnosis import diagnose
    from qdiag.diagnosis import perturb as pt
    from qdiag.measure.widths import reference_width

    lm, right, facts = known
    broken = getattr(pt, breaker)(lm, [0, 1])
    lost = pt.answers_lost(lm, right, broken)
    assert lost >= 0.1
    noisy, noisy_lost = pt.match_damage(lm, right, lambda s: pt.residual_noise(lm, s), lost, steps=8)
    assert abs(noisy_lost - lost) <= 0.1
    ref, b, n = diagnose(lm, facts, [reference_width(), broken, noisy], causal=False, progress=False).configurations
    assert ref["verdict"] == "intact"
    assert b["verdict"] == "computation_collapse" and n["verdict"] == "signal_degradation"
    assert b["first_domino"]["layer"] == 0
    assert b["first_domino"]["component"] == ("mlp" if breaker == "scrambled_gates" else "attention")


def test_the_float_copy_of_the_gguf_file_is_the_same_model(smollm, tmp_path, monkeypatch):
    from qdiag.core import models

    monkeypatch.setenv("QDIAG_MODEL_CACHE", str(tmp_path))
    read, real = [], models._from_pretrained
    monkeypatch.setattr(models, "_from_pretrained", lambda where, gguf, *a, **k: read.append(gguf) or
                        real(where, gguf, *a, **k))
    first, second = load_model("smollm2-135m"), load_model("smollm2-135m")
    assert read == ["SmolLM2-135M-Instruct.Q4_1.gguf", None]  # the file, then its copy
    assert digest(first) == digest(second) == smollm[1]
    texts = ["The capital of France is", "  Der Hund läuft\tschnell\n", "<|im_start|>user\nhi<|im_end|>"]
    assert second.tokenizer(texts).input_ids == smollm[0].tokenizer(texts).input_ids
    assert second.tokenizer.chat_template == smollm[0].tokenizer.chat_template
    x = smollm[0].tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(unwrap(second)(**x).logits, unwrap(smollm[0])(**x).logits)
    (models.float_copy(default_gguf(), torch.float32) / "model.safetensors").write_bytes(b"torn")
    with pytest.warns(UserWarning, match="does not load"):
        third = load_model("smollm2-135m")  # a damaged copy: the file is read again
    assert digest(third) == smollm[1] and read[-1] is not None


def test_the_model_s_own_gguf_file_reads_back_as_the_reference(smollm):
    # transformers de-quantized this very file into the reference: reading it as a checkpoint
    # (packed, rows un-permuted by qdiag, the tied unembedding shared) must give the same weights
    lm, _ = smollm
    ckpt = checkpoint.read(lm, default_gguf())
    hf = unwrap(lm)
    assert ckpt.types == {"Q4_1": sum(hf.get_submodule(n).weight.numel() for n in resolve(lm).linear_names())}
    assert ckpt.changed == [] and ckpt.weights.extras == {} and ckpt.avg_bits == 5.0
    for name, q in ckpt.weights.tensors.items():
        assert torch.equal(q.dequantize(), hf.get_submodule(name).weight), name


def test_q4_1_gives_the_default_model_back_unchanged(smollm):
    # the reference is de-quantized Q4_1: each block's min and max are on its grid, so re-quantizing
    # with the same type returns every weight (what chapter 1 tells its readers)
    lm, _ = smollm
    hf = unwrap(lm)
    for name in resolve(lm).linear_names()[:7]:
        w = hf.get_submodule(name).weight
        assert torch.equal(rtn(w, QuantSpec.gguf("q4_1")).dequantize(), w)
        assert not torch.equal(rtn(w, QuantSpec.gguf("q4_0")).dequantize(), w)


def test_cliff_and_diagnose_on_gguf_files_written_from_the_default_model(tmp_path, data_dir):
    # a Q4_0 file of the default model, next to qdiag's own Q8_0 quantizer
    q4 = requantize_gguf(default_gguf(), tmp_path / "smol.Q4_0.gguf", "Q4_0")
    common = ["--data", str(data_dir), "--quiet", "--ppl-tokens", "1024"]
    assert main(["cliff", "--quantized", str(q4), "--method", "q8_0", "--facts", "8", "--known", "0",
                 "--generations", "0", *common, "--out", str(tmp_path / "cliff")]) == 0
    rows = pd.read_csv(tmp_path / "cliff" / "cliff.csv")
    assert list(zip(rows.method, rows.avg_bits)) == [("fp", 16.0), ("q8_0", 8.5), ("gguf-Q4_0", 4.5)]
    fp, ppl8, ppl4 = rows.ppl
    assert abs(ppl8 / fp - 1) < 0.01 < ppl4 / fp - 1
    assert main(["diagnose", "--quantized", str(q4), "--evidence", "triage", "--screen-facts", "120", "--known", "8",
                 *common, "--out", str(tmp_path / "diagnosis")]) == 0
    doc = json.loads((tmp_path / "diagnosis" / "diagnosis.json").read_text())
    assert [c["method"] for c in doc["configurations"]] == ["gguf-Q4_0"]


def test_weights_are_untouched_after_all_of_the_above(smollm):
    lm, before = smollm
    assert digest(lm) == before
