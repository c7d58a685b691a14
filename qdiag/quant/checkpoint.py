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

import hashlib
import inspect
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as np_dequantize
from torch import nn
from tqdm.auto import tqdm

from ..core.arch import _is_conv1d, resolve, unwrap, weight_matrix
from . import gguf, packed
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
    if path.is_dir():
        return _read_packed(model, path, progress)
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a GGUF file qdiag can read ({e}); pass a GGUF file written by llama.cpp "
                         "or the gguf package, or a GPTQ / AWQ / compressed-tensors folder") from e
    hf = unwrap(model)
    processor, mapping = _mapping(hf, reader)
    _check_base(hf, model.tokenizer, reader)
    params = dict(hf.named_parameters(remove_duplicate=False))
    modules = dict(hf.named_modules())
    config = {"config": hf.config.to_dict()}
    found, ignored = {}, []
    for t in reader.tensors:
        shape = tuple(reversed([int(n) for n in t.shape]))
        packed = len(shape) == 2 and t.tensor_type not in gguf.FLOAT_TYPES
        # the family's layout changes (transformers' processor): on row numbers for a packed matrix
        # (llama.cpp permutes Llama's q and k rows), else on the de-quantized values
        source = np.arange(shape[0]).reshape(-1, 1) if packed else np_dequantize(t.data, t.tensor_type)
        result = processor.process(weights=source, name=t.name, tensor_key_mapping=mapping, parsed_parameters=config)
        pname = mapping.get(result.name)
        if pname not in params:
            ignored.append(t.name)
            continue
        found[pname] = (t, shape, np.asarray(result.weights), packed)
    _check_shapes(params, found, modules)

    arch = resolve(model)
    linear = set(arch.linear_names())
    tensors, extras, changed, types = {}, {}, [], Counter()
    h = hashlib.blake2b(digest_size=16)
    h.update(inspect.getsource(gguf).encode() + inspect.getsource(read).encode())
    for pname, (t, shape, value, packed) in tqdm(found.items(), desc="checkpoint", disable=not progress):
        owner, _, leaf = pname.rpartition(".")
        module, base = modules[owner], params[pname]
        h.update(repr((pname, t.tensor_type.name, shape)).encode() + np.ascontiguousarray(t.data).tobytes())
        if owner in linear:
            types[t.tensor_type.name] += int(np.prod(shape))
        conv = _is_conv1d(module)
        if packed and value.shape == (shape[0], 1) and not conv:
            data = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(shape[0], -1))
            if not np.array_equal(value[:, 0], np.arange(shape[0])):
                data = data[torch.from_numpy(value[:, 0].astype(np.int64))]
            q = gguf.GGUFTensor(data.to(base.device), int(t.tensor_type), shape[1])
        else:
            if packed:  # a processor that does more than reorder rows: de-quantize it whole
                value = processor.process(weights=np_dequantize(t.data, t.tensor_type), name=t.name,
                                          tensor_key_mapping=mapping, parsed_parameters=config).weights
            w = torch.from_numpy(np.array(value, dtype=np.float32)).reshape(base.shape)
            q = _Dense((w.t() if conv else w).to(base.device)) if leaf == "weight" and w.dim() == 2 else None
        if owner in linear:
            tensors[owner] = q  # the quantization itself: always swapped in
            continue
        now = q.dequantize(torch.float32) if q is not None else w
        now = now.t() if q is not None and conv else now
        if torch.equal(now.reshape(base.shape).to(base.device, base.dtype), base.detach()):
            continue  # the checkpoint keeps the base's value
        changed.append(pname)
        if q is not None:
            tensors[owner] = q
        else:
            extras[pname] = w.to(base.device)
    _tie(hf, params, found, tensors)
    avg = sum(gguf.bits_per_weight(t) * n for t, n in types.items()) / max(sum(types.values()), 1)
    if not types:
        raise ValueError(f"{path.name} holds none of the decoder's weight matrices of this {arch.family} model")
    plan = {}  # not a qdiag plan: the checkpoint's own types, described by ``types``
    weights = QuantizedWeights(plan, tensors, 0.0, key=h.hexdigest(), extras=extras)
    return Checkpoint(str(path), weights, dict(types), avg, changed, ignored)


