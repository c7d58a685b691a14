"""Existing GGUF checkpoints, written here as llama.cpp's converter writes them (``testing.write_gguf``,
with the gguf package), read against their base: what they de-quantize to, what else they change,
and which bases they refuse."""

import copy
import json

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
    return torch.from_numpy(dequantize(quantize(w.detach().cpu().numpy(), t), t)).to(w.device)


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
    ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(0)).to(hf.device)
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
    with pytest.raises(ValueError, match="token 43 is '\\[PAD43\\]', the base tokenizer's 'extra'"):
        checkpoint.read(wrap(unwrap(base), other), path)
    wide = tiny_model("llama")
    wide.config.intermediate_size = 96
    wider = wrap(type(wide)(wide.config).eval(), tiny_tokenizer())
    with pytest.raises(ValueError, match="do not fit the base"):
        checkpoint.read(wider, path)
    (tmp_path / "m.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="neither a GGUF file"):
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
    assert q.device == v.device == hf.device  # packed where the base is, de-quantized there
    assert np.isclose(ckpt.avg_bits, 8.5)


# GPTQ and AWQ checkpoints in the Hugging Face layout, written by an independent packer (numpy loops)

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def quantize_groups(w: np.ndarray, g_idx: np.ndarray, bits: int):
    """Asymmetric min-max codes per (group, output), float16 scales, and the weights they give."""
    n_groups = g_idx.max() + 1
    q = np.zeros(w.shape, dtype=np.int64)
    scales = np.zeros((n_groups, w.shape[0]), dtype=np.float16)
    zeros = np.zeros((n_groups, w.shape[0]), dtype=np.int64)
    for g in range(n_groups):
        cols = np.where(g_idx == g)[0]
        lo, hi = w[:, cols].min(1), w[:, cols].max(1)
        s = ((hi - lo) / (2**bits - 1)).astype(np.float16)
        z = np.clip(np.round(-lo / s.astype(np.float32)), 0, 2**bits - 1).astype(np.int64)
        q[:, cols] = np.clip(np.round(w[:, cols] / s[:, None].astype(np.float32)) + z[:, None], 0, 2**bits - 1)
        scales[g], zeros[g] = s, z
    expected = scales.astype(np.float32)[g_idx].T * (q - zeros[g_idx].T)
    return q, scales, zeros, expected


def pack(values: np.ndarray, bits: int) -> int:
    word = 0
    for j, v in enumerate(values):
        word |= int(v) << (bits * j)
    return word


def to_int32(words) -> torch.Tensor:
    return torch.from_numpy(np.array(words, dtype=np.uint64).astype(np.uint32).view(np.int32))


def gptq_tensors(w: np.ndarray, bits: int, group: int, act_order: bool, v2: bool, seed: int = 0) -> tuple:
    out, n_in = w.shape
    per = 32 // bits
    g_idx = np.arange(n_in) // group
    if act_order:  # groups follow the order columns were quantized in
        perm = np.random.default_rng(seed).permutation(n_in)
        g_idx = np.empty(n_in, dtype=np.int64)
        g_idx[perm] = np.arange(n_in) // group
    q, scales, zeros, expected = quantize_groups(w, g_idx, bits)
    qt = q.T  # (in, out)
    qweight = [[pack(qt[r * per:(r + 1) * per, o], bits) for o in range(out)] for r in range(n_in // per)]
    stored = zeros - (0 if v2 else 1)
    qzeros = [[pack(stored[g, c * per:(c + 1) * per], bits) for c in range(out // per)] for g in range(len(scales))]
    parts = {"qweight": to_int32(qweight), "qzeros": to_int32(qzeros), "scales": torch.from_numpy(scales),
             "g_idx": torch.from_numpy(g_idx.astype(np.int32))}
    return parts, expected


def awq_tensors(w: np.ndarray, group: int) -> tuple:
    out, n_in = w.shape
    q, scales, zeros, expected = quantize_groups(w, np.arange(n_in) // group, 4)
    qt = q.T  # (in, out)

    def packed(m: np.ndarray) -> list:
        return [[pack([m[r, c * 8 + AWQ_ORDER[i]] for i in range(8)], 4) for c in range(m.shape[1] // 8)]
                for r in range(m.shape[0])]

    parts = {"qweight": to_int32(packed(qt)), "qzeros": to_int32(packed(zeros)), "scales": torch.from_numpy(scales)}
    return parts, expected


def write_packed(hf, folder, fmt: str, bits: int = 4, group: int = 32, act_order: bool = False, v2: bool = False,
                 norm_scale: float = 1.0, sym: bool = False):
    """A GPTQ, AWQ or compressed-tensors ("ct") checkpoint folder of ``hf``; returns it and the weights
    each matrix must read back as."""
    from safetensors.torch import save_file

    from qdiag.core.arch import resolve

    folder.mkdir()
    tensors, expected = {}, {}
    linear = set(resolve(hf).linear_names())
    for name, p in hf.state_dict().items():
        module = name.rpartition(".")[0]
        if module in linear and name.endswith(".weight"):
            w = p.float().cpu().numpy()
            parts, expected[module] = (gptq_tensors(w, bits, group, act_order, v2) if fmt == "gptq"
                                       else awq_tensors(w, group) if fmt == "awq"
                                       else compressed_tensors(w, bits, group, sym))
            tensors.update({f"{module}.{k}": v for k, v in parts.items()})
        else:
            tensors[name] = (p * norm_scale if "norm" in name else p).contiguous().cpu()
    save_file(tensors, str(folder / "model.safetensors"))
    qc = {"quant_method": fmt, "bits": bits, "group_size": group}
    if fmt == "gptq":
        qc.update(desc_act=act_order, checkpoint_format="gptq_v2" if v2 else "gptq")
    elif fmt == "awq":
        qc.update(version="gemm", zero_point=True)
    else:
        scheme = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group", "group_size": group}
        qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme}}, "ignore": ["lm_head"]}
    (folder / "config.json").write_text(json.dumps({**hf.config.to_dict(), "quantization_config": qc}))
    return folder, expected


@pytest.mark.parametrize(("fmt", "bits", "act_order", "v2"), [("gptq", 4, False, False), ("gptq", 4, True, False),
                                                              ("gptq", 2, True, True), ("gptq", 8, False, True),
                                                              ("awq", 4, False, False)])
def test_gptq_and_awq_checkpoints_read_back_to_what_was_packed(base, tmp_path, fmt, bits, act_order, v2):
    hf = unwrap(base)
    folder, expected = write_packed(hf, tmp_path / "ckpt", fmt, bits, 32, act_order, v2)
    ckpt = checkpoint.read(base, folder)
    for name, w in expected.items():
        assert torch.equal(ckpt.weights.tensors[name].dequantize().cpu(), torch.from_numpy(w).float()), name
    assert ckpt.changed == [] and (ckpt.method, ckpt.bits, ckpt.group_size) == (f"{fmt}-ckpt", bits, 32)
    # storage: codes, a 16-bit scale and a packed zero point per (group of 32, output); GPTQ adds
    # an int32 group index per input
    shapes = [tuple(hf.get_submodule(n).weight.shape) for n in expected]
    stored = sum(o * i * bits + (i // 32) * o * (16 + bits) + (32 * i if fmt == "gptq" else 0) for o, i in shapes)
    assert ckpt.avg_bits == pytest.approx(stored / sum(o * i for o, i in shapes))


def test_a_packed_checkpoint_with_changed_norms_runs_as_a_configuration(base, tmp_path):
    hf = unwrap(base)
    folder, _ = write_packed(hf, tmp_path / "ckpt", "gptq", norm_scale=1.5)
    w = checkpoint_width(base, folder)
    assert w.label["method"] == "gptq-ckpt" and sorted(w.checkpoint.changed) == sorted(
        n for n in hf.state_dict() if "norm" in n)
    ids = torch.randint(4, 60, (1, 6), generator=torch.Generator().manual_seed(0)).to(hf.device)
    with w.applied(base):
        got = hf(ids).logits
    assert not torch.allclose(got, hf(ids).logits)


def test_packed_checkpoints_refused_naming_the_difference(base, tmp_path):
    hf = unwrap(base)
    folder = write_packed(hf, tmp_path / "a", "gptq", bits=4)[0]
    with pytest.raises(ValueError, match="3-bit packed checkpoints are not supported"):
        checkpoint.read(base, _edit_config(folder, bits=3))
    with pytest.raises(ValueError, match="layer count is 2, the base's 3"):
        checkpoint.read(wrap(tiny_model("llama", layers=3), tiny_tokenizer()),
                        write_packed(hf, tmp_path / "c", "gptq")[0])
    with pytest.raises(ValueError, match="'fp8' is not read yet"):
        checkpoint.read(base, _edit_config(write_packed(hf, tmp_path / "d", "gptq")[0], quant_method="fp8"))


def _edit_config(folder, **quantization):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(quantization)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def compressed_tensors(w: np.ndarray, bits: int, group: int, sym: bool) -> tuple:
    """llm-compressor's pack-quantized layout, written independently: signed codes stored with an
    offset of 2^(bits-1), packed along the inputs (zero points along the outputs)."""
    out, n_in = w.shape
    per, offset = 32 // bits, 2 ** (bits - 1)
    g_idx = np.arange(n_in) // group
    q, scales, zeros, expected = quantize_groups(w, g_idx, bits)
    if sym:  # symmetric: zero point 2^(bits-1), i.e. 0 once the codes are signed
        top = np.abs(w).reshape(out, -1, group).max(-1) / offset
        s = top.astype(np.float16)
        q = np.clip(np.round(w / np.repeat(s.astype(np.float32), group, 1)), -offset, offset - 1) + offset
        scales, zeros = s.T, np.full(s.T.shape, offset)
        expected = np.repeat(s.astype(np.float32), group, 1) * (q - offset)
    unsigned = q  # codes 0..2^bits-1 are the signed codes plus the offset
    packed = [[pack(unsigned[o, c * per:(c + 1) * per], bits) for c in range(n_in // per)] for o in range(out)]
    parts = {"weight_packed": to_int32(packed), "weight_scale": torch.from_numpy(scales.T.copy()),
             "weight_shape": torch.tensor([out, n_in], dtype=torch.int32)}
    if not sym:
        zt = zeros.T  # (out, G), stored as signed + offset = the unsigned zero point
        parts["weight_zero_point"] = to_int32([[pack(zt[r * per:(r + 1) * per, g], bits) for g in range(zt.shape[1])]
                                               for r in range(out // per)])
    return parts, expected


@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_checkpoints_read_back_to_what_was_packed(base, tmp_path, sym):
    folder, expected = write_packed(unwrap(base), tmp_path / "ct", "ct", sym=sym)
    ckpt = checkpoint.read(base, folder)
    for name, w in expected.items():
        assert torch.equal(ckpt.weights.tensors[name].dequantize().cpu(), torch.from_numpy(w).float()), name
    assert (ckpt.method, ckpt.bits, ckpt.group_size, ckpt.changed) == ("ct-ckpt", 4, 32, [])
    _edit_config(folder, format="float-quantized")
    with pytest.raises(ValueError, match="format 'float-quantized' is not read yet"):
        checkpoint.read(base, folder)


def test_a_hub_id_that_cannot_be_fetched_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert checkpoint.is_hub_id("org/model-GPTQ") and checkpoint.is_hub_id("org/repo/model.Q4_0.gguf")
    assert not checkpoint.is_hub_id("/abs/model.gguf") and not checkpoint.is_hub_id("./local")
    with pytest.raises(FileNotFoundError, match="hub could not provide it .*pass the local path"):
        checkpoint.locate("org/model-GPTQ")


def test_a_family_with_biases_keeps_its_quantized_matrices(tmp_path):
    # Qwen2's q/k/v have biases: the bias of a matrix is not the matrix (it was read over it once)
    qwen = wrap(tiny_model("qwen2", scale=4), tiny_tokenizer())
    ckpt = checkpoint.read(qwen, write_gguf(unwrap(qwen), qwen.tokenizer, tmp_path / "q.gguf", "Q8_0"))
    hf = unwrap(qwen)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert torch.equal(ckpt.weights.tensors[name].dequantize(), round_trip(hf.get_submodule(name).weight, "Q8_0"))
    assert ckpt.changed == [] and ckpt.avg_bits == 8.5


def test_the_fast_header_reader_gives_gguf_s_own_fields_and_tensors(tmp_path):
    import gguf

    from qdiag.quant.gguf_file import _Reader

    path = tmp_path / "fields.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_token_list(["a", "ßé", "", "日本", "x" * 300])  # strings of every length, empty, multi-byte
    writer.add_token_types([1, 3, 1, 6, 2])
    writer.add_array("test.floats", [0.5, -2.0, 1e-30])
    writer.add_array("test.bools", [True, False])
    writer.add_array("test.empty", [])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_string("test.string", "plain")
    writer.add_uint64("test.u64", 2**40)
    writer.add_tensor("blk.0.w", np.arange(64, dtype=np.float32).reshape(2, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    theirs, ours = gguf.GGUFReader(path), _Reader(path)
    assert list(ours.fields) == list(theirs.fields)
    for key, a in theirs.fields.items():
        b = ours.fields[key]
        assert (b.offset, b.data, b.types, b.contents()) == (a.offset, a.data, a.types, a.contents()), key
        assert len(b.parts) == len(a.parts), key
        assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a.parts, b.parts)), key
    assert ours.data_offset == theirs.data_offset
    assert [(t.name, t.data_offset, t.n_bytes) for t in ours.tensors] == [(t.name, t.data_offset, t.n_bytes)
                                                                         for t in theirs.tensors]
    assert np.array_equal(ours.tensors[0].data, theirs.tensors[0].data)
