"""Existing GGUF checkpoints, written here as llama.cpp's converter writes them (``testing.write_gguf``,
with the gguf package), read against their base: what they de-quantize to, what else they change,
and which bases they refuse."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from qdiag.core.arch import unwrap
from qdiag.core.models import wrap
from qdiag.measure import evaluate as ev
from qdiag.measure.widths import Reference, checkpoint_width
from qdiag.quant import checkpoint
from qdiag.testing import FACTS, tiny_model, tiny_tokenizer, write_gguf


@pytest.fixture(scope="module")
def base():
    return wrap(tiny_model("llama", scale=4), tiny_tokenizer())


def round_trip(w: torch.Tensor, qtype: str) -> torch.Tensor:
    t = GGMLQuantizationType[qtype]
    return torch.from_numpy(dequantize(quantize(w.numpy(), t), t))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1"])
def test_a_checkpoint_reads_back_to_the_weights_it_was_written_from(base, tmp_path, qtype):
    path = write_gguf(unwrap(base), base.tokenizer, tmp_path / "m.gguf", qtype)
    ckpt = checkpoint.read(base, path)
    hf = unwrap(base)
    linear = [n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert sorted(ckpt.weights.tensors) == sorted(linear)
    for name in linear:
        # llama.cpp permutes q and k rows; rows are quantized independently, so the round trip commutes
        assert torch.equal(ckpt.weights.tensors[name].dequantize(), round_trip(hf.get_submodule(name).weight, qtype))
    assert ckpt.types == {qtype: sum(hf.get_submodule(n).weight.numel() for n in linear)}
    assert ckpt.avg_bits == {"Q8_0": 8.5, "Q4_0": 4.5, "Q5_1": 6.0}[qtype]
    assert ckpt.changed == [] and ckpt.weights.extras == {}  # norms and embeddings as in the base


def test_parameters_changed_outside_the_matrices_are_swapped_in_and_reported(base, tmp_path):
    hf = unwrap(base)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    ckpt = checkpoint.read(base, write_gguf(hf, base.tokenizer, tmp_path / "m.gguf", "Q8_0", norm_scale=1.5))
    norms = sorted(n for n in before if "norm" in n)
    assert sorted(ckpt.changed) == norms and sorted(ckpt.weights.extras) == norms
    assert "not the quantization error alone" in ckpt.describe()
    # independently: a copy of the base with the written weights put in place
    expected = copy.deepcopy(hf)
    for name, p in expected.named_parameters():
        if "norm" in name:
            p.data.mul_(1.5)
        elif ".layers." in name and p.dim() == 2:
            p.data.copy_(round_trip(p.data, "Q8_0"))
    ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with ckpt.weights.applied(base):
        got = hf(ids).logits
    assert torch.allclose(got, expected(ids).logits, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in hf.state_dict().items())  # restored after the block


def test_a_checkpoint_of_another_model_is_refused_naming_the_difference(base, tmp_path):
    path = write_gguf(unwrap(base), base.tokenizer, tmp_path / "m.gguf", "Q8_0")
    with pytest.raises(ValueError, match="has 2 layers, the base 3"):
        checkpoint.read(wrap(tiny_model("llama", layers=3), tiny_tokenizer()), path)
    with pytest.raises(ValueError, match="is a 'llama' model but the base .* is 'qwen2'"):
        checkpoint.read(wrap(tiny_model("qwen2"), tiny_tokenizer()), path)
    other = tiny_tokenizer()
    other.add_tokens(["extra"])
    with pytest.raises(ValueError, match="vocabulary has"):
        checkpoint.read(wrap(unwrap(base), other), path)
    wide = tiny_model("llama")
    wide.config.intermediate_size = 96
    wider = wrap(type(wide)(wide.config).eval(), tiny_tokenizer())
    with pytest.raises(ValueError, match="do not fit the base"):
        checkpoint.read(wider, path)
    (tmp_path / "m.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a GGUF file"):
        checkpoint.read(base, tmp_path / "m.safetensors")


def test_a_checkpoint_is_a_configuration_like_any_other(base, tmp_path):
    path = write_gguf(unwrap(base), base.tokenizer, tmp_path / "m.gguf", "Q4_0")
    w = checkpoint_width(base, path)
    assert w.label == {"method": "gguf-Q4_0", "bits": 4, "group_size": 32, "sym": None, "avg_bits": 4.5}
    assert w.key == checkpoint_width(base, path).key
    assert w.key != checkpoint_width(base, write_gguf(unwrap(base), base.tokenizer, tmp_path / "n.gguf", "Q8_0")).key
    scored = Reference(base, FACTS).score(base, w)
    expected = copy.deepcopy(unwrap(base))
    for name, p in expected.named_parameters():
        if ".layers." in name and p.dim() == 2:
            p.data.copy_(round_trip(p.data, "Q4_0"))
    again = ev.score_prompts(wrap(expected, base.tokenizer), base.tokenizer, ev.prompt_table(FACTS, base.tokenizer))
    pd.testing.assert_frame_equal(scored.reset_index(drop=True), again.reset_index(drop=True))
    with pytest.raises(ValueError, match="not one of qdiag's uniform quantizations"):
        _ = w.spec


def test_the_permutation_is_undone_only_where_llama_cpp_made_it(base, tmp_path):
    # v is not permuted by the converter: reading must leave its rows alone
    path = write_gguf(unwrap(base), base.tokenizer, tmp_path / "m.gguf", "Q8_0")
    ckpt = checkpoint.read(base, path)
    q = ckpt.weights.tensors["model.layers.0.self_attn.q_proj"].dequantize()
    v = ckpt.weights.tensors["model.layers.0.self_attn.v_proj"].dequantize()
    hf = unwrap(base)
    assert (q - hf.model.layers[0].self_attn.q_proj.weight).abs().max() < 0.01
    assert (v - hf.model.layers[0].self_attn.v_proj.weight).abs().max() < 0.01
    assert np.isclose(ckpt.avg_bits, 8.5)
