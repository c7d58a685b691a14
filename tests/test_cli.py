import json

import pandas as pd
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from qdiag.cli import main
from qdiag.testing import knowing, tiny_model, tiny_tokenizer, write_gguf


@pytest.fixture
def local_model(tmp_path):
    path = tmp_path / "model"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def cliff_args(model, out, data_dir, *extra):
    return ["cliff", "--model", model, "--facts", "12", "--ppl-tokens", "300", "--ppl-window", "64",
            "--calib-samples", "4", "--calib-len", "32", "--data", str(data_dir), "--quiet", "--out", str(out),
            *extra]


def test_cliff_end_to_end(local_model, tmp_path, data_dir):
    out = tmp_path / "out"
    assert main(cliff_args(local_model, out, data_dir, "--bits", "16,4,2", "--method", "rtn,gptq",
                           "--group-size", "32")) == 0
    doc = json.loads((out / "cliff.json").read_text())
    rows = pd.DataFrame(doc["rows"])
    assert list(zip(rows.method, rows.bits)) == [("fp", 16), ("rtn", 4), ("rtn", 2), ("gptq", 4), ("gptq", 2)]
    for col in ("method", "bits", "group_size", "avg_bits", "ppl", "acc_any", "acc_any_lo", "acc_any_hi",
                "acc_majority", "acc_all", "median_rank", "n_facts", "quant_seconds"):
        assert col in rows
    assert (rows.n_facts == 12).all()
    assert rows.ppl.nunique() == 5  # every configuration ran with its own weights (a random model: no order)
    assert rows.avg_bits.tolist() == [16, 4.5, 2.5, 4.5, 2.5]  # + one 16-bit scale per 32 weights
    assert pd.read_csv(out / "cliff.csv").shape[0] == 5
    assert (out / "cliff.png").stat().st_size > 1000
    assert doc["meta"]["args"]["bits"] == [16, 4, 2]


