import pytest
import torch

from qdiag.quant.gptq import column_order, gptq, reconstruction_error
from qdiag.quant.quantize import QuantSpec, rtn


def correlated_inputs(n=512, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scale = torch.linspace(0.2, 3.0, d)  # uneven channel magnitudes, like real activations
    return (torch.randn(n, d, generator=g) @ mix) * scale


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [None, 16, 20], ids=["channel", "g16", "g20-ragged"])
@pytest.mark.parametrize("order", ["natural", "act", "group"])
def test_gptq_beats_rtn_on_layer_output(bits, group, order):
    X = correlated_inputs()
    H = X.t() @ X / X.shape[0]
    w = torch.randn(32, X.shape[1], generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(bits=bits, group_size=group, method="gptq")
    e_gptq = reconstruction_error(w, gptq(w, H, spec, order=order).dequantize(), H)
    e_rtn = reconstruction_error(w, rtn(w, spec).dequantize(), H)
    assert e_gptq < e_rtn


def test_reconstruction_error_is_output_mse():
    X = correlated_inputs(n=64, d=8)
    w, w_hat = torch.randn(3, 8), torch.randn(3, 8)
    H = X.t() @ X / X.shape[0]
    direct = ((X @ w.t() - X @ w_hat.t()) ** 2).sum() / X.shape[0]
    assert reconstruction_error(w, w_hat, H) == pytest.approx(direct.item(), rel=1e-4)


@pytest.mark.parametrize("group", [None, 8])
def test_uncorrelated_inputs_reduce_to_rtn(group):
    # with H = I no error is pushed onto other columns, so GPTQ is exactly round-to-nearest
    w = torch.randn(6, 24, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(bits=3, group_size=group)
    assert torch.equal(gptq(w, torch.eye(24), spec, damp=0.0).int_codes(), rtn(w, spec).int_codes())


def test_dead_inputs_are_zeroed():
    H = torch.eye(8)
    H[3, 3] = 0  # an input that is never active
    q = gptq(torch.randn(4, 8), H, QuantSpec(bits=4, group_size=None))
    assert torch.all(q.dequantize()[:, 3] == 0)


def test_group_order_keeps_groups_contiguous():
    diag = torch.tensor([1.0, 5.0, 2.0, 9.0, 3.0, 4.0, 0.5])  # groups of 3: [0..2], [3..5], tail [6]
    perm = column_order(diag, 3, "group").tolist()
    assert perm == [3, 5, 4, 1, 2, 0, 6]  # group 1 (max 9) first, each group sorted, the tail last
    assert column_order(diag, 3, "act").tolist() == [3, 1, 5, 4, 2, 0, 6]
    with pytest.raises(ValueError, match="column order"):
        column_order(diag, 3, "random")


def reference_gptq(w, H, bits, group, damp=0.01):
    """GPTQ as the paper's Algorithm 1 states it: one column at a time, no blocks, in float64, the
    group's min-max parameters taken from its error-corrected columns when the loop reaches it."""
    W, H = w.double().clone(), H.double().clone()
    maxq = 2**bits - 1
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    codes = torch.zeros_like(W)
    for i in range(W.shape[1]):
        if i % group == 0:
            top = W[:, i : i + group].abs().amax(dim=1).clamp(min=1e-30)  # symmetric: zero at (maxq + 1) / 2
            scale, zero = 2 * top / maxq, (maxq + 1) / 2
        codes[:, i] = torch.clamp(torch.round(W[:, i] / scale) + zero, 0, maxq)
        err = (W[:, i] - scale * (codes[:, i] - zero)) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
    return codes


# blocks that hold whole groups: a group that runs past its block reads the columns after it before
# the block's errors reach them, as the original GPTQ code does, which the plain algorithm does not
@pytest.mark.parametrize("block_size", [128, 16, 32], ids=["one-block", "a-group-a-block", "two-groups-a-block"])
def test_gptq_gives_the_codes_of_the_plain_algorithm(block_size):
    X = correlated_inputs(d=48)
    H = X.t() @ X / X.shape[0]
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(3))
    ours = gptq(w, H, QuantSpec(bits=3, group_size=16), block_size=block_size).int_codes().double()
    same = (ours == reference_gptq(w, H, bits=3, group=16)).double().mean().item()
    assert same > 0.99  # float32 against float64: a code on a rounding boundary may flip
