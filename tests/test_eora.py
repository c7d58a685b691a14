import pytest
import torch

from qdiag.core.arch import weight_matrix
from qdiag.core.models import wrap
from qdiag.quant.eora import eora, eora_avg_bits, eora_factors
from qdiag.quant.gptq import reconstruction_error
from qdiag.quant.moments import input_moments
from qdiag.quant.plan import avg_bits, uniform_plan
from qdiag.quant.quantize import QuantSpec
from qdiag.quant.quantizer import quantize_model
from qdiag.testing import calib_ids, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def setting():
    model = tiny_model("llama", layers=3)
    lm = wrap(model, tiny_tokenizer())
    plan = uniform_plan(lm, QuantSpec(2, group_size=32))
    return lm, model, plan, quantize_model(lm, plan, progress=False), calib_ids(8, 16)


def test_eora_at_full_rank_gives_back_the_full_precision_weights(setting):
    lm, model, plan, qw, calib = setting
    full = eora(lm, qw, calib, ranks=[10_000])[10_000]
    for name in plan:
        w = weight_matrix(model.get_submodule(name)).float()
        torch.testing.assert_close(full.tensors[name].dequantize(), w, atol=1e-4, rtol=1e-4)


def test_low_rank_beats_the_plain_svd_in_the_calibration_norm(setting):
    # EoRA's factors are the best rank-r fit in the norm weighted by the calibration inputs, so they
    # do at least as well there as the unweighted truncated SVD of the same error
    lm, model, plan, qw, calib = setting
    low = eora(lm, qw, calib, ranks=[2])[2]
    moments = input_moments(lm, list(plan), calib)
    for name in plan:
        w = weight_matrix(model.get_submodule(name)).float()
        E = w - qw.tensors[name].dequantize()
        U, S, Vh = torch.linalg.svd(E, full_matrices=False)
        plain = E - (U[:, :2] * S[:2]) @ Vh[:2]
        H = moments[name].to(w.device)
        err_eora = reconstruction_error(w, low.tensors[name].dequantize(), H)
        assert err_eora <= reconstruction_error(plain, torch.zeros_like(plain), H) * (1 + 1e-5)
        assert err_eora < reconstruction_error(w, qw.tensors[name].dequantize(), H)


def test_layers_taken_a_few_at_a_time_give_the_same_factors(setting):
    lm, _, plan, qw, calib = setting
    whole = eora(lm, qw, calib, ranks=[1, 3])
    one_by_one = eora(lm, qw, calib, ranks=[1, 3], budget_bytes=1)  # every layer its own pass
    for r in (1, 3):
        for name in plan:
            torch.testing.assert_close(whole[r].tensors[name].dequantize(), one_by_one[r].tensors[name].dequantize())
    name = next(iter(plan))
    assert whole[1].tensors[name].B.shape[1] == 1 and whole[3].tensors[name].B.shape[1] == 3


def test_factors_by_hand_and_the_bits_they_cost(setting):
    lm, _, plan, _, _ = setting
    error = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    B, A = eora_factors(error, torch.eye(2), rank=1)  # identity H: the plain SVD, keep the larger value
    torch.testing.assert_close(B @ A, torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    assert eora_avg_bits(lm, plan, rank=0) == pytest.approx(avg_bits(lm, plan))
    assert eora_avg_bits(lm, plan, rank=2) > avg_bits(lm, plan)


def test_eora_refuses_missing_calibration_and_bad_ranks(setting):
    lm, _, _, qw, calib = setting
    with pytest.raises(ValueError, match="calibration"):
        eora(lm, qw, None, ranks=[4])
    with pytest.raises(ValueError, match="at least 1"):
        eora(lm, qw, calib, ranks=[0])


def test_a_small_rank_of_a_large_matrix_fits_as_well_as_the_full_svd():
    """The randomized path (rank under a quarter of the smaller side) against the exact one: the
    weighted error ||(E - B A) X|| within 1%, on an error with a flat spectrum (the hard case)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 96, generator=g) * torch.linspace(0.1, 3, 96)  # inputs of uneven scale
    H = X.t() @ X / X.shape[0]
    E = torch.randn(80, 96, generator=g)
    err = {}
    for exact in (True, False):
        B, A = eora_factors(E, H, rank=8, exact=exact)
        err[exact] = float(((E - B @ A) @ X.t()).norm())
    assert err[False] >= err[True] * (1 - 1e-9)  # the exact fit is the best there is
    assert err[False] <= err[True] * 1.01


def test_a_randomized_fit_gone_non_finite_falls_back_to_the_exact_one(monkeypatch):
    """A GPU's QR gave NaN once on a tiny model's error; the fit is then the exact SVD's."""
    import qdiag.quant.eora as E

    g = torch.Generator().manual_seed(1)
    X = torch.randn(256, 96, generator=g)
    H, err = X.t() @ X / 256, torch.randn(80, 96, generator=g)
    exact = eora_factors(err, H, rank=8, exact=True)
    real_qr = torch.linalg.qr
    monkeypatch.setattr(E.torch.linalg, "qr", lambda A: type(real_qr(A))((real_qr(A).Q * float("nan"), real_qr(A).R)))
    B, A = eora_factors(err, H, rank=8)
    assert torch.allclose(B @ A, exact[0] @ exact[1], atol=1e-5)