@dataclass
class _Dense:
    """A matrix the checkpoint stores in float, or whose layout qdiag must change after de-quantizing."""

    w: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.w.to(dtype)

    @property
    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()


def _mapping(hf: nn.Module, reader: GGUFReader):
    """transformers' processor for the file's architecture, and ``{GGUF tensor name: base parameter}``
    from the gguf package's tensor map (as transformers maps them, with the map built once)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    arch = _field(reader, "general.architecture")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=hf.config.to_dict())
    model_type = _GGUF_NAMES.get(hf.config.model_type, hf.config.model_type)
    key = next((k for k, v in MODEL_ARCH_NAMES.items() if v == model_type), None)
    if key is None:
        raise ValueError(f"the gguf package knows no GGUF architecture for the base's type {hf.config.model_type!r}")
    names = get_tensor_name_map(key, resolve(hf).n_layers)
    mapping = {}
    for hf_name in hf.state_dict():
        name = processor.preprocess_name(hf_name)
        stem, _, suffix = name.rpartition(".") if name.endswith((".weight", ".bias")) else (name, "", "")
        parts = stem.split(".")
        for k in range(len(parts)):  # the name, then without its leading module names
            gguf_name = names.get_name(".".join(parts[k:]))
            if gguf_name is not None:
                mapping.setdefault(gguf_name + ("." + suffix if suffix else ""), hf_name)
                break
    return processor, mapping


# transformers' model types whose GGUF architecture is spelled otherwise
_GGUF_NAMES = {"gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "cohere": "command-r",
               "gpt_oss": "gpt-oss", "minimax_m2": "minimax-m2", "gemma4_text": "gemma4", "umt5": "t5",
               "mistral": "llama", "gpt_neox": "gptneox"}


def _field(reader: GGUFReader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.contents()
    return value


def _check_base(hf: nn.Module, tokenizer, reader: GGUFReader) -> None:
    """The file's architecture, layer count and vocabulary against the base's."""
    from gguf import MODEL_ARCH_NAMES

    arch = _field(reader, "general.architecture")
    model_type = hf.config.model_type
    names = {v for v in MODEL_ARCH_NAMES.values()}
    expected = _GGUF_NAMES.get(model_type, model_type)
    if arch != expected and arch in names:
        raise ValueError(f"the checkpoint is a {arch!r} model but the base (--model) is {model_type!r}: "
                         "pass the base the checkpoint was quantized from")
    blocks = _field(reader, f"{arch}.block_count")
    n_layers = resolve(hf).n_layers
    if blocks is not None and int(blocks) != n_layers:
        raise ValueError(f"the checkpoint has {blocks} layers, the base {n_layers}: "
                         "pass the base it was quantized from")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    rows = hf.get_input_embeddings().weight.shape[0]
    if tokens is not None and len(tokens) != rows:
        raise ValueError(f"the checkpoint's vocabulary has {len(tokens)} tokens, the base's embedding {rows}: "
                         "pass the base the checkpoint was quantized from")
    if tokens is not None and tokenizer is not None:
        # token strings of every id the tokenizer has (converters pad the rest, e.g. [PAD151700]);
        # special tokens may be spelled differently and are not compared
        ids = [i for i in range(min(len(tokens), len(tokenizer))) if i not in set(tokenizer.all_special_ids)]
        ours = tokenizer.convert_ids_to_tokens(ids)
        diff = next((i for i, b in zip(ids, ours) if tokens[i] != b), None)
        if diff is not None:
            raise ValueError(f"the checkpoint's token {diff} is {tokens[diff]!r}, the base tokenizer's "
                             f"{ours[ids.index(diff)]!r}: the vocabularies differ; pass the base the checkpoint "
                             "was quantized from")


def _check_shapes(params: dict, found: dict, modules: dict) -> None:
    def fits(p: str, shape: tuple) -> bool:
        if _is_conv1d(modules[p.rpartition(".")[0]]):
            return int(np.prod(shape)) == params[p].numel()
        return shape == tuple(params[p].shape)

    bad = [f"{p}: checkpoint {shape}, base {tuple(params[p].shape)}" for p, (_, shape, _, _) in found.items()
           if not fits(p, shape)]
    if bad:
        raise ValueError(f"{len(bad)} tensors of the checkpoint do not fit the base ({'; '.join(bad[:3])}): "
                         "pass the base the checkpoint was quantized from")
    tied = {id(v) for k, v in params.items() if k in found}
    missing = [p for p, v in params.items() if p not in found and id(v) not in tied]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} of the base's parameters ({', '.join(missing[:3])}): "
                         "it is not a checkpoint of this model")


def _tie(hf: nn.Module, params: dict, found: dict, tensors: dict) -> None:
    """A parameter shared by two modules (tied embedding and unembedding) is swapped in both."""
    by_id: dict[int, list[str]] = {}
    for name, p in params.items():
        by_id.setdefault(id(p), []).append(name.rpartition(".")[0])
    for owners in by_id.values():
        have = [o for o in owners if o in tensors]
        for o in owners:
            if have and o not in tensors:
                tensors[o] = tensors[have[0]]


def quantized_types() -> list[str]:
    """Every GGUF type this reader de-quantizes (those the gguf package can)."""
    return [t.name for t in GGMLQuantizationType if t not in gguf.FLOAT_TYPES and t.name in _DEQUANTIZABLE]


_DEQUANTIZABLE = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0",
                  "TQ2_0", "MXFP4", "NVFP4", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M",
                  "IQ4_NL", "IQ4_XS", "BF16"}


def _read_packed(model: nn.Module, path: Path, progress: bool = False) -> Checkpoint:
    """A GPTQ or AWQ checkpoint folder (Hugging Face layout: config.json, *.safetensors)."""
    from safetensors import safe_open

    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    fmt = str(qc.get("quant_method", "")).lower()
    if fmt not in ("gptq", "awq", "compressed-tensors"):
        raise ValueError(f"{path.name}: quant_method {fmt!r} is not read yet; qdiag reads GPTQ, AWQ and "
                         "compressed-tensors (pack-quantized) checkpoints, and GGUF files")
    if fmt == "compressed-tensors":
        qc = _compressed_scheme(qc, path)
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    packed.check_bits(bits)
    if fmt == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"{path.name}: AWQ version {qc.get('version')!r}; qdiag reads the GEMM layout")
    hf = unwrap(model)
    arch = resolve(hf)
    _check_config(hf, model.tokenizer, config, path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    stored: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                stored[key] = handle.get_tensor(key)
    params = dict(hf.named_parameters(remove_duplicate=False))
    linear = arch.linear_names()
    packed_key = "weight_packed" if fmt == "compressed-tensors" else "qweight"
    missing = [n for n in linear if f"{n}.{packed_key}" not in stored]
    if missing:
        raise ValueError(f"{path.name} has no packed weights for {len(missing)} of the base's matrices "
                         f"({', '.join(missing[:3])}): it is not a checkpoint of this model")
    group = qc.get("group_size", qc.get("q_group_size", 128))
    group = None if group in (None, -1) else int(group)
    offset = 0 if str(qc.get("checkpoint_format", "gptq")).lower() == "gptq_v2" else 1
    h = hashlib.blake2b(digest_size=16)
    h.update(inspect.getsource(packed).encode() + inspect.getsource(_read_packed).encode())
    tensors, storage, total = {}, 0, 0
    for name in tqdm(linear, desc="checkpoint", disable=not progress):
        base = params[f"{name}.weight"]
        out, n_in = weight_matrix(hf.get_submodule(name)).shape
        parts = {k: stored[f"{name}.{k}"].to(base.device) for k in PACKED_PARTS if f"{name}.{k}" in stored}
        for t in parts.values():
            h.update(t.cpu().numpy().tobytes())
        if fmt == "compressed-tensors":
            q = packed.CompressedTensor(parts["weight_packed"], parts["weight_scale"], bits, n_in, group,
                                        parts.get("weight_zero_point"), parts.get("weight_g_idx"))
            shape = (parts["weight_scale"].shape[0], int(parts["weight_shape"][1]))
        elif fmt == "gptq":
            g_idx = parts.get("g_idx")
            if g_idx is None:
                g_idx = torch.arange(n_in, device=base.device) // (group or n_in)
            q = packed.GPTQTensor(parts["qweight"], parts["qzeros"], parts["scales"], g_idx.int(), bits, offset)
            shape = (parts["scales"].shape[1], g_idx.shape[0])
        else:
            q = packed.AWQTensor(parts["qweight"], parts["qzeros"], parts["scales"], group or n_in, bits)
            shape = (parts["scales"].shape[1], parts["qweight"].shape[0])
        if shape != (out, n_in):
            raise ValueError(f"{name}: the checkpoint's matrix is {shape}, the base's {(out, n_in)}: pass the base the "
                             "checkpoint was quantized from")
        tensors[name] = q
        storage += q.nbytes * 8
        total += out * n_in
    extras, changed, ignored = {}, [], []
    done = {f"{n}.{k}" for n in linear for k in PACKED_PARTS}
    for key, value in stored.items():
        if key in done:
            continue
        if key not in params:
            ignored.append(key)
            continue
        base = params[key]
        if tuple(value.shape) != tuple(base.shape):
            raise ValueError(f"{key}: the checkpoint's is {tuple(value.shape)}, the base's {tuple(base.shape)}")
        h.update(key.encode() + value.float().cpu().numpy().tobytes())
        if not torch.equal(value.to(base.device, base.dtype), base.detach()):
            changed.append(key)
            extras[key] = value.to(base.device)
    fmt = {"compressed-tensors": "ct"}.get(fmt, fmt)
    label = f"{fmt.upper()} w{bits} {'channel' if group is None else f'g{group}'}"
    weights = QuantizedWeights({}, tensors, 0.0, key=h.hexdigest(), extras=extras)
    return Checkpoint(str(path), weights, {label: total}, storage / total, changed, ignored, fmt, (bits, group))


PACKED_PARTS = ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale", "weight_zero_point",
                "weight_g_idx", "weight_shape")


def _compressed_scheme(qc: dict, path: Path) -> dict:
    """The one integer weight scheme of a compressed-tensors config, as ``bits`` / ``group_size``."""
    if qc.get("format") != "pack-quantized":
        raise ValueError(f"{path.name}: compressed-tensors format {qc.get('format')!r} is not read yet; qdiag reads "
                         "pack-quantized (integer weights, float activations)")
    schemes = [g.get("weights") or {} for g in qc.get("config_groups", {}).values()]
    if len(schemes) != 1 or schemes[0].get("type", "int") != "int" or schemes[0].get("strategy") not in (
            "group", "channel"):
        raise ValueError(f"{path.name}: qdiag reads compressed-tensors checkpoints with one integer weight scheme "
                         f"by group or channel, not {schemes}")
    w = schemes[0]
    group = w.get("group_size") if w["strategy"] == "group" else None
    return {"bits": w["num_bits"], "group_size": group}


def _check_config(hf: nn.Module, tokenizer, config: dict, path: Path) -> None:
    """A Hugging Face checkpoint's model type, layer count, vocabulary size and tokenizer against the base's."""
    ours = hf.config
    for key, what in (("model_type", "model type"), ("num_hidden_layers", "layer count"),
                      ("hidden_size", "hidden size"), ("vocab_size", "vocabulary size")):
        if key in config and config[key] != getattr(ours, key, config[key]):
            raise ValueError(f"the checkpoint's {what} is {config[key]!r}, the base's {getattr(ours, key)!r}: "
                             "pass the base the checkpoint was quantized from")
    if tokenizer is not None and (path / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        theirs = AutoTokenizer.from_pretrained(path).get_vocab()
        mine = tokenizer.get_vocab()
        if theirs != mine:
            diff = sorted(set(theirs.items()) ^ set(mine.items()), key=lambda kv: kv[1])[:1]
            raise ValueError(f"the checkpoint's tokenizer differs from the base's (first difference: {diff}): "
                             "pass the base the checkpoint was quantized from")
