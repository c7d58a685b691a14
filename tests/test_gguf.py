"""llama.cpp's types: de-quantization in torch against the gguf package, qdiag's GGUF quantizers
against the package's own round trip, and the specs that name them."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from qdiag.quant import gguf
from qdiag.quant.plan import avg_bits, uniform_plan, width_specs
from qdiag.quant.quantize import QuantSpec, bits_per_weight, rtn
from qdiag.quant.quantizer import quantize_model
from qdiag.testing import tiny_model


@pytest.mark.parametrize("name", list(gguf.TYPES))
def test_quantizers_reproduce_the_gguf_round_trip(name):
    t = GGMLQuantizationType[name.upper()]
    cols = 2 * GGML_QUANT_SIZES[t][0]
    w = torch.randn(6, cols, generator=torch.Generator().manual_seed(0)) * 0.05
    q = gguf.quantize_matrix(w, name)
    expected = dequantize(quantize(w.numpy(), t), t)
    assert torch.equal(q.dequantize(), torch.from_numpy(expected))
    assert q.nbytes * 8 / w.numel() == gguf.bits_per_weight(name)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_torch_dequantization_equals_the_package_on_arbitrary_bytes(name):
    # any bytes are a valid legacy block once the float16 scales are finite: check every bit pattern path
    t = GGMLQuantizationType[name.upper()]
    block, size = GGML_QUANT_SIZES[t]
    g = np.random.default_rng(1)
    data = g.integers(0, 256, (5, 3 * size), dtype=np.uint8)
    blocks = data.reshape(5, 3, size)
    scales = 2 if t in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_1) else 1
    blocks[..., : 2 * scales] = np.frombuffer(g.normal(0, 0.1, 5 * 3 * scales).astype(np.float16).tobytes(),
                                              np.uint8).reshape(5, 3, 2 * scales)
    ours = gguf.GGUFTensor(torch.from_numpy(data), int(t), 3 * block).dequantize()
    assert torch.equal(ours, torch.from_numpy(dequantize(data, t)))


def test_known_values_of_q4_0():
    # one block: scale 0.5, codes 0..15 then 15..0 -> weights 0.5 * (code - 8)
    codes = np.r_[np.arange(16), np.arange(15, -1, -1)]
    packed = (codes[:16] | (codes[16:] << 4)).astype(np.uint8)
    block = np.concatenate([np.frombuffer(np.float16(0.5).tobytes(), np.uint8), packed])
    w = gguf.GGUFTensor(torch.from_numpy(block.reshape(1, -1)), int(GGMLQuantizationType.Q4_0), 32).dequantize()
    assert torch.equal(w[0], torch.from_numpy(0.5 * (codes - 8.0)).float())


def test_bits_and_names():
    assert gguf.bits_per_weight("Q4_0") == 4.5 and gguf.bits_per_weight("q8_0") == 8.5
    assert gguf.bits_per_weight("Q2_K") == 2.625 and gguf.nominal_bits("Q2_K") == 2
    assert gguf.nominal_bits("IQ2_XS") == 2 and gguf.nominal_bits("TQ1_0") == 2 and gguf.nominal_bits("F16") == 16
    with pytest.raises(ValueError, match="unknown GGUF type"):
        gguf.qtype("Q9_9")


def test_specs_of_gguf_types():
    spec = QuantSpec.gguf("q4_1")
    assert (spec.bits, spec.group_size, spec.sym, spec.label()) == (4, 32, False, "q4_1")
    assert bits_per_weight(spec, 64) == 5.0
    with pytest.raises(ValueError, match="QuantSpec.gguf"):
        QuantSpec(bits=4, group_size=128, method="q8_0")
    with pytest.raises(ValueError, match="cannot quantize to Q2_K"):
        QuantSpec.gguf("q2_k")
    with pytest.raises(ValueError, match="blocks of 256"):
        rtn(torch.randn(4, 64), QuantSpec.gguf("tq2_0"))
    assert spec.at_bits(8) == QuantSpec.gguf("q8_0")
    specs = width_specs([16, 4, 2], ["rtn", "q8_0"])
    assert [s.label() for s in specs] == ["fp", "rtn-w4-g128-sym", "rtn-w2-g128-sym", "q8_0"]


def test_a_gguf_plan_quantizes_every_matrix_and_counts_its_bits():
    model = tiny_model("llama")
    plan = uniform_plan(model, QuantSpec.gguf("q4_0"))
    qw = quantize_model(model, plan, progress=False)
    assert avg_bits(model, plan) == 4.5
    name = next(iter(plan))
    w = model.get_submodule(name).weight
    t = GGMLQuantizationType.Q4_0
    assert torch.equal(qw.tensors[name].dequantize(), torch.from_numpy(dequantize(quantize(w.numpy(), t), t)))
    assert qw.key and qw.key != quantize_model(model, uniform_plan(model, QuantSpec.gguf("q8_0"))).key


# Where each k-quant keeps its float16 factors (d, and dmin for the types with minima).
K_FACTORS = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


@pytest.mark.parametrize("name", sorted(K_FACTORS))
def test_k_quants_dequantize_in_torch_as_the_package_does(name):
    """Super-blocks of arbitrary bytes (finite float16 factors): equal bit for bit to gguf's numpy code."""
    t = GGMLQuantizationType[name]
    block, size = GGML_QUANT_SIZES[t]
    g = np.random.default_rng(2)
    data = g.integers(0, 256, (4, 2 * size), dtype=np.uint8)
    blocks = data.reshape(4, 2, size)
    for at in K_FACTORS[name]:
        blocks[..., at:at + 2] = np.frombuffer(g.normal(0, 0.05, 8).astype(np.float16).tobytes(),
                                               np.uint8).reshape(4, 2, 2)
    packed = gguf.GGUFTensor(torch.from_numpy(data), int(t), 2 * block)
    assert torch.equal(packed.dequantize(), torch.from_numpy(dequantize(data, t)))
    assert t in gguf._K_QUANTS  # the torch path, not the numpy fallback
