"""qdiag's weight repairs applied to an existing checkpoint (a GGUF file, a GPTQ / AWQ folder), whose
matrices qdiag did not quantize and cannot re-quantize with the checkpoint's own quantizer.

- ``protect``: the chosen layers' matrices replaced by the base's weights at a higher width, in the
  checkpoint's family (``Q8_0`` for a GGUF file, round to nearest at the checkpoint's group size for
  GPTQ / AWQ), as a user would re-export them; the other matrices keep the checkpoint's codes.
- ``correct``: EoRA's low-rank compensation of each matrix's error against the base (``eora``).
- ``restore``: tensors that are not quantization damage (the format check's) or that the checkpoint
  changes outside its matrices, taken from the base again: in the file's own type where qdiag can
  write it (llama.cpp's quantizer where its tools are built), else as the base's values.

Each returns the repaired weights and their average storage bits per decoder weight (the
checkpoint's real storage, scales included, plus what the repair adds). A checkpoint that changed
parameters outside its matrices (AWQ folds scales into norms) cannot be repaired this way: its
matrices are not the base's weights quantized, so neither their error nor a replacement from the
base means what it should; that is refused, saying why.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..core.arch import resolve, unwrap, weight_matrix
from .checkpoint import Checkpoint
from .eora import eora
from .hqq import without_calibration
from .quantize import QuantSpec, bits_per_weight
from .swap import QuantizedWeights


def protect(model: nn.Module, ckpt: Checkpoint, names: Sequence[str], bits: int = 8) -> tuple[QuantizedWeights, float]:
    """The checkpoint with the matrices ``names`` at ``bits`` (see the module's note), and its average bits."""
    check(ckpt)
    spec = QuantSpec.gguf("q8_0" if bits == 8 else f"q{bits}_0") if ckpt.format == "gguf" else \
        QuantSpec(bits, ckpt.group_size, True, "rtn")
    hf = unwrap(model)
    tensors = dict(ckpt.weights.tensors)
    high = {}
    for name in names:
        if name in tensors:
            w = weight_matrix(hf.get_submodule(name)).detach()
            tensors[name] = without_calibration(w, spec)
            high[name] = bits_per_weight(spec, w.shape[1])
    return QuantizedWeights({}, tensors, extras=ckpt.weights.extras), storage_bits(model, ckpt, high)


def correct(model: nn.Module, ckpt: Checkpoint, calib: torch.Tensor,
            ranks: Sequence[int]) -> dict[int, tuple[QuantizedWeights, float]]:
    """For each rank r, the checkpoint with every matrix corrected by a rank-r EoRA term, and its
    average bits (one calibration pass and one factorization per matrix serve every rank)."""
    check(ckpt)
    return {r: (qw, storage_bits(model, ckpt, rank=r)) for r, qw in eora(model, ckpt.weights, calib, ranks).items()}


def storage_bits(model: nn.Module, ckpt: Checkpoint, high: dict[str, float] | None = None, rank: int = 0) -> float:
    """Average storage bits per decoder weight: the checkpoint's own (its bytes) except the matrices
    in ``high`` (name -> bits per weight), plus 16-bit rank-``rank`` factors on each stored matrix."""
    hf, high = unwrap(model), high or {}
    total_bits, total = 0.0, 0
    for name in resolve(model).linear_names():
        out, cols = weight_matrix(hf.get_submodule(name)).shape
        if name in high:
            total_bits += high[name] * out * cols
        elif name in ckpt.weights.tensors:
            total_bits += ckpt.weights.tensors[name].nbytes * 8 + 16 * min(rank, out, cols) * (out + cols)
        else:
            total_bits += 16 * out * cols
        total += out * cols
    return total_bits / total


def restore(model: nn.Module, ckpt: Checkpoint, file_names: Sequence[str]) -> Checkpoint:
    """A copy of the checkpoint with the tensors named (by their names in the file) re-exported
    from the base (see the module's note): in the file's type where the format check found the
    tensor is not its rounding, at ``Q8_0`` where it is (that type is what lost the answers);
    what it no longer changes leaves ``changed``."""
    import dataclasses

    from . import gguf, llama_cpp

    by_file = {v: k for k, v in ckpt.file_names.items()}
    unknown = [n for n in file_names if n not in by_file]
    if unknown:
        raise ValueError(f"the checkpoint has no tensors {', '.join(unknown[:3])}")
    hf = unwrap(model)
    tools = llama_cpp.find()
    tensors, extras = dict(ckpt.weights.tensors), dict(ckpt.weights.extras)
    report = ckpt.format_report
    verdicts = dict(zip(report.parameter, report.verdict)) if report is not None else {}
    restored = set()
    for name in file_names:
        pname = by_file[name]
        owner = pname.rpartition(".")[0]
        kind = ckpt.tensor_types.get(pname, "F32").upper()
        if verdicts.get(pname) == "quantization" and kind not in ("F32", "F16", "BF16", "Q8_0"):
            kind = "Q8_0"
        extras.pop(pname, None)
        old = ckpt.weights.tensors.get(owner)
        if old is not None:
            module = hf.get_submodule(owner)
            w = weight_matrix(module).detach() if owner in resolve(model).linear_names() else module.weight.detach()
            new = None  # the base's own values
            if kind not in ("F32", "F16", "BF16") and ckpt.format == "gguf":
                if tools is not None and w.shape[1] % gguf.block_size(kind) == 0:
                    new = llama_cpp.quantize(w, kind, tools)
                elif kind.lower() in gguf.TYPES:
                    new = gguf.quantize_matrix(w, kind)
            for o in [o for o, q in ckpt.weights.tensors.items() if q is old]:  # a tied head shares the table
                if new is None:
                    tensors.pop(o, None)
                else:
                    tensors[o] = new
        restored.add(pname)
    weights = QuantizedWeights({}, tensors, ckpt.weights.seconds, key=None, extras=extras)
    report = ckpt.format_report
    if report is not None:  # what was restored is the base's again
        report = report.copy()
        report.loc[report.parameter.isin(restored), ["verdict", "ratio"]] = ["restored from the base", 1.0]
    return dataclasses.replace(ckpt, weights=weights, changed=[c for c in ckpt.changed if c not in restored],
                               format_report=report)


def blocking(ckpt: Checkpoint) -> list[str]:
    """The parameters outside the decoder's matrices that the checkpoint changes other than by
    rounding them in its format (a quantized token embedding or head is the base's, rounded)."""
    report = ckpt.format_report
    verdicts = dict(zip(report.parameter, report.verdict)) if report is not None else {}
    return [c for c in ckpt.changed
            if c.rpartition(".")[0] not in ckpt.weights.tensors or verdicts.get(c) != "quantization"]


def check(ckpt: Checkpoint) -> None:
    """Raise when the checkpoint cannot be repaired against its base (see the module's note)."""
    changed = blocking(ckpt)
    if changed:
        raise ValueError(f"{ckpt.path} changes {len(changed)} parameters outside its quantized matrices "
                         f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}), as AWQ's folded "
                         "scales do: its matrices are not the base's weights quantized, so qdiag cannot repair them "
                         "against the base")
