import pytest
import torch

from qdiag.arch import resolve, weight_matrix
from qdiag.calibrate import input_moments
from qdiag.eora import eora, eora_avg_bits
from qdiag.models import wrap
from qdiag.plan import avg_bits, uniform_plan
from qdiag.quantize import QuantSpec
from qdiag.swap import quantize_model
from tests.conftest import calib_ids, tiny_model, tiny_tokenizer


def test_eora_at_full_rank_gives_back_the_full_precision_weights():
    model = tiny_model("llama")
    lm = wrap(model, tiny_tokenizer())
    plan = uniform_plan(lm, QuantSpec(2, group_size=32))
    qw = quantize_model(lm, plan, progress=False)
    moments = input_moments(lm, list(plan), calib_ids(8, 16))
    full = eora(lm, qw, moments, rank=10_000)
    for name in plan:
        w = weight_matrix(model.get_submodule(name)).float()
        torch.testing.assert_close(full.tensors[name].dequantize(), w, atol=1e-4, rtol=1e-4)
    low = eora(lm, qw, moments, rank=2)
    name = next(iter(plan))
    w = weight_matrix(model.get_submodule(name)).float()
    x = torch.randn(64, w.shape[1])
    err_q = ((w - qw.tensors[name].dequantize()) @ x.t()).norm()
    err_low = ((w - low.tensors[name].dequantize()) @ x.t()).norm()
    assert err_low < err_q
    arch = resolve(lm)
    out, cols = weight_matrix(model.get_submodule(arch.weights[0]["q"])).shape
    assert eora_avg_bits(lm, plan, rank=0) == pytest.approx(avg_bits(lm, plan))
    assert eora_avg_bits(lm, plan, rank=2) > avg_bits(lm, plan)
