import copy

import pytest
import torch

from qdiag.arch import from_matrix
from qdiag.plan import uniform_plan
from qdiag.quantize import QuantSpec
from qdiag.swap import quantize_model
from tests.conftest import FAMILIES, tiny_model


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_applied_equals_a_model_with_dequantized_weights(family):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    qw = quantize_model(model, uniform_plan(model, QuantSpec(bits=3, group_size=16)))
    # independent computation: a deep copy whose weights are overwritten (fine for a tiny model)
    ref = copy.deepcopy(model)
    for name, q in qw.tensors.items():
        m = ref.get_submodule(name)
        m.weight.data = from_matrix(m, q.dequantize()).contiguous()
    with qw.applied(model):
        got = model(ids).logits
    torch.testing.assert_close(got, ref(ids).logits)
    assert not torch.allclose(got, model(ids).logits)


def test_restore_is_bit_identical_even_after_an_error(model):
    before = state(model)
    qw = quantize_model(model, uniform_plan(model, QuantSpec(bits=2, group_size=16)))
    with pytest.raises(RuntimeError):
        with qw.applied(model):
            model(torch.tensor([[1, 2, 3]]))
            raise RuntimeError("boom")
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.data_ptr() == model.get_parameter(n).data_ptr() for n, p in model.named_parameters())


def test_full_precision_plan_is_the_baseline(model):
    ids = torch.tensor([[5, 6, 7, 8]])
    qw = quantize_model(model, uniform_plan(model, QuantSpec(bits=16)))
    assert qw.tensors == {}
    with qw.applied(model):
        torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_codes_are_smaller_than_weights(model):
    qw = quantize_model(model, uniform_plan(model, QuantSpec(bits=4, group_size=32)))
    weight_bytes = sum(model.get_submodule(n).weight.nbytes for n in qw.tensors)
    assert qw.nbytes < 0.25 * weight_bytes


def test_gptq_without_calibration_raises(model):
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(model, uniform_plan(model, QuantSpec(bits=4, group_size=32, method="gptq")))


def test_gptq_results_are_cached_and_reloaded_exactly(tmp_path, monkeypatch):
    from qdiag import swap
    from tests.conftest import calib_ids

    model = tiny_model("llama")
    plan = uniform_plan(model, QuantSpec(3, group_size=32, method="gptq"))
    first = swap.quantize_model(model, plan, calib_ids(), progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    def fail(*a, **k):
        raise AssertionError("GPTQ ran again although its result was cached")

    monkeypatch.setattr("qdiag.calibrate.sequential_quantize", fail)
    again = swap.quantize_model(model, plan, calib_ids(), progress=False, cache_dir=tmp_path)
    for name, q in first.tensors.items():
        assert torch.equal(q.dequantize(), again.tensors[name].dequantize())
    with pytest.raises(AssertionError, match="ran again"):  # other calibration data: a new key
        swap.quantize_model(model, plan, calib_ids(seed=1), progress=False, cache_dir=tmp_path)


def test_a_change_to_the_quantizer_code_is_a_new_cache_key(monkeypatch):
    import inspect

    from qdiag import gptq, swap
    from tests.conftest import calib_ids

    model = tiny_model("llama")
    plan = uniform_plan(model, QuantSpec(3, group_size=32, method="gptq"))
    before = swap._cache_key(model, plan, calib_ids(), damp=0.01)
    assert swap._cache_key(model, plan, calib_ids(), damp=0.01) == before
    source = inspect.getsource
    monkeypatch.setattr(inspect, "getsource", lambda m: source(m) + ("#" if m is gptq else ""))
    assert swap._cache_key(model, plan, calib_ids(), damp=0.01) != before
