import copy

import pytest
import torch

from qdiag.core.arch import from_matrix
from qdiag.quant.plan import uniform_plan
from qdiag.quant.quantize import QuantSpec
from qdiag.quant.quantizer import quantize_model
from qdiag.testing import FAMILIES, tiny_model


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


def test_parked_weights_come_back_as_they_were(model):
    from qdiag.quant.eora import LowRank
    from qdiag.quant.quantize import Scaled
    from qdiag.quant.swap import device_of

    qw = quantize_model(model, uniform_plan(model, QuantSpec(3, 16)))
    a, b = sorted(qw.tensors)[1:3]  # one matrix AWQ-scaled, one with a low-rank correction: nested ones too
    qw.tensors[a] = Scaled(qw.tensors[a], torch.linspace(0.5, 2.0, qw.tensors[a].in_features))
    out_b, in_b = qw.tensors[b].dequantize().shape
    qw.tensors[b] = LowRank(qw.tensors[b], torch.randn(out_b, 2), torch.randn(2, in_b))
    ids = torch.tensor([[1, 5, 9, 3]])
    before = {n: t.dequantize() for n, t in qw.tensors.items()}
    kinds = {n: type(t) for n, t in qw.tensors.items()}
    with qw.applied(model):
        out = model(input_ids=ids).logits
    with qw.parked("cpu") as parked:
        assert parked is qw and all(device_of(t) == torch.device("cpu") for t in qw.tensors.values())
    assert {n: type(t) for n, t in qw.tensors.items()} == kinds
    for n, t in qw.tensors.items():
        assert torch.equal(t.dequantize(), before[n]), n
    with qw.applied(model):
        torch.testing.assert_close(model(input_ids=ids).logits, out, rtol=0, atol=0)