@pytest.mark.parametrize("extra,message", [
    (["--bits", "16,9"], "bits must be in 2..8"),
    (["--group-size", "0"], "group size must be at least 1"),
    (["--method", "awq9"], "unknown method"),
])
def test_bad_arguments_are_refused(local_model, tmp_path, data_dir, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(cliff_args(local_model, tmp_path / "out", data_dir, *extra))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_failure_leaves_nothing_on_disk(local_model, tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    # group size 128 does not fit the tiny model's 64 inputs: refused before any work
    assert main(cliff_args(local_model, out, data_dir, "--bits", "4", "--group-size", "128")) == 2
    assert "larger than in_features=64" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_unknown_model(tmp_path, data_dir, capsys):
    assert main(cliff_args("not-a-model", tmp_path / "out", data_dir)) == 2
    assert "unknown model" in capsys.readouterr().err


def analysis_args(command, model, out, data_dir, *extra):
    return [command, "--model", model, "--facts", "6", "--bits", "16,2", "--method", "rtn", "--group-size", "32",
            "--data", str(data_dir), "--quiet", "--out", str(out), *extra]


def test_components_end_to_end_with_the_identity_at_16_bits(local_model, tmp_path, data_dir):
    out = tmp_path / "out"
    assert main(analysis_args("components", local_model, out, data_dir, "--positions", "last_subject,last")) == 0
    doc = json.loads((out / "components.json").read_text())
    rows = pd.DataFrame(doc["rows"])
    for col in ("method", "bits", "layer", "head", "position", "attn_entropy", "attn_entropy_fp", "attn_jsd",
                "gate_sfr", "neuron_jaccard", "mlp_cosine", "n_tokens"):
        assert col in rows
    fp, q = rows[rows.bits == 16], rows[rows.bits == 2]
    assert (fp.attn_jsd == 0).all() and (fp.attn_entropy == fp.attn_entropy_fp).all()
    layer_fp = fp[fp["head"].isna()]
    assert (layer_fp.gate_sfr == 0).all() and (layer_fp.neuron_jaccard == 1).all()
    assert layer_fp.mlp_cosine.to_numpy() == pytest.approx(1)
    assert q[q["head"].isna()].gate_sfr.min() > 0  # 2 bits does flip gates
    assert set(rows.position) == {"last_subject", "last"}
    assert len(q[q["head"].notna()]) == 2 * 2 * 4  # positions x layers x heads
    for pos in ("last_subject", "last"):
        assert (out / f"components_attention_{pos}.png").stat().st_size > 1000
        assert (out / f"components_mlp_{pos}.png").stat().st_size > 1000


def test_representations_end_to_end_with_the_identity_at_16_bits(local_model, tmp_path, data_dir):
    out = tmp_path / "out"
    assert main(analysis_args("representations", local_model, out, data_dir, "--k", "8")) == 0
    doc = json.loads((out / "representations.json").read_text())
    rows = pd.DataFrame(doc["rows"])
    fp = rows[rows.bits == 16]
    assert fp.subspace_sim.to_numpy() == pytest.approx(1) and (fp.error_alignment == 0).all()
    cka = {(c["method"], c["bits"]): c["matrix"] for c in doc["cka"]}
    assert [cka[("fp", 16)][i][i] for i in range(2)] == pytest.approx([1, 1])
    assert len(cka[("rtn", 2)]) == 2 and len(cka[("rtn", 2)][0]) == 2
    assert rows[rows.bits == 2].subspace_sim.max() < 1
    assert (out / "representations_cka.png").exists() and (out / "representations_subspace.png").exists()


def test_components_refuses_an_unknown_position(local_model, tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    assert main(analysis_args("components", local_model, out, data_dir, "--positions", "middle")) == 2
    assert "unknown token positions" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture
def knowing_model(tmp_path):
    return knowing(tmp_path)


def test_trace_end_to_end(local_model, tmp_path, data_dir):
    out = tmp_path / "out"
    assert main(analysis_args("trace", local_model, out, data_dir)) == 0
    rows = pd.DataFrame(json.loads((out / "lens.json").read_text())["rows"])
    for col in ("bits", "method", "model", "layer", "subset", "prob", "prob_lo", "prob_hi", "rank", "rank_lo",
                "rank_hi", "n"):
        assert col in rows
    assert set(rows.layer) == {0, 1} and set(rows.bits) == {16, 2}
    assert (out / "lens.png").exists() and (out / "lens_prompts.csv").exists()


def test_patch_end_to_end(knowing_model, tmp_path):
    model, data = knowing_model
    out = tmp_path / "out"
    args = ["patch", "--model", model, "--bits", "16,2", "--method", "rtn", "--group-size", "32", "--data", str(data),
            "--facts", "20", "--quiet", "--out", str(out)]
    assert main(args) == 0
    doc = json.loads((out / "causal.json").read_text())
    rows = pd.DataFrame(doc["rows"])
    for col in ("bits", "method", "layer", "site", "position", "subset", "recovery", "recovery_lo", "recovery_hi",
                "p_fp", "p_quant", "p_patched", "n"):
        assert col in rows
    assert set(rows.bits) == {2}  # 16 bits is the reference: nothing to patch
    top = rows[(rows.layer == 1) & (rows.site == "resid") & (rows.position == "last")]
    assert top.recovery.to_numpy() == pytest.approx(1, abs=1e-4)
    for key in ("ablation", "ablation_similarity", "injection", "injection_cosine"):
        assert doc[key], key
    assert (out / "patching_rtn2.png").exists() and (out / "injection.png").exists()


def test_patch_refuses_the_reference_alone(local_model, tmp_path, data_dir, capsys):
    assert main(analysis_args("patch", local_model, tmp_path / "out", data_dir, "--bits", "16")) == 2
    assert "needs a quantized width" in capsys.readouterr().err


def test_sensitivity_end_to_end(knowing_model, tmp_path):
    model, data = knowing_model
    out = tmp_path / "out"
    args = ["sensitivity", "--model", model, "--bits", "3", "--method", "rtn", "--group-size", "32", "--data",
            str(data), "--facts", "20", "--ppl-tokens", "200", "--ppl-window", "50", "--quiet", "--out", str(out)]
    assert main(args) == 0
    doc = json.loads((out / "sensitivity.json").read_text())
    rows = pd.DataFrame(doc["rows"])
    for col in ("scope", "target", "bits", "robust_acc", "robust_acc_lo", "failure_acc", "failure_acc_hi", "ppl",
                "avg_bits"):
        assert col in rows
    assert set(rows.scope) == {"none", "all", "layer", "weight_type", "prefix"}
    assert rows.ppl.notna().all() and "first_domino" in doc
    assert (out / "sensitivity.png").exists()


def test_repair_end_to_end(tmp_path):
    path, data = knowing(tmp_path, layers=4)  # amplification needs layers between the middle and the last
    out = tmp_path / "out"
    args = ["repair", "--model", str(path), "--bits", "3", "--method", "rtn", "--group-size", "32", "--data",
            str(data), "--facts", "20", "--ppl-tokens", "200", "--ppl-window", "50", "--protect-k", "1",
            "--eora-ranks", "4", "--calib-samples", "2", "--calib-len", "16", "--quiet", "--out", str(out)]
    assert main(args) == 0
    doc = json.loads((out / "repair.json").read_text())
    rows = pd.DataFrame(doc["rows"])
    assert list(rows.repair) == ["none", "protect_first", "eora", "amplify"]
    for col in ("params", "avg_bits", "failure_acc", "robust_acc", "ppl", "baseline_avg_bits",
                "baseline_failure_acc", "baseline_robust_acc", "baseline_ppl"):
        assert col in rows
    assert not set(doc["held_out_facts"]) & set(doc["scored_facts"])
    assert (out / "repair.png").exists()


def test_repair_refuses_the_reference_alone(local_model, tmp_path, data_dir, capsys):
    assert main(analysis_args("repair", local_model, tmp_path / "out", data_dir, "--bits", "16")) == 2
    assert "needs a quantized width" in capsys.readouterr().err


def test_diagnose_end_to_end_with_a_remedy_tried(tmp_path):
    path, data = knowing(tmp_path, layers=4)
    out = tmp_path / "out"
    args = ["diagnose", "--model", str(path), "--bits", "8,2", "--method", "rtn", "--group-size", "32", "--data",
            str(data), "--facts", "20", "--ppl-tokens", "200", "--ppl-window", "50", "--calib-samples", "2",
            "--calib-len", "16", "--try-remedy", "--quiet", "--out", str(out)]
    assert main(args) == 0
    doc = json.loads((out / "diagnosis.json").read_text())
    configs = doc["configurations"]
    assert [(c["method"], c["bits"]) for c in configs if not c["remedy_of"]] == [("rtn", 8), ("rtn", 2)]
    for c in configs:
        assert c["verdict"] in ("intact", "signal_degradation", "transitional", "computation_collapse")
        assert c["score_lo"] <= c["score"] <= c["score_hi"]
        assert {"probe", "value", "reference", "null", "position", "points_to"} <= set(c["evidence"][0])
    remedies = [c for c in configs if c["remedy_of"]]
    tried = [a["repair"] for c in configs if not c["remedy_of"] for a in c["remedy"]["actions"]
             if a["repair"] in ("protect_layers", "eora") and (a["repair"] != "protect_layers" or a["layers"])]
    assert len(remedies) == len(tried)  # every suggested weight repair was applied and diagnosed again
    assert doc["meta"]["args"]["bits"] == [8, 2] and doc["meta"]["n_prompts"] > 0
    assert (out / "diagnosis.md").read_text().startswith("# Diagnosis")


@pytest.mark.parametrize(("extra", "message"), [(["--bits", "16"], "needs a quantized width"),
                                                (["--group-size", "4096"], "larger than in_features")])
def test_diagnose_refuses_bad_input_before_any_work(local_model, tmp_path, data_dir, capsys, extra, message):
    out = tmp_path / "out"
    assert main(analysis_args("diagnose", local_model, out, data_dir, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cliff_and_diagnose_take_an_existing_checkpoint(tmp_path):
    path, data = knowing(tmp_path, layers=4)
    hf = AutoModelForCausalLM.from_pretrained(path)
    ckpt = write_gguf(hf, AutoTokenizer.from_pretrained(path), tmp_path / "m.Q4_0.gguf", "Q4_0")
    common = ["--model", str(path), "--quantized", str(ckpt), "--data", str(data), "--facts", "20", "--known", "0",
              "--ppl-tokens", "200", "--ppl-window", "50", "--quiet"]
    assert main(["cliff", *common, "--method", "q8_0", "--out", str(tmp_path / "cliff")]) == 0
    rows = pd.DataFrame(json.loads((tmp_path / "cliff" / "cliff.json").read_text())["rows"])
    # without --bits: the reference, the asked-for llama.cpp type, and the checkpoint
    assert list(zip(rows.method, rows.bits, rows.avg_bits)) == [("fp", 16, 16.0), ("q8_0", 8, 8.5),
                                                                ("gguf-Q4_0", 4, 4.5)]
    assert main(["diagnose", *common, "--evidence", "triage", "--out", str(tmp_path / "diag")]) == 0
    doc = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())
    assert [(c["method"], c["avg_bits"]) for c in doc["configurations"]] == [("gguf-Q4_0", 4.5)]
    assert "m.Q4_0.gguf: decoder matrices in Q4_0 100%" in (tmp_path / "diag" / "diagnosis.md").read_text()
    assert main(["repair", *common, "--protect-k", "1", "--eora-ranks", "2", "--calib-samples", "4",
                 "--calib-len", "16", "--out", str(tmp_path / "repair")]) == 0
    rows = pd.DataFrame(json.loads((tmp_path / "repair" / "repair.json").read_text())["rows"])
    assert rows.method.unique().tolist() == ["gguf-Q4_0"]
    assert rows.repair.tolist() == ["none", "protect_first", "eora", "amplify"]
    assert rows.set_index("repair").avg_bits["none"] == 4.5
    assert (rows.set_index("repair").avg_bits[["protect_first", "eora"]] > 4.5).all()
    assert rows.beats_uniform.isna().all()  # no uniform quantization of the checkpoint's kind to set it beside


@pytest.mark.parametrize(("command", "message"), [("repair", "m.gguf is not a GGUF file"),
                                                  ("cliff", "no checkpoint at")])
def test_checkpoints_refused_before_any_work(local_model, tmp_path, data_dir, capsys, command, message):
    ckpt = tmp_path / "m.gguf"
    if command != "cliff":
        ckpt.write_bytes(b"")
    out = tmp_path / "out"
    assert main(analysis_args(command, local_model, out, data_dir, "--quantized", str(ckpt))) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_two_checkpoints_of_the_same_kind_keep_apart(tmp_path):
    path, data = knowing(tmp_path, layers=2)
    hf = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    a = write_gguf(hf, tok, tmp_path / "a.gguf", "Q4_0")
    b = write_gguf(hf, tok, tmp_path / "b.gguf", "Q4_0", norm_scale=1.5)
    args = ["cliff", "--model", str(path), "--quantized", f"{a},{b}", "--data", str(data), "--facts", "20",
            "--known", "0", "--ppl-tokens", "200", "--ppl-window", "50", "--quiet", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    rows = pd.DataFrame(json.loads((tmp_path / "out" / "cliff.json").read_text())["rows"])
    assert rows.method.tolist() == ["fp", "gguf-Q4_0[a.gguf]", "gguf-Q4_0[b.gguf]"]
    assert rows.ppl.iloc[1] != rows.ppl.iloc[2]  # two files, two results
