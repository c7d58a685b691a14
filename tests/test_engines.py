"""The engines' menus and the prescription written as their own inputs: llama-quantize's arguments
(read as llama-quantize reads them, and run dry where it is built), GPTQModel's dynamic regexes,
an llm-compressor recipe that names every module once."""

import re
import subprocess

import pytest
import yaml

from qdiag.quant import engines, llama_cpp

T = {f"model.layers.{i}.{m}.weight": engines.Tensor(f"model.layers.{i}.{m}.weight", f"blk.{i}.{g}.weight", r, c)
     for i in range(3) for m, g, r, c in (("self_attn.v_proj", "attn_v", 256, 512), ("mlp.down_proj", "ffn_down", 512,
                                                                                      1024))}
T["model.embed_tokens.weight"] = engines.Tensor("model.embed_tokens.weight", "token_embd.weight", 1000, 512,
                                                "embedding", "embedding")


def test_the_llama_cpp_menu_holds_what_the_file_will_hold():
    wide = engines.menu("llama.cpp", engines.Tensor("w", "blk.0.ffn_down.weight", 4096, 14336))
    assert set(wide) == {"Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0", "F16"}
    assert wide["Q4_K"] == 4096 * 14336 * 144 // 256
    narrow = engines.menu("llama.cpp", engines.Tensor("w", "blk.0.attn_q.weight", 576, 576))
    assert set(narrow) == {"Q4_0", "Q5_0", "Q5_1", "Q8_0", "F16"}  # the k-quants' fallbacks, as llama-quantize writes
    assert "IQ2_XXS" in engines.menu("llama.cpp", engines.Tensor("w", "x", 256, 512), imatrix=True)
    g = engines.menu("gptqmodel", engines.Tensor("w", "x", 256, 512), group_size=128)
    assert set(g) == {"w2", "w3", "w4", "w8"} and g["w4"] == round((4 + 20 / 128) * 256 * 512 / 8)
    assert engines.menu("gptqmodel", T["model.embed_tokens.weight"]) == {}
    with pytest.raises(ValueError, match="unknown engine"):
        engines.menu("tgi", T["model.embed_tokens.weight"])


def allocation():
    a = {p: "Q4_K" for p in T}
    a["model.layers.0.self_attn.v_proj.weight"] = "Q6_K"
    a["model.layers.2.self_attn.v_proj.weight"] = "Q6_K"
    a["model.layers.1.mlp.down_proj.weight"] = "Q5_K"
    a["model.embed_tokens.weight"] = "Q8_0"
    return a


def test_the_llama_quantize_arguments_ask_for_each_tensors_type():
    a = allocation()
    cmd = engines.llama_quantize_command(a, T, "base.gguf", "out.gguf", imatrix="im.gguf")
    assert cmd[0] == "llama-quantize" and cmd[-3:] == ["base.gguf", "out.gguf", "Q4_K"] and "--pure" in cmd
    assert cmd[cmd.index("--imatrix") + 1] == "im.gguf" and cmd[cmd.index("--token-embedding-type") + 1] == "q8_0"
    asked = engines.types_written(cmd, [t.file_name for t in T.values() if t.role == "matrix"], "Q4_K")
    assert asked == {T[p].file_name: k for p, k in a.items() if T[p].role == "matrix"}
    for pattern, _ in engines.parse_tensor_types(cmd):  # anchored: blk.1 never matches blk.11
        assert not pattern.search("blk.10.attn_v.weight") and not pattern.search("blk.0.attn_v.weight.bias")
    with pytest.raises(ValueError, match="malformed"):
        engines.parse_tensor_types(["--tensor-type", "attn_v"])
    with pytest.raises(ValueError, match="unknown GGUF type"):
        engines.parse_tensor_types(["--tensor-type", "attn_v=q9_k"])


TOOLS = llama_cpp.find()


@pytest.mark.skipif(TOOLS is None, reason="llama.cpp's tools are not built: python benchmarks/llama_cpp_build.py")
def test_llama_quantize_itself_takes_the_arguments(tmp_path):
    from qdiag import fixtures

    f32 = fixtures.llama_cpp_files("tiny", TOOLS, types=())["F32"]
    tensors = {f"l{i}.{g}": engines.Tensor(f"l{i}.{g}", f"blk.{i}.{g}.weight", 256, 256) for i in range(2)
               for g in ("attn_q", "attn_k", "attn_v", "attn_output")}
    a = {p: "Q4_K" for p in tensors} | {"l0.attn_v": "Q6_K", "l1.attn_q": "Q2_K"}
    cmd = engines.llama_quantize_command(a, tensors, str(f32), str(tmp_path / "o.gguf"))
    out = subprocess.run([str(TOOLS / "llama-quantize"), *cmd[1:]], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    from gguf import GGUFReader

    got = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "o.gguf").tensors}
    assert got["blk.0.attn_v.weight"] == "Q6_K" and got["blk.1.attn_q.weight"] == "Q2_K"
    assert got["blk.0.attn_q.weight"] == "Q4_K" and got["blk.1.ffn_down.weight"] == "Q4_K"  # --pure: the default


def test_gptqmodels_dynamic_config_gives_each_module_its_width():
    a = {p: "w4" for p in T if T[p].role == "matrix"}
    a["model.layers.1.self_attn.v_proj.weight"] = "w8"
    a["model.layers.2.mlp.down_proj.weight"] = "w3"
    cfg = engines.gptqmodel_config(a, T, group_size=128)
    assert cfg["bits"] == 4 and cfg["group_size"] == 128 and len(cfg["dynamic"]) == 2
    for pattern in cfg["dynamic"]:
        re.compile(pattern.removeprefix("+:"))
    for p, k in a.items():
        assert engines.dynamic_bits(cfg, p.removesuffix(".weight")) == int(k[1:])
    assert engines.dynamic_bits(cfg, "model.layers.1.self_attn.v_proj_extra") == 4  # whole names only


def test_the_llm_compressor_recipe_names_every_module_once():
    a = {p: "w4" for p in T if T[p].role == "matrix"}
    a["model.layers.0.mlp.down_proj.weight"] = "w8"
    recipe = engines.compressor_recipe(a, T, group_size=128)
    again = yaml.safe_load(yaml.safe_dump(recipe))
    modules = [p.removesuffix(".weight") for p in a]
    engines.check_recipe(again, modules)
    groups = again["quant_stage"]["quant_modifiers"]["GPTQModifier"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [4, 8]
    assert again["quant_stage"]["quant_modifiers"]["GPTQModifier"]["ignore"] == ["lm_head"]
    with pytest.raises(ValueError, match="in no group"):
        engines.check_recipe(again, modules + ["model.layers.9.mlp.up_proj"])
    groups["group_0"]["targets"].append("re:.*")
    with pytest.raises(ValueError, match="in both"):
        engines.check_recipe(again, modules)
