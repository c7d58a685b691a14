"""The decision rule: positions, the verdict's table, the score's bootstrap, the first domino."""

import numpy as np
import pandas as pd
import pytest

from qdiag.diagnosis import rule


def test_position_places_values_between_reference_and_null():
    assert rule.position(0.25, 0.0, 0.5) == 0.5  # sign flips: 0.5 is unrelated signs
    assert rule.position(1.0, 1.0, 0.0) == 0.0
    assert rule.position(0.0, 1.0, 0.0) == 1.0
    assert np.isnan(rule.position(0.3, 1.0, 1.0))


@pytest.mark.parametrize(("lo", "hi", "lost", "want"), [
    (0.0, 0.05, 0.0, "intact"),
    (0.0, 0.05, 0.09, "intact"),
    (0.0, 0.49, 0.10, "signal_degradation"),
    (0.1, 0.3, 0.95, "signal_degradation"),  # every answer lost, but no component broken
    (0.45, 0.55, 0.5, "transitional"),
    (0.5, 0.9, 0.0, "computation_collapse"),  # a component broken, whatever the damage
])
def test_the_verdict_table(lo, hi, lost, want):
    assert rule.verdict(lo, hi, lost) == want


def measurements(n=40, layers=4, broken_layer=None, seed=0):
    """Local probe arrays of a model that matches the reference, except one layer whose gates
    flip at random (sign flip rate 0.5: the null)."""
    rng = np.random.default_rng(seed)
    m = {"local_jsd": rng.uniform(0, 1e-3, (n, layers)), "local_jsd_null": np.full((n, layers), 0.1),
         "local_attn_cos": np.full((n, layers), 0.99), "local_sfr": rng.uniform(0, 0.02, (n, layers)),
         "local_jaccard": np.full((n, layers), 0.9), "local_mlp_cos": np.full((n, layers), 0.98), "d_mlp": 128,
         "correct": np.ones(n, bool)}
    if broken_layer is not None:
        m["local_sfr"][:, broken_layer] = rng.uniform(0.45, 0.55, n)
    return m


def test_the_score_is_the_most_broken_component_with_an_interval():
    value, lo, hi = rule.score(measurements(broken_layer=2))
    assert lo <= value <= hi
    assert value == pytest.approx(1.0, abs=0.05) and lo > rule.MIDPOINT
    value, lo, hi = rule.score(measurements())
    assert hi < 0.1


def test_first_domino_is_the_earliest_broken_layer():
    layers = pd.DataFrame({"layer": [0, 0, 1, 1, 2, 2], "component": ["attention", "mlp"] * 3,
                           "position": [0.1, 0.2, 0.3, 0.7, 0.9, 0.2]})
    assert rule.first_domino(layers) == {"layer": 1, "component": "mlp", "position": 0.7}
    assert rule.first_domino(layers.assign(position=0.1)) is None


def test_remedies_follow_the_verdict():
    layers = pd.DataFrame({"layer": [0, 0, 1, 1, 2, 2, 3, 3], "component": ["attention", "mlp"] * 4,
                           "position": [0.6, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]})
    collapse = rule.remedy("computation_collapse", layers, None, 4, quantized=True)
    assert collapse["actions"] == [{"repair": "protect_layers", "layers": [0], "bits": 8}]
    assert "No training-free compensation" in collapse["text"]
    spread = layers.assign(position=0.9)
    assert rule.remedy("computation_collapse", spread, None, 4, quantized=True)["actions"] == []
    degraded = rule.remedy("signal_degradation", layers.assign(position=layers.position / 3), 2, 4, quantized=True)
    assert [a["repair"] for a in degraded["actions"]] == ["eora", "protect_layers", "amplify"]
    assert rule.remedy("intact", layers, None, 4, quantized=True)["actions"] == []


def test_damage_outside_the_decoder_is_named_with_no_decoder_advice():
    quiet = pd.DataFrame({"layer": [0, 0, 1, 1], "component": ["attention", "mlp"] * 2,
                          "position": [0.01, 0.0, 0.02, 0.0]})
    r = rule.remedy("signal_degradation", quiet, 1, 2, quantized=True, outside=["token_embd.weight"])
    assert r["actions"] == [{"repair": "restore", "tensors": ["token_embd.weight"]}]
    assert "token_embd.weight" in r["text"] and "EoRA" not in r["text"]
    # where a decoder component has moved, the restore comes first and the decoder's advice follows
    moved = quiet.assign(position=[0.4, 0.1, 0.05, 0.0])
    r = rule.remedy("signal_degradation", moved, 1, 2, quantized=True, not_quantization=["blk.1.ffn_down.weight"])
    assert [a["repair"] for a in r["actions"]] == ["restore", "eora", "protect_layers"]
    assert r["text"].startswith("Not quantization damage: blk.1.ffn_down.weight differs")
