"""The diagnosis on ground truth: perturbations whose mode is known by construction, on tiny
models that know facts, in five families and two seeds. Matched pairs lose the same share of
answers and differ only in mechanism: a verdict that measured damage alone could not tell them
apart. Each test also checks which probe carried the decision."""

import json

import numpy as np
import pandas as pd
import pytest

from qdiag.core.models import wrap
from qdiag.diagnosis import diagnose
from qdiag.diagnosis import perturb as pt
from qdiag.diagnosis.rule import INTACT, MIDPOINT
from qdiag.measure.widths import reference_width
from qdiag.quant.quantize import QuantSpec
from qdiag.testing import FAMILIES, knowing_model

WORLDS = [(f, s) for f in ("llama", "qwen2", "gpt2", "phi3", "gpt_neox") for s in (1, 2)]


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"{w[0]}-seed{w[1]}")
def world(request):
    """A 4-layer model whose answers depend on its layers (weights x4), and the facts it knows.
    Perturbations never write its weights, so one model serves the module."""
    family, seed = request.param
    hf, tok, facts = knowing_model(family, seed, layers=4, scale=4.0, many=True, min_facts=20)
    return wrap(hf, tok), facts


def run(lm, facts, configs, **kw):
    return diagnose(lm, facts, configs, causal=False, progress=False, **kw).configurations


def test_the_model_against_itself_is_intact(world):
    lm, facts = world
    (c,) = run(lm, facts, [reference_width()])
    assert c["verdict"] == "intact"
    assert c["score"] == 0 and c["lost"] == 0 and c["first_domino"] is None


# what breaks, in which early layers, and the component that should be named first
BREAKERS = {"scrambled_gates": ([0], "mlp"), "replaced_mlp": ([0], "mlp"), "uniform_attention": ([0], "attention")}


# Residual-stream noise leaves every component's weights exact, at any size. Weight noise is only
# "small noise on every matrix" while its scale is small: matched to the large damage of a broken
# MLP it needs 0.3 to 2 times each matrix's RMS on these models, which breaks components itself,
# so it is paired with the milder uniform attention, and the test checks the scale stays small.
PAIRS = [(b, "residual_noise") for b in sorted(BREAKERS)] + [("uniform_attention", "weight_noise")]
SMALL = 0.25


@pytest.mark.parametrize(("breaker", "partner"), PAIRS, ids=[f"{b}-vs-{p}" for b, p in PAIRS])
def test_pairs_matched_in_damage_get_different_verdicts(world, breaker, partner):
    lm, facts = world
    layers, component = BREAKERS[breaker]
    broken = getattr(pt, breaker)(lm, layers)
    (alone,) = run(lm, facts, [broken])
    assert alone["verdict"] == "computation_collapse", alone["carried_by"]
    assert alone["first_domino"]["layer"] == 0 and alone["first_domino"]["component"] == component
    lost = pt.answers_lost(lm, facts, broken)
    if lost < INTACT:  # tiny gpt_neox: its attention carries little; uniform attention costs ~9% of the answers
        pytest.skip(f"{breaker} in layers {layers} costs only {lost:.0%} of the answers: no damage to match")
    scales = []

    def make(s):
        scales.append(s)
        return getattr(pt, partner)(lm, s)

    noisy, noisy_lost = pt.match_damage(lm, facts, make, lost)
    assert abs(noisy_lost - lost) <= 0.1  # matched in damage
    if partner == "weight_noise":
        assert float(noisy.method.rsplit("_", 1)[1]) < SMALL
    b, n = run(lm, facts, [broken, noisy])
    assert b["verdict"] == "computation_collapse", b["carried_by"]
    assert n["verdict"] == "signal_degradation", n["carried_by"]
    # what carried it: the broken component, where it was broken; nothing breaks under noise
    assert b["first_domino"]["layer"] == 0 and b["first_domino"]["component"] == component
    assert b["score_lo"] >= MIDPOINT > n["score_hi"]
    assert n["first_domino"] is None


def test_a_graded_family_scores_monotonically(world):
    lm, facts = world
    scales = [0.0, 0.05, 0.1, 0.2, 0.4]
    got = run(lm, facts, [pt.weight_noise(lm, s) for s in scales])
    scores = [c["score"] for c in got]
    assert scores[0] == 0
    assert np.all(np.diff(scores) > 0), scores


def test_breaking_a_later_layer_names_that_layer(world):
    lm, facts = world
    (c,) = run(lm, facts, [pt.replaced_mlp(lm, [2])])
    assert c["first_domino"] == {"layer": 2, "component": "mlp", "position": pytest.approx(c["score"], abs=0.05)}


