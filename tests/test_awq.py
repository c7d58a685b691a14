"""AWQ: its error measure, a case where scales must be one, the known case where it wins (inputs with
outlier channels, scored on inputs it was not fitted on), and its place in a plan."""

import pytest
import torch

from qdiag.core.models import wrap
from qdiag.quant.awq import awq_group, clipped, output_error, search_scale
from qdiag.quant.plan import avg_bits, uniform_plan
from qdiag.quant.quantize import QuantSpec, Scaled, rtn
from qdiag.quant.quantizer import quantize_model
from qdiag.testing import calib_ids, tiny_model, tiny_tokenizer


def inputs(n: int, outliers: torch.Tensor, seed: int, d: int = 128) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    x[:, outliers] *= 20  # a few channels carry large activations, as in LLMs
    return x


def moment(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / len(x)


def test_output_error_is_the_squared_error_of_the_outputs():
    g = torch.Generator().manual_seed(0)
    e, x = torch.randn(8, 16, generator=g), torch.randn(100, 16, generator=g)
    assert torch.allclose(output_error(e, moment(x)), (x @ e.T).square().sum(1).mean(), rtol=1e-5)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("sym", [False, True])
def test_awq_beats_rtn_on_output_error_on_inputs_it_was_not_fitted_on(bits, sym):
    g = torch.Generator().manual_seed(1)
    outliers = torch.randperm(128, generator=g)[:4]
    w = torch.randn(64, 128, generator=g) * 0.05
    fit, test = moment(inputs(512, outliers, 2)), moment(inputs(512, outliers, 3))
    spec = QuantSpec(bits, 32, sym, "awq")
    ours = awq_group({"m": w}, fit, {"m": spec}, clip={"m"})["m"].dequantize()
    plain = rtn(w, QuantSpec(bits, 32, sym)).dequantize()
    assert output_error(ours - w, test) < 0.8 * output_error(plain - w, test)


def test_equal_activations_give_unit_scales_and_round_to_nearest():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(4, 32, False, "awq")
    assert torch.equal(search_scale([w], torch.eye(64), spec), torch.ones(64))
    got = awq_group({"m": w}, torch.eye(64), {"m": spec}, clip=set())["m"].dequantize()
    assert torch.equal(got, rtn(w, spec).dequantize())


def test_clipping_never_loses_to_no_clipping_on_the_fitted_inputs():
    g = torch.Generator().manual_seed(4)
    w, H = torch.randn(32, 64, generator=g), moment(inputs(256, torch.tensor([3, 9]), 5, d=64))
    spec = QuantSpec(3, 32, False, "awq")
    e_clip = rtn(clipped(w, H, spec), spec).dequantize() - w
    e_plain = rtn(w, spec).dequantize() - w
    for j in range(2):  # per group and row, the error measure clipping minimises
        cols = slice(32 * j, 32 * (j + 1))
        per_row = lambda e: ((e[:, cols] @ H[cols, cols]) * e[:, cols]).sum(1)  # noqa: E731
        assert (per_row(e_clip) <= per_row(e_plain) + 1e-6).all()


def test_awq_in_a_plan_shares_one_scale_per_input_and_is_cached(tmp_path, monkeypatch):
    model = wrap(tiny_model("llama", scale=4), tiny_tokenizer())
    spec = QuantSpec(4, 32, False, "awq")
    plan = uniform_plan(model, spec)
    monkeypatch.setenv("QDIAG_QUANT_CACHE", str(tmp_path))
    qw = quantize_model(model, plan, calib_ids(4, 24), progress=False)
    t = qw.tensors
    layer = "model.layers.0."
    assert all(isinstance(v, Scaled) for v in t.values())
    assert torch.equal(t[layer + "self_attn.q_proj"].col_scale, t[layer + "self_attn.v_proj"].col_scale)
    assert torch.equal(t[layer + "mlp.gate_proj"].col_scale, t[layer + "mlp.up_proj"].col_scale)
    assert avg_bits(model, plan) == avg_bits(model, uniform_plan(model, QuantSpec(4, 32, False)))
    again = quantize_model(model, plan, calib_ids(4, 24), progress=False)  # from the cache
    assert all(torch.equal(again.tensors[n].dequantize(), v.dequantize()) for n, v in t.items())
    with pytest.raises(ValueError, match="need calibration"):
        quantize_model(model, plan, None)
