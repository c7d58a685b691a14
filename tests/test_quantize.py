import math

import numpy as np
import pytest
import torch

from qdiag.quant.quantize import (
    QTensor,
    QuantSpec,
    bits_per_weight,
    dequantize,
    minmax_params,
    parse_bits,
    quantize,
    rtn,
)


def rtn_by_hand(w: np.ndarray, bits: int, group: int | None, sym: bool) -> np.ndarray:
    """An independent, element-by-element min-max round trip (GPTQ's convention)."""
    out = np.empty_like(w)
    maxq = 2**bits - 1
    g = w.shape[1] if group is None else group
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], g):
            x = w[r, start : start + g]
            lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
            if sym:
                hi = max(-lo, hi)
                lo = -hi
            scale = (hi - lo) / maxq
            zero = (maxq + 1) / 2 if sym else np.round(-lo / scale)
            q = np.clip(np.round(x / scale) + zero, 0, maxq)
            out[r, start : start + g] = scale * (q - zero)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("group", [None, 4, 5], ids=["channel", "g4", "g5-ragged"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_rtn_matches_hand_computation(bits, group, sym):
    w = torch.randn(3, 13, generator=torch.Generator().manual_seed(bits))
    got = rtn(w, QuantSpec(bits=bits, group_size=group, sym=sym)).dequantize()
    want = rtn_by_hand(w.numpy(), bits, group, sym)  # float32, as torch computes
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_rtn_known_values():
    # 2-bit asymmetric over [-1, 1]: scale 2/3, zero round(1.5) = 2, codes 0..3
    w = torch.tensor([[-1.0, 0.0, 0.5, 1.0]])
    q = rtn(w, QuantSpec(bits=2, group_size=None, sym=False))
    assert q.int_codes().tolist() == [[0, 2, 3, 3]]  # round(-1.5) = -2 (half to even)
    torch.testing.assert_close(q.dequantize(), torch.tensor([[-4 / 3, 0.0, 2 / 3, 2 / 3]]))


@pytest.mark.parametrize("in_features", [7, 8], ids=["odd", "even"])
@pytest.mark.parametrize("bits", [3, 4, 6])
def test_codes_pack_and_unpack(bits, in_features):
    q = torch.randint(0, 2**bits, (5, in_features))
    t = QTensor.from_codes(q, torch.ones(5, 1), torch.zeros(5, 1), bits, None)
    assert torch.equal(t.int_codes(), q.to(torch.int16))
    assert t.codes.shape[1] == (math.ceil(in_features / 2) if bits <= 4 else in_features)


def test_error_never_grows_with_bits():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    errs = [(rtn(w, QuantSpec(bits=b, group_size=16)).dequantize() - w).pow(2).mean().item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_symmetric_zero_point_is_midpoint():
    _, zero = minmax_params(torch.randn(4, 8), bits=4, sym=True)
    assert torch.all(zero == 8)


def test_all_zero_group_round_trips():
    w = torch.zeros(2, 6)
    assert torch.equal(rtn(w, QuantSpec(bits=3, group_size=3)).dequantize(), w)


def test_bits_per_weight_arithmetic():
    # 576 inputs, group 128: 5 groups (the last one 64 wide), one 16-bit scale each
    assert bits_per_weight(QuantSpec(bits=4, group_size=128), 576) == pytest.approx(4 + 16 * 5 / 576)
    # asymmetric adds a b-bit zero point per group
    assert bits_per_weight(QuantSpec(bits=3, group_size=64, sym=False), 128) == pytest.approx(3 + (16 + 3) * 2 / 128)
    assert bits_per_weight(QuantSpec(bits=2, group_size=None), 100) == pytest.approx(2 + 16 / 100)
    assert bits_per_weight(QuantSpec(bits=16), 100) == 16


@pytest.mark.parametrize("bits", [1, 9, 0, 32, "x", 2.5, True])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("text,want", [("fp", 16), ("FP16", 16), ("16", 16), ("4", 4)])
def test_parse_bits(text, want):
    assert parse_bits(text) == want


def test_bad_group_and_method_raise():
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=0)
    with pytest.raises(ValueError, match="unknown quantization method"):
        QuantSpec(method="awq2")
    with pytest.raises(ValueError, match="larger than in_features=64"):
        rtn(torch.randn(4, 64), QuantSpec(group_size=128))


def test_quantize_and_dequantize_in_place_give_the_allocating_results():
    g = torch.Generator().manual_seed(0)
    x, scale, zero = torch.randn(7, 5, generator=g), torch.rand(7, 1, generator=g) + 0.1, torch.full((7, 1), 8.0)
    codes = quantize(x, scale, zero, 15)
    out = torch.empty_like(x)
    assert quantize(x, scale, zero, 15, out=out) is out and torch.equal(out, codes)
    back = torch.empty_like(x)
    assert dequantize(codes, scale, zero, out=back) is back and torch.equal(back, dequantize(codes, scale, zero))
