"""qdiag's weight repairs applied to an existing checkpoint (a GGUF file, a GPTQ / AWQ folder), whose
matrices qdiag did not quantize and cannot re-quantize with the checkpoint's own quantizer.

- ``protect``: the chosen layers' matrices replaced by the base's weights at a higher width, in the
  checkpoint's family (``Q8_0`` for a GGUF file, round to nearest at the checkpoint's group size for
  GPTQ / AWQ), as a user would re-export them; the other matrices keep the checkpoint's codes.
- ``correct``: EoRA's low-rank compensation of each matrix's error against the base (``eora``).

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


def check(ckpt: Checkpoint) -> None:
    """Raise when the checkpoint cannot be repaired against its base (see the module's note)."""
    if ckpt.changed:
        raise ValueError(f"{ckpt.path} changes {len(ckpt.changed)} parameters outside its quantized matrices "
                         f"({', '.join(ckpt.changed[:3])}{', ...' if len(ckpt.changed) > 3 else ''}), as AWQ's folded "
                         "scales do: its matrices are not the base's weights quantized, so qdiag cannot repair them "
                         "against the base")