def test_quantization_verdicts_follow_bits_and_are_saved(world, tmp_path):
    lm, facts = world
    d = diagnose(lm, facts, [QuantSpec(8, 32), QuantSpec(4, 32), QuantSpec(2, 32)], causal=True, progress=False)
    scores = [c["score"] for c in d.configurations]
    assert scores[0] < scores[1] < scores[2]
    assert d.configurations[0]["verdict"] == "intact"
    d.save(tmp_path, title="tiny")
    doc = json.loads((tmp_path / "diagnosis.json").read_text())
    keys = {"method", "bits", "group_size", "avg_bits", "verdict", "score", "score_lo", "score_hi", "evidence",
            "first_domino", "remedy"}
    assert all(keys <= set(c) for c in doc["configurations"])
    probes = {r["probe"] for r in doc["configurations"][0]["evidence"]}
    assert {"answer rank", "logit-lens emergence", "patching sufficiency (last subject token)",
            "patching sufficiency (last token)", "dependency-profile correlation", "attention entropy (middle layers)",
            "attention JSD", "gate sign-flip rate", "top-1% neuron Jaccard", "MLP output cosine", "CKA diagonal",
            "subspace similarity", "error alignment", "clean-signal injection"} <= probes
    for stem in ("diagnosis.md", "diagnosis_fingerprint.png", "diagnosis_layers.png", "diagnosis.csv"):
        assert (tmp_path / stem).exists()
    assert "| RTN 2-bit g32 |" in (tmp_path / "diagnosis.md").read_text()


def test_the_evidence_does_not_depend_on_the_batch_size():
    hf, tok, facts = knowing_model("llama", 1, layers=4, scale=4.0, many=True, min_facts=20)
    lm = wrap(hf, tok)
    configs = [QuantSpec(3, 32), pt.scrambled_gates(lm, [1])]
    small, large = (diagnose(lm, facts, configs, causal=True, batch_size=b, progress=False) for b in (3, 64))
    assert small.meta["n_prompts"] == large.meta["n_prompts"] > 3  # several batches against one
    for a, b in zip(small.configurations, large.configurations):
        assert a["verdict"] == b["verdict"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-4) and a["lost"] == b["lost"]
        assert set(a["seconds"]) == {"made", "measured"} and a["seconds"]["measured"] > 0
    ev = small.evidence.merge(large.evidence, on=["method", "bits", "probe"], suffixes=("_s", "_l"))
    assert len(ev) == len(small.evidence)
    assert np.allclose(ev.value_s.astype(float), ev.value_l.astype(float), atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_diagnose_runs_end_to_end_on_every_family(family):
    hf, tok, facts = knowing_model(family, 0, layers=2, min_facts=1, many=True)
    lm = wrap(hf, tok)
    d = diagnose(lm, facts, [QuantSpec(4, 32), pt.scrambled_gates(lm, [1])], progress=False)
    quantized, broken = d.configurations
    assert quantized["verdict"] in ("intact", "signal_degradation", "transitional", "computation_collapse")
    assert broken["verdict"] == "computation_collapse" and broken["first_domino"]["layer"] == 1
    assert len(d.layers) == 2 * 2 * 2  # configurations x layers x components


def test_quantizer_findings_say_whether_the_verdict_follows_the_bits():
    from qdiag.diagnosis import report as R

    verdicts = pd.DataFrame({"method": ["rtn", "awq", "rtn", "awq"], "bits": [4, 4, 2, 2],
                             "score": [0.2, 0.1, 0.9, 0.4],
                             "verdict": ["signal_degradation", "signal_degradation", "computation_collapse",
                                         "signal_degradation"]})
    f = R.quantizer_findings(verdicts)
    assert f["same_verdict_4"] and not f["same_verdict_2"]
    assert f["verdicts_2"] == "rtn: Computation Collapse; awq: Signal Degradation"
    one = R.quantizer_findings(verdicts[(verdicts.bits == 4) | (verdicts.method == "rtn")], widths=[4, 2, 3])
    assert one["same_verdict_4"] and one["same_verdict_2"] is None and one["verdicts_2"] == "rtn: Computation Collapse"
    assert one["same_verdict_3"] is None and one["verdicts_3"] == "none diagnosed"  # named by the prose, not run
    assert R.quantizer_figure(verdicts).axes[0].get_xticklabels()[1].get_text() == "awq"


def test_models_findings_say_whether_every_model_gets_the_studys_mode():
    from qdiag.diagnosis import report as R

    table = pd.DataFrame({"model": ["org/a", "org/a", "b", "b"], "method": "gptq", "bits": [4, 2, 4, 2],
                          "score": [0.2, 0.8, 0.3, 0.4],
                          "verdict": ["signal_degradation", "computation_collapse", "signal_degradation",
                                      "signal_degradation"]})
    f = R.models_findings(table, widths=[4, 3, 2])
    assert f["models"] == 2 and f["as_paper_4"] and not f["as_paper_2"]
    assert f["models_2"] == "a GPTQ: Computation Collapse; b GPTQ: Signal Degradation"
    assert f["as_paper_3"] is None and f["models_3"] == "none diagnosed"
    cliff_only = table.assign(verdict=None)  # a sweep that ran the cliff alone has no verdicts
    assert R.models_findings(cliff_only)["models"] == 0 and R.models_findings(cliff_only)["as_paper_4"] is None
    labels = [t.get_text() for t in R.models_figure(table).axes[0].get_xticklabels()]
    assert labels == ["a\nGPTQ", "b\nGPTQ"]
    nothing = table.drop(columns="verdict")  # nor a sweep without the diagnosis
    assert R.models_findings(nothing)["models_4"] == "none diagnosed" and R.models_figure(nothing).axes
