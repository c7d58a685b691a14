"""GGUF files (llama.cpp's format) read against their base model: each tensor found by its name in
the gguf package's tensor map (as transformers maps them), llama.cpp's reordering of Llama's q and
k rows undone on the packed rows, every shape checked; decoder matrices kept packed.
``checkpoint.read`` is the entry point."""

from __future__ import annotations

import hashlib
import inspect
import mmap
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize as np_dequantize
from torch import nn
from tqdm.auto import tqdm

from ..core.arch import _is_conv1d, resolve, unwrap
from . import gguf
from .swap import QuantizedWeights


def read_gguf(model: nn.Module, path: Path, progress: bool = False) -> dict:
    """The fields of a ``Checkpoint`` read from the GGUF file at ``path``; raises, before any
    de-quantization, when it does not fit the base (naming what differs)."""
    try:
        reader = _Reader(path)
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
        # the family's layout changes (transformers' processor), found on the row numbers: llama.cpp
        # permutes Llama's q and k rows; a processor that changes values (Gemma's norms) is applied
        # to the tensor itself, one at a time, below
        rows = np.arange(shape[0]).reshape(-1, 1)
        result = processor.process(weights=rows, name=t.name, tensor_key_mapping=mapping, parsed_parameters=config)
        pname = mapping.get(result.name)
        if pname not in params:
            ignored.append(t.name)
            continue
        order = np.asarray(result.weights)
        reorder = order.shape == rows.shape and np.array_equal(np.sort(order[:, 0]), rows[:, 0])
        found[pname] = (t, shape, order[:, 0].astype(np.int64) if reorder else None, result.name)
    _check_shapes(params, found, modules)

    arch = resolve(model)
    linear = set(arch.linear_names())
    tensors, extras, changed, types = {}, {}, [], Counter()
    tensor_types, file_names = {}, {}
    h = hashlib.blake2b(digest_size=16)
    h.update(inspect.getsource(gguf).encode() + inspect.getsource(read_gguf).encode())
    for pname, (t, shape, order, name) in tqdm(found.items(), desc="checkpoint", disable=not progress):
        owner, _, leaf = pname.rpartition(".")
        module, base = modules[owner], params[pname]
        tensor_types[pname], file_names[pname] = t.tensor_type.name, t.name
        h.update(repr((pname, t.tensor_type.name, shape)).encode())
        h.update(np.ascontiguousarray(t.data))  # the file's bytes, hashed where they lie (no copy)
        if owner in linear and leaf == "weight":
            types[t.tensor_type.name] += int(np.prod(shape))
        conv = _is_conv1d(module)
        identity = order is not None and np.array_equal(order, np.arange(shape[0]))
        packed = len(shape) == 2 and t.tensor_type not in gguf.FLOAT_TYPES
        if packed and order is not None and not conv:
            data = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(shape[0], -1))
            if not identity:
                data = data[torch.from_numpy(order)]
            q = gguf.GGUFTensor(data.to(base.device), int(t.tensor_type), shape[1])
        else:
            value = np_dequantize(t.data, t.tensor_type).reshape(shape)
            if order is None:  # a processor that does more than reorder rows
                value = processor.process(weights=value, name=name, tensor_key_mapping=mapping,
                                          parsed_parameters=config).weights
            elif not identity:
                value = value[order]
            value = np.asarray(value, dtype=np.float32)
            w = torch.from_numpy(value if value.flags.writeable else value.copy()).reshape(base.shape)
            q = _Dense((w.t() if conv else w).to(base.device)) if leaf == "weight" and w.dim() == 2 else None
        _drop_pages(reader, t)
        if owner in linear and leaf == "weight":
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
    return {"weights": weights, "types": dict(types), "avg_bits": avg, "changed": changed, "ignored": ignored,
            "tensor_types": tensor_types, "file_names": file_names}


class _Reader(GGUFReader):
    """gguf's reader, with long arrays (a vocabulary, its merges and token types: some 150,000 items)
    cut from the file's bytes in one pass, not through several memory-map views per item: the same
    fields, parts and tensors, the default model's header read in ~0.2 s instead of 3-5 s."""

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        item = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        kind = GGUFValueType(int(item[0]))
        raw = self.data.view(np.ndarray)  # slices of a plain array, not of the memmap subclass
        offs, n = orig_offs + 12, int(count[0])
        if n == 0:
            return super()._get_field_parts(orig_offs, raw_type)
        if kind in self.gguf_scalar_to_np:
            dtype = np.dtype(self.gguf_scalar_to_np[kind])
            values = raw[offs : offs + n * dtype.itemsize].view(dtype)
            parts = [item, count, *(values[i : i + 1] for i in range(n))]
            return 12 + n * dtype.itemsize, parts, list(range(2, n + 2)), [GGUFValueType.ARRAY, kind]
        if kind != GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        parts, data = [item, count], []
        for _ in range(n):
            (size,) = struct.unpack_from("=Q", raw, offs)
            parts += (raw[offs : offs + 8].view(np.uint64), raw[offs + 8 : offs + 8 + size])
            data.append(len(parts) - 1)
            offs += 8 + size
        return offs - orig_offs, parts, data, [GGUFValueType.ARRAY, GGUFValueType.STRING]


def _drop_pages(reader: GGUFReader, t) -> None:
    """Unmap the file's pages of tensor ``t`` once it is copied out, so that reading a file holds
    one tensor of it in memory at a time, not the whole mapped file (they are read again from the
    file if touched). Where the platform cannot, the pages stay until the reader is dropped."""
    buf = getattr(reader.data, "_mmap", None)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if buf is None or advice is None:
        return
    start = t.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(t.data_offset + t.n_bytes, len(buf))
    try:
        buf.madvise(advice, start, end - start)
    except (OSError, ValueError):
        pass


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
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    arch = _field(reader, "general.architecture")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=hf.config.to_dict())
    return processor, {g: p for p, g in tensor_names(hf, processor).items()}


def tensor_names(model: nn.Module, processor=None) -> dict[str, str]:
    """``{base parameter: its tensor's name in a GGUF file}`` as llama.cpp's converter names them
    (the gguf package's tensor map), for a model with or without a file."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    hf = unwrap(model)
    model_type = _GGUF_NAMES.get(hf.config.model_type, hf.config.model_type)
    key = next((k for k, v in MODEL_ARCH_NAMES.items() if v == model_type), None)
    if key is None:
        raise ValueError(f"the gguf package knows no GGUF architecture for the base's type {hf.config.model_type!r}")
    names = get_tensor_name_map(key, resolve(hf).n_layers)
    out: dict[str, str] = {}
    seen: set[str] = set()
    for hf_name in hf.state_dict():
        name = processor.preprocess_name(hf_name) if processor is not None else hf_name
        stem, _, suffix = name.rpartition(".") if name.endswith((".weight", ".bias")) else (name, "", "")
        parts = stem.split(".")
        for k in range(len(parts)):  # the name, then without its leading module names
            gguf_name = names.get_name(".".join(parts[k:]))
            if gguf_name is not None:
                full = gguf_name + ("." + suffix if suffix else "")
                if full not in seen:  # the first parameter of a name keeps it (a tied head maps to the embedding)
                    seen.add(full)
                    out[hf_name] = full
                break
    return out


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
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(min(len(tokens), len(tokenizer))) if i not in special]
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


