"""Files llama-quantize wrote (``qdiag.fixtures``, made once and cached where llama.cpp's tools are
built): qdiag reads every one of them to the gguf package's own de-quantization, and the format
check finds each to be the base quantized."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from qdiag import fixtures
from qdiag.core.arch import resolve, unwrap, weight_matrix
from qdiag.core.models import wrap
from qdiag.quant import checkpoint, format_check, llama_cpp
from qdiag.testing import _permute_for_gguf, tiny_tokenizer

TOOLS = llama_cpp.find()
pytestmark = pytest.mark.skipif(TOOLS is None, reason="llama.cpp's tools are not built: python "
                                "benchmarks/llama_cpp_build.py, then set QDIAG_LLAMA_CPP (make test does both)")


def file_layout(name: str, w: np.ndarray, config) -> np.ndarray:
    """A matrix in the HF layout put in the file's (llama.cpp's converter permutes q and k rows),
    independently of the reader's processor."""
    if name.endswith("attn_q.weight"):
        return _permute_for_gguf(w, config.num_attention_heads)
    if name.endswith("attn_k.weight"):
        return _permute_for_gguf(w, config.num_attention_heads, config.num_key_value_heads)
    return w


def check_file(base, path):
    ckpt = checkpoint.read(base, path)
    hf = unwrap(base)
    reader = {t.name: t for t in GGUFReader(path).tensors}
    arch = resolve(base)
    for name in arch.linear_names():
        t = reader[ckpt.file_names[f"{name}.weight"]]
        theirs = dequantize(t.data, t.tensor_type).reshape(weight_matrix(hf.get_submodule(name)).shape)
        mine = file_layout(t.name, ckpt.weights.tensors[name].dequantize().cpu().numpy(), hf.config)
        np.testing.assert_array_equal(mine, theirs, err_msg=f"{t.name} ({t.tensor_type.name})")
        assert ckpt.tensor_types[f"{name}.weight"] == t.tensor_type.name
    table = ckpt.format_report
    assert format_check.flagged(table).empty, format_check.summary(table)
    exact = table[table.matrix & ~table.approximate]
    assert len(exact) and exact.ratio.between(0.5, 1.5).all()  # llama.cpp's rounding of the same base
    return ckpt


@pytest.fixture(scope="module")
def tiny_files():
    return fixtures.llama_cpp_files("tiny", TOOLS)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K"])
def test_a_tiny_models_llama_quantize_files_read_as_the_gguf_package_reads_them(tiny_files, qtype):
    base = wrap(fixtures.tiny_gguf_model(), tiny_tokenizer())
    ckpt = check_file(base, tiny_files[qtype])
    if qtype != "Q8_0":  # a mixture: llama.cpp's own choice of types per tensor, read as it is
        assert len(ckpt.types) > 1 or qtype == "Q2_K"


@pytest.fixture(scope="module")
def smollm2():
    from qdiag.core.models import load_model

    return load_model()


@pytest.mark.integration
@pytest.mark.parametrize("qtype", fixtures.LLAMA_TYPES)
def test_the_default_models_llama_quantize_files_read_as_the_gguf_package_reads_them(smollm2, qtype):
    files = fixtures.llama_cpp_files("smollm2", TOOLS)
    ckpt = check_file(smollm2, files[qtype])
    assert ckpt.changed == [] or qtype != "Q8_0"  # Q8_0 keeps token_embd in Q8_0, as the shipped file has it


@pytest.mark.integration
def test_the_float_file_is_the_reference_bit_for_bit(smollm2):
    ckpt = checkpoint.read(smollm2, fixtures.llama_cpp_files("smollm2", TOOLS, types=())["F32"])
    hf = unwrap(smollm2)
    for name in resolve(smollm2).linear_names()[:14]:
        assert torch.equal(ckpt.weights.tensors[name].dequantize(), weight_matrix(hf.get_submodule(name)))
    assert ckpt.changed == []
