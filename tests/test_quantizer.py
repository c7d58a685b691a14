"""The quantizer's front door: GPTQ results cached on disk, keyed by everything they depend on."""

import inspect

import pytest
import torch

from qdiag.quant import gptq, quantizer
from qdiag.quant.plan import uniform_plan
from qdiag.quant.quantize import QuantSpec
from qdiag.testing import calib_ids, tiny_model


def test_gptq_results_are_cached_and_reloaded_exactly(tmp_path, monkeypatch):
    model = tiny_model("llama")
    plan = uniform_plan(model, QuantSpec(3, group_size=32, method="gptq"))
    first = quantizer.quantize_model(model, plan, calib_ids(), progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    def fail(*a, **k):
        raise AssertionError("GPTQ ran again although its result was cached")

    monkeypatch.setattr("qdiag.quant.quantizer.sequential_quantize", fail)
    again = quantizer.quantize_model(model, plan, calib_ids(), progress=False, cache_dir=tmp_path)
    for name, q in first.tensors.items():
        assert torch.equal(q.dequantize(), again.tensors[name].dequantize())
    with pytest.raises(AssertionError, match="ran again"):  # other calibration data: a new key
        quantizer.quantize_model(model, plan, calib_ids(seed=1), progress=False, cache_dir=tmp_path)


def test_a_change_to_the_quantizer_code_is_a_new_cache_key(monkeypatch):
    model = tiny_model("llama")
    plan = uniform_plan(model, QuantSpec(3, group_size=32, method="gptq"))
    before = quantizer._cache_key(model, plan, calib_ids(), damp=0.01)
    assert quantizer._cache_key(model, plan, calib_ids(), damp=0.01) == before
    source = inspect.getsource
    monkeypatch.setattr(inspect, "getsource", lambda m: source(m) + ("#" if m is gptq else ""))
    assert quantizer._cache_key(model, plan, calib_ids(), damp=0.01) != before


def test_the_cache_key_sees_where_each_weight_sits():
    # sums and a sample of values (the key before) do not move when rows swap places; the result does
    model = tiny_model("llama")
    plan = uniform_plan(model, QuantSpec(3, group_size=32, method="gptq"))
    before = quantizer._cache_key(model, plan, calib_ids())
    w = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        w.copy_(w[torch.arange(w.shape[0]).roll(1)])
    permuted = quantizer._cache_key(model, plan, calib_ids())
    assert permuted != before
    norm = model.model.layers[0].input_layernorm.weight  # not quantized, but calibration runs through it
    with torch.no_grad():
        norm.mul_(1.5)
    assert quantizer._cache_key(model, plan, calib_ids()) not in (before, permuted)


def test_a_mixed_plan_of_every_kind_of_tensor_comes_back_from_the_cache(tmp_path):
    from qdiag.quant.gguf import GGUFTensor
    from qdiag.quant.quantize import Scaled

    model = tiny_model()
    plan = uniform_plan(model, QuantSpec(4, 32, True, "gptq"))
    names = list(plan)
    plan[names[0]], plan[names[1]] = QuantSpec.gguf("q4_0"), QuantSpec(4, 32, False, "awq")
    plan[names[2]] = QuantSpec(4, 32, False, "hqq")
    fresh = quantizer.quantize_model(model, plan, calib_ids(), progress=False, cache_dir=tmp_path)
    cached = quantizer.quantize_model(model, plan, calib_ids(), progress=False, cache_dir=tmp_path)
    assert isinstance(cached.tensors[names[0]], GGUFTensor) and isinstance(cached.tensors[names[1]], Scaled)
    assert all(torch.equal(fresh.tensors[n].dequantize(), cached.tensors[n].dequantize()) for n in plan)
