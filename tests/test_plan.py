import pytest

from qdiag.core.arch import resolve
from qdiag.quant.plan import avg_bits, mixed_plan, uniform_plan, validate, width_specs
from qdiag.quant.quantize import QuantSpec


def test_uniform_plan_covers_decoder_weights_only(model):
    plan = uniform_plan(model, QuantSpec(bits=4, group_size=32))
    arch = resolve(model)
    assert set(plan) == set(arch.linear_names())
    assert arch.unembed not in plan and arch.embed not in plan


def test_avg_bits_of_a_mixed_plan(model):
    # llama tiny: per layer q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128
    base = uniform_plan(model, QuantSpec(bits=4, group_size=32))
    plan = mixed_plan(base, uniform_plan(model, QuantSpec(bits=8, group_size=32), layers=[0]))
    per_layer = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 128 * 64 * 2 + 64 * 128
    scale_bits = 16 / 32  # one 16-bit scale per 32 weights (every in_features is a multiple of 32)
    want = ((8 + scale_bits) * per_layer + (4 + scale_bits) * per_layer) / (2 * per_layer)
    assert avg_bits(model, plan) == pytest.approx(want)


def test_full_precision_plan_is_16_bits(model):
    assert avg_bits(model, uniform_plan(model, QuantSpec(bits=16))) == 16


def test_partial_plan_counts_the_rest_as_16_bits(model):
    plan = uniform_plan(model, QuantSpec(bits=2, group_size=None), weight_types=["down"])
    assert 2 < avg_bits(model, plan) < 16


def test_bad_plans_raise_before_work(model):
    with pytest.raises(ValueError, match="names no module"):
        validate(model, {})
    with pytest.raises(ValueError, match="not a module"):
        validate(model, {"model.layers.9.mlp.up_proj": QuantSpec()})
    with pytest.raises(ValueError, match="larger than in_features=64"):
        uniform_plan(model, QuantSpec(bits=4, group_size=128))
    with pytest.raises(ValueError, match="out of range"):
        uniform_plan(model, QuantSpec(bits=4, group_size=32), layers=[5])
    with pytest.raises(ValueError, match="unknown weight types"):
        uniform_plan(model, QuantSpec(bits=4, group_size=32), weight_types=["qkv"])


def test_width_specs_put_full_precision_first_once():
    specs = width_specs([2, "fp", 4], ["rtn", "gptq"], 64, True)
    assert [(s.method if s.bits != 16 else "fp", s.bits) for s in specs] == [
        ("fp", 16), ("rtn", 4), ("rtn", 2), ("gptq", 4), ("gptq", 2)]
    with pytest.raises(ValueError, match="no bit widths"):
        width_specs([], ["rtn"], 64, True)
