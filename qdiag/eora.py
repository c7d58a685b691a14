"""EoRA-style low-rank compensation of quantization error (a training-free repair).

For each matrix, the quantization error ``E = W - Q`` is projected on the eigenspace of its
calibration inputs (``X^T X = U L U^T``), the rank-r SVD of ``E U L^1/2`` is taken and mapped back,
giving ``B A`` that minimises ``||(E - B A) X||``; the model then runs with ``Q + B A``. B and A are
stored at 16 bits and counted in the average bits. At full rank ``Q + B A = W``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from .arch import Arch, resolve, unwrap, weight_matrix
from .plan import Plan
from .quantize import QTensor, QuantSpec, bits_per_weight
from .swap import QuantizedWeights


@dataclass
class LowRank:
    """A quantized matrix plus a low-rank correction: de-quantizes to ``Q + B A``."""

    base: QTensor
    B: torch.Tensor  # (out, r)
    A: torch.Tensor  # (r, in)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        base = self.base.dequantize(torch.float32)
        return (base + (self.B.float() @ self.A.float()).to(base.device)).to(dtype)

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + (self.B.numel() + self.A.numel()) * 2  # stored at 16 bits


def eora_factors(error: torch.Tensor, H: torch.Tensor, rank: int, eps: float = 1e-6,
                 eig: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``B (out, r)``, ``A (r, in)`` with ``B A`` the best rank-r fit of ``error (out, in)`` in the
    norm weighted by the input second moment ``H = X^T X / n``; full rank returns ``error``.
    ``eig``: ``torch.linalg.eigh(H.double())`` when already computed (matrices sharing an input)."""
    evals, U = eig if eig is not None else torch.linalg.eigh(H.double())
    evals = evals.clamp_min(eps * float(evals.max().clamp_min(eps)))
    s = evals.sqrt()
    projected = error.double() @ U * s  # E U L^1/2
    Uu, S, Vh = torch.linalg.svd(projected, full_matrices=False)
    r = min(rank, S.numel())
    B = Uu[:, :r] * S[:r]
    A = (Vh[:r] / s) @ U.t()  # V^T L^-1/2 U^T
    return B.float(), A.float()


def eora(model: nn.Module, qw: QuantizedWeights, moments: dict[str, torch.Tensor], rank: int) -> QuantizedWeights:
    """``qw`` with every matrix that has an input moment corrected by a rank-``rank`` EoRA term."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    hf = unwrap(model)
    tensors = dict(qw.tensors)
    # q/k/v (and gate/up) read the same input and come one after another: one eigh for each input
    last_key, eig = None, None
    for name, q in qw.tensors.items():
        if name not in moments:
            continue
        w = weight_matrix(hf.get_submodule(name)).detach().float()
        H = moments[name]
        key = hashlib.blake2b(H.cpu().contiguous().numpy().tobytes(), digest_size=16).digest()
        if key != last_key:
            last_key, eig = key, torch.linalg.eigh(H.to(w.device).double())
        B, A = eora_factors(w - q.dequantize(torch.float32).to(w.device), H.to(w.device), rank, eig=eig)
        tensors[name] = LowRank(q, B, A)
    return QuantizedWeights(qw.plan, tensors, qw.seconds)


def eora_avg_bits(model: nn.Module, plan: Plan, rank: int, arch: Arch | None = None) -> float:
    """Average bits of a plan plus 16-bit rank-r factors on every planned matrix."""
    arch = arch or resolve(model)
    hf = unwrap(model)
    total_bits = total = 0.0
    for name in arch.linear_names():
        out, cols = weight_matrix(hf.get_submodule(name)).shape
        spec = plan.get(name, QuantSpec(16))
        extra = 16 * min(rank, out, cols) * (out + cols) if name in plan and not spec.is_full_precision else 0
        total_bits += bits_per_weight(spec, cols) * out * cols + extra
        total += out * cols
    return total_bits / total


def input_moments_for(model: nn.Module, plan: Plan, calib: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Input second moments of a plan's matrices, computed once per shared input (q/k/v, gate/up)."""
    from .calibrate import input_moments

    if calib is None:
        raise ValueError("EoRA needs calibration tokens (its eigenspace comes from calibration inputs)")
    return input_moments(model, list(plan), calib)
