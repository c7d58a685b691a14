"""The loop every analysis shares: configurations checked before any work, quantized one at a
time, the reference's subsets computed once."""

import pytest
import torch

from qdiag.core.models import wrap
from qdiag.measure.widths import Reference, Width, each_width, quantized_only, reference_width
from qdiag.quant.quantize import QuantSpec
from qdiag.testing import FACTS, tiny_model, tiny_tokenizer


def test_specs_are_checked_before_anything_is_quantized():
    lm = wrap(tiny_model(), tiny_tokenizer())
    with pytest.raises(ValueError, match="larger than in_features"):
        each_width(lm, [QuantSpec(4, 32), QuantSpec(4, 4096)])
    with pytest.raises(TypeError, match="QuantSpec or Width"):
        each_width(lm, ["4-bit"])
    with pytest.raises(ValueError, match="no configurations"):
        each_width(lm, [])


def test_each_width_labels_applies_and_releases():
    lm = wrap(tiny_model(), tiny_tokenizer())
    custom = Width("custom", 16)
    seen = []
    for w in each_width(lm, [QuantSpec(16), QuantSpec(4, 32), custom], progress=False):
        seen.append(w)
        assert (w.weights is not None) == (w.method == "rtn")
    assert [w.label["method"] for w in seen] == ["fp", "rtn", "custom"]
    assert seen[1].avg_bits == pytest.approx(4.5)
    with pytest.raises(RuntimeError, match="released"):
        seen[1].applied(lm)  # its weights went when the loop moved on


def test_reference_subsets_match_the_configuration_scores():
    lm = wrap(tiny_model(), tiny_tokenizer())
    ref = Reference(lm, FACTS)
    w = next(iter(each_width(lm, [QuantSpec(2, 32)], progress=False)))
    scored = ref.score(lm, w)
    sub = ref.subsets(scored).set_index(["fact", "template"]).subset
    both = ref.scored.set_index(["fact", "template"]).correct & scored.set_index(["fact", "template"]).correct
    assert ((sub == "robust") == both).all()
    assert torch.equal(torch.tensor(ref.score(lm, reference_width()).prob.to_numpy()),
                       torch.tensor(ref.scored.prob.to_numpy()))


def test_quantized_only_drops_the_reference():
    assert quantized_only([QuantSpec(16), QuantSpec(4)]) == [QuantSpec(4)]
    with pytest.raises(ValueError, match="no quantized configuration"):
        quantized_only([QuantSpec(16), reference_width()])
