"""The format check: a checkpoint's error against its base, beside the error its own format's
rounding gives; a permuted tensor, a folded norm or another model is flagged, plain rounding is not."""

import copy

import pytest
import torch

from qdiag.core.arch import unwrap
from qdiag.core.models import wrap
from qdiag.quant import checkpoint, format_check
from qdiag.testing import tiny_model, tiny_tokenizer, write_gguf


@pytest.fixture
def base():
    return wrap(tiny_model("llama", scale=4), tiny_tokenizer())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1"])
def test_plain_rounding_passes(base, tmp_path, qtype):
    ckpt = checkpoint.read(base, write_gguf(unwrap(base), base.tokenizer, tmp_path / "m.gguf", qtype))
    table = format_check.check(base, ckpt, tools=False)
    matrices = table[table.parameter.str.contains(r"layers\.\d+\.(?:self_attn|mlp)\.")]
    assert len(matrices) == 14 and (matrices.verdict == "quantization").all()
    # the file is what the gguf package's rounding writes: the ratio is 1 up to the rows read
    assert matrices.ratio.between(0.99, 1.01).all()
    assert (table[~table.index.isin(matrices.index)].verdict == "as the base").all()
    assert format_check.flagged(table).empty and "within its format's rounding" in format_check.summary(table)


def test_a_permuted_tensor_and_folded_norms_are_named(base, tmp_path):
    other = copy.deepcopy(unwrap(base))
    w = other.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        w.copy_(w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))])
    ckpt = checkpoint.read(base, write_gguf(other, base.tokenizer, tmp_path / "m.gguf", "Q4_0", norm_scale=1.5))
    table = format_check.check(base, ckpt, tools=False)
    bad = format_check.flagged(table)
    assert "blk.1.ffn_down.weight" in set(bad.file_name)
    assert bad.set_index("file_name").loc["blk.1.ffn_down.weight", "ratio"] > 2 * format_check.LIMIT
    assert {n for n in bad.file_name if "norm" in n} == {n for n in table.file_name if "norm" in n}
    assert len(bad) == 1 + sum("norm" in n for n in table.file_name)  # nothing else
    text = format_check.summary(table)
    assert "blk.1.ffn_down.weight" in text and "Re-export" in text


def test_a_file_of_another_model_is_refused_naming_its_tensors(base, tmp_path):
    stranger = tiny_model("llama", seed=7, scale=4)
    path = write_gguf(stranger, base.tokenizer, tmp_path / "m.gguf", "Q8_0")
    with pytest.raises(ValueError, match="blk.0.attn_q.weight.*not a quantization of this base"):
        checkpoint.read(base, path)


def test_scales_folded_into_the_matrices_are_quantization(base, tmp_path):
    # AWQ's reparametrisation: W diag(s) rounded, the norm before it holding 1/s
    other = copy.deepcopy(unwrap(base))
    s = torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.5
    layer = other.model.layers[0]
    with torch.no_grad():
        for m in (layer.mlp.gate_proj, layer.mlp.up_proj):
            m.weight.mul_(s)
        layer.post_attention_layernorm.weight.div_(s)
    ckpt = checkpoint.read(base, write_gguf(other, base.tokenizer, tmp_path / "m.gguf", "Q8_0"))
    table = ckpt.format_report.set_index("parameter")
    assert table.loc["model.layers.0.mlp.gate_proj.weight", "verdict"] == "quantization, input scales folded in"
    assert table.loc["model.layers.0.post_attention_layernorm.weight", "verdict"] == "holds folded input scales"
    assert format_check.flagged(ckpt.format_report).empty
