"""Quantized checkpoint folders in the Hugging Face layout (GPTQ, AWQ, llm-compressor's
compressed-tensors ``pack-quantized``) read against their base model: packed weights unpacked by
``packed`` at each forward, everything else compared with the base. ``checkpoint.read`` is the entry
point."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.arch import resolve, unwrap, weight_matrix
from . import packed
from .swap import QuantizedWeights


def read_folder(model: nn.Module, path: Path, progress: bool = False) -> dict:
    """The fields of a ``Checkpoint`` read from a GPTQ, AWQ or compressed-tensors folder (Hugging Face
    layout: config.json, *.safetensors)."""
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
    h.update(inspect.getsource(packed).encode() + inspect.getsource(read_folder).encode())
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
    tensor_types = {f"{n}.weight": label for n in linear}
    tensor_types.update({k: str(v.dtype).removeprefix("torch.").upper() for k, v in stored.items()
                         if k not in done and k in params})
    weights = QuantizedWeights({}, tensors, 0.0, key=h.hexdigest(), extras=extras)
    return {"weights": weights, "types": {label: total}, "avg_bits": storage / total, "changed": changed,
            "ignored": ignored, "format": fmt, "nominal": (bits, group), "tensor_types": tensor_types,
            "file_names": {k: k for k in tensor_types}}


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
