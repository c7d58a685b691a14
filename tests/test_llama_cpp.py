"""llama.cpp's tools: the type llama-quantize really writes, row sizes, its printed numbers, its KL
base file; and, where the tools are built ($QDIAG_LLAMA_CPP), its quantizer called in-process."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from qdiag.quant import llama_cpp

TOOLS = llama_cpp.find()
needs_tools = pytest.mark.skipif(TOOLS is None, reason="llama.cpp's tools are not built: python "
                                 "benchmarks/llama_cpp_build.py, then set QDIAG_LLAMA_CPP")


@pytest.mark.parametrize("asked, cols, stored", [
    ("Q4_K", 4096, "Q4_K"), ("Q4_K", 576, "Q5_0"), ("Q3_K", 576, "Q4_0"), ("Q6_K", 1536, "Q6_K"), ("Q6_K", 576, "Q8_0"),
    ("IQ2_XXS", 576, "IQ4_NL"), ("Q8_0", 576, "Q8_0"), ("Q4_K", 100, "F16"), ("q5_k", 576, "Q5_1")])
def test_the_type_llama_quantize_writes(asked, cols, stored):
    assert llama_cpp.stored_type(asked, cols) == stored


def test_row_bytes_are_the_blocks_and_their_scales():
    assert llama_cpp.row_bytes("Q4_0", 576) == 576 // 32 * 18
    assert llama_cpp.row_bytes("Q4_K", 4096) == 16 * 144
    assert llama_cpp.row_bytes("F32", 7) == 28
    with pytest.raises(ValueError, match="blocks of 256"):
        llama_cpp.row_bytes("Q4_K", 576)


def test_the_numbers_llama_perplexity_prints_are_read():
    text = """
====== Perplexity statistics ======
Mean PPL(Q)                   :  28.411327 ±   0.861229
Mean PPL(base)                :  25.010421 ±   0.752209
====== KL divergence statistics ======
Mean    KLD:   0.123456 ±   0.001234
Maximum KLD:  12.000000
====== Token probability statistics ======
Same top p: 84.125 ±  0.281 %
"""
    got = llama_cpp.parse_perplexity(text)
    assert got == pytest.approx({"ppl": 28.411327, "ppl_base": 25.010421, "kl": 0.123456, "kl_err": 0.001234,
                                 "top1_agreement": 0.84125, "top1_agreement_err": 0.00281})
    assert llama_cpp.parse_perplexity("Final estimate: PPL = 17.5 +/- 0.3") == {"ppl": 17.5}
    with pytest.raises(ValueError, match="no perplexity"):
        llama_cpp.parse_perplexity("nothing")


def test_a_kl_base_file_gives_back_its_tokens(tmp_path):
    tokens = np.arange(3 * 8, dtype=np.int32).reshape(3, 8)
    path = tmp_path / "base.kld"
    path.write_bytes(b"_logits_" + np.int32(8).tobytes() + np.int32(50).tobytes() + np.int32(3).tobytes()
                     + tokens.tobytes() + b"\0" * 64)
    got, first = llama_cpp.read_kl_base(path)
    assert torch.equal(got, torch.from_numpy(tokens.astype(np.int64))) and first == 4
    path.write_bytes(b"_nope___")
    with pytest.raises(ValueError, match="not a llama-perplexity KL base file"):
        llama_cpp.read_kl_base(path)


def test_a_folder_without_the_tools_is_refused_saying_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv(llama_cpp.ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="lacks llama-quantize.*llama_cpp_build.py"):
        llama_cpp.find()
    monkeypatch.delenv(llama_cpp.ENV)
    assert llama_cpp.find() is None
    with pytest.raises(FileNotFoundError, match="QDIAG_LLAMA_CPP"):
        llama_cpp.require()


@needs_tools
@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_1", "Q8_0"])
def test_llama_cpps_quantizer_writes_what_the_gguf_package_writes(qtype):
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    mine = llama_cpp.quantize(w, qtype, TOOLS)
    t = GGMLQuantizationType[qtype]
    assert np.array_equal(mine.data.numpy().reshape(-1), quantize(w.numpy(), t).reshape(-1))


@needs_tools
@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"])
def test_a_k_quant_from_llama_cpp_de_quantizes_as_the_gguf_package_reads_it(qtype):
    w = torch.randn(8, 512, generator=torch.Generator().manual_seed(1))
    q = llama_cpp.quantize(w, qtype, TOOLS)
    theirs = dequantize(q.data.numpy(), GGMLQuantizationType[qtype]).reshape(8, 512)
    assert torch.equal(q.dequantize(), torch.from_numpy(theirs))
    err = (q.dequantize() - w).norm() / w.norm()
    assert 0 < err < 0.5


@needs_tools
def test_an_importance_matrix_moves_the_error_to_the_unimportant_columns():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    imatrix = np.ones(256, dtype=np.float32)
    imatrix[:32] = 1e4
    plain = (llama_cpp.quantize(w, "Q3_K", TOOLS).dequantize() - w)[:, :32].square().mean()
    weighted = (llama_cpp.quantize(w, "Q3_K", TOOLS, imatrix).dequantize() - w)[:, :32].square().mean()
    assert weighted < plain
    with pytest.raises(ValueError, match="importance matrix"):
        llama_cpp.quantize(w, "IQ2_XXS", TOOLS)
    with pytest.raises(ValueError, match="blocks of 256"):
        llama_cpp.quantize(w[:, :96], "Q4_K", TOOLS)
