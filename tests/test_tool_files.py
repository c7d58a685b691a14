"""Checkpoints the real tools wrote, each in its own environment, read by qdiag: llm-compressor's W4A16
compressed-tensors folder and GPTQModel's 4-bit g128 GPTQ folder, every matrix equal to the tool's own
de-quantization, and the format check passes."""

import os

import pytest
import torch
from safetensors.torch import load_file

from qdiag import fixtures
from qdiag.core.models import wrap
from qdiag.quant import checkpoint, format_check
from qdiag.testing import tiny_tokenizer

COMPRESSOR = os.environ.get("QDIAG_LLM_COMPRESSOR")
GPTQMODEL = os.environ.get("QDIAG_GPTQMODEL")


def _compare(ckpt, theirs, dtype=torch.float32):
    """Each matrix as qdiag de-quantizes it, rounded to ``dtype`` (the tool's arithmetic), is the tool's."""
    assert set(theirs) == set(ckpt.weights.tensors)
    for name, w in theirs.items():
        mine = ckpt.weights.tensors[name].dequantize(torch.float32).to(dtype).float()
        assert torch.allclose(mine, w, rtol=0, atol=1e-6), name
    assert format_check.flagged(ckpt.format_report).empty, format_check.summary(ckpt.format_report)


@pytest.mark.skipif(not COMPRESSOR or not os.path.exists(COMPRESSOR),
                    reason=f"llm-compressor is not installed: {fixtures.COMPRESSOR_ENV}")
def test_a_w4a16_checkpoint_reads_to_compressed_tensors_own_dequantization():
    files = fixtures.compressor_files(COMPRESSOR)
    ckpt = checkpoint.read(wrap(fixtures.tiny_gguf_model(), tiny_tokenizer()), files["W4A16"])
    assert ckpt.format == "ct" and ckpt.bits == 4 and ckpt.group_size == 128
    _compare(ckpt, load_file(str(files["dequantized"])))


@pytest.mark.skipif(not GPTQMODEL or not os.path.exists(GPTQMODEL),
                    reason=f"GPTQModel is not installed: {fixtures.GPTQMODEL_ENV}")
def test_a_gptqmodel_checkpoint_reads_to_gptqmodels_own_dequantization():
    files = fixtures.gptqmodel_files(GPTQMODEL)
    ckpt = checkpoint.read(wrap(fixtures.tiny_gguf_model(), tiny_tokenizer()), files["GPTQ-w4g128"])
    assert ckpt.format == "gptq" and ckpt.bits == 4 and ckpt.group_size == 128
    _compare(ckpt, load_file(str(files["dequantized"])), torch.float16)  # it computes in its scales' float16
