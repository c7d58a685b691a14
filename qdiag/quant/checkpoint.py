"""A quantized checkpoint someone else made (a llama.cpp GGUF file; a GPTQ, AWQ or compressed-tensors
folder), read into the swap of its full-precision base model: the checkpoint's matrices stay packed
and de-quantize at each forward, exactly as qdiag's own quantizations do, so one copy of the base
weights is held.

    ckpt = read(model, "model.Q2_K.gguf")    # checked against the base before anything else
    with ckpt.weights.applied(model):
        ...                                  # the model as the checkpoint has it

The checkpoint is checked against the base first: architecture, layer count, vocabulary and every
tensor's shape; a mismatch raises and names what differs. Parameters the checkpoint holds outside
the decoder's matrices (embeddings, the unembedding, norms) are compared with the base's; those
that differ are swapped in too and listed in ``changed``, because then the weight-space difference
is not the quantization error of the decoder's matrices alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..core.arch import resolve, unwrap, weight_matrix
from . import format_check, gguf
from .gguf_file import read_gguf
from .hf_checkpoint import read_folder
from .swap import QuantizedWeights


@dataclass
class Checkpoint:
    """An existing checkpoint read against its base: the weights to swap in and what they are."""

    path: str
    weights: QuantizedWeights
    types: dict[str, int]  # storage type (a GGUF type, or "GPTQ w4 g128") -> decoder weights stored in it
    avg_bits: float  # storage bits per weight of the decoder's matrices, scales included
    changed: list[str] = field(default_factory=list)  # parameters outside them that differ from the base
    ignored: list[str] = field(default_factory=list)  # checkpoint tensors the base has no place for
    format: str = "gguf"  # gguf, gptq or awq
    nominal: tuple[int, int | None] | None = None  # (bits, group size) of a GPTQ / AWQ checkpoint
    tensor_types: dict[str, str] = field(default_factory=dict)  # base parameter -> its storage type in the file
    file_names: dict[str, str] = field(default_factory=dict)  # base parameter -> its tensor's name in the file
    format_report: object = None  # format_check.check's table: which differences are not quantization

    @property
    def main_type(self) -> str:
        """The type holding most of the decoder's weights (``Q4_K`` for a ``Q4_K_M`` file)."""
        return max(self.types, key=self.types.get)

    @property
    def method(self) -> str:
        return f"gguf-{self.main_type}" if self.format == "gguf" else f"{self.format}-ckpt"

    @property
    def bits(self) -> int:
        return gguf.nominal_bits(self.main_type) if self.format == "gguf" else self.nominal[0]

    @property
    def group_size(self) -> int | None:
        return gguf.block_size(self.main_type) if self.format == "gguf" else self.nominal[1]

    def avg_bits_of(self, model: nn.Module, names) -> float:
        """Average storage bits per decoder weight with only the named matrices taken from the
        checkpoint (the others at 16 bits): what a scope of the sensitivity sweep costs."""
        hf, total_bits, total = unwrap(model), 0.0, 0
        for name in resolve(model).linear_names():
            n = weight_matrix(hf.get_submodule(name)).numel()
            total_bits += self.weights.tensors[name].nbytes * 8 if name in names else 16 * n
            total += n
        return total_bits / total

    def describe(self) -> str:
        """One paragraph for logs and reports: the file, its types, and what else it changes."""
        total = sum(self.types.values())
        types = ", ".join(f"{t} {n / total:.0%}" for t, n in sorted(self.types.items(), key=lambda kv: -kv[1]))
        text = (f"{Path(self.path).name}: decoder matrices in {types}, {self.avg_bits:.2f} bits per weight "
                f"(scales included).")
        if self.changed:
            text += (f" It also changes {len(self.changed)} parameters outside the decoder's matrices "
                     f"({', '.join(self.changed[:4])}{', ...' if len(self.changed) > 4 else ''}), swapped in too: "
                     "the weight-space error is then not the quantization error alone.")
        return text


def is_hub_id(name: str) -> bool:
    """``org/name`` (a checkpoint folder on the Hugging Face hub) or ``org/name/file.gguf``."""
    parts = str(name).split("/")
    return not Path(name).exists() and not str(name).startswith((".", "/", "~")) and len(parts) in (2, 3)


def locate(name: str | os.PathLike) -> Path:
    """A local checkpoint path; a hub id is downloaded first (the safetensors, configs and
    tokenizer of a folder, or the one GGUF file named). Raises if neither exists."""
    path = Path(name)
    if path.exists():
        return path
    if not is_hub_id(str(name)):
        raise FileNotFoundError(f"no checkpoint at {name}")
    from huggingface_hub import hf_hub_download, snapshot_download

    parts = str(name).split("/")
    try:
        if len(parts) == 3:
            return Path(hf_hub_download("/".join(parts[:2]), parts[2]))
        return Path(snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as err:  # offline, unknown repository, gated: one message that says what to do
        raise FileNotFoundError(f"no checkpoint at {name}, and the Hugging Face hub could not provide it "
                                f"({type(err).__name__}); download it and pass the local path") from None


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A GGUF file, or a folder whose config.json has a ``quantization_config``."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    config = path / "config.json"
    return config.exists() and "quantization_config" in json.loads(config.read_text())


def read(model: nn.Module, path: str | os.PathLike, progress: bool = False) -> Checkpoint:
    """Read a checkpoint of ``model`` (a GGUF file; a GPTQ, AWQ or compressed-tensors folder in the
    Hugging Face layout; or a hub id of either) into swappable weights; raises, before any
    de-quantization, when it does not fit the base (naming what differs)."""
    path = locate(path)
    if not is_checkpoint(path):
        raise ValueError(f"{path} is neither a GGUF file (.gguf) nor a folder whose config.json has a "
                         "quantization_config (a GPTQ, AWQ or compressed-tensors checkpoint)")
    ckpt = Checkpoint(str(path), **(read_folder if path.is_dir() else read_gguf)(model, path, progress))
    ckpt.format_report = format_check.check(model, ckpt)
    format_check.refuse_other_model(ckpt.format_report, len(resolve(model).linear_names()))
    return ckpt
