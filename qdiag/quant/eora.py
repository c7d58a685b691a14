"""EoRA-style low-rank compensation of quantization error (a training-free repair).

For each matrix, the quantization error ``E = W - Q`` is weighted by a square root of its
calibration inputs' second moment (EoRA uses the eigendecomposition ``X^T X = U L U^T`` and
``U L^1/2``; any ``M`` with ``M M^T = X^T X`` gives the same optimum, and the Cholesky factor costs a
small share of an eigendecomposition), the rank-r SVD of ``E M`` is taken and mapped back with
``M^-1``, giving ``B A`` that minimises ``||(E - B A) X||``; the model then runs with ``Q + B A``.
B and A are stored at 16 bits and counted in the average bits. At full rank ``Q + B A = W``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.arch import resolve, unwrap, weight_matrix
from .moments import moments_by_chunk
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


# Below this share of the matrix's smaller side, the leading singular vectors come from a randomized
# SVD (a few matrix products and one small QR) instead of a full one: at Llama-8B shapes the full
# float64 SVDs dominated the repair analysis. benchmarks/eora_speed.py measures the error it adds.
RANDOMIZED_BELOW = 0.25
OVERSAMPLE, POWER_ITERATIONS = 16, 4


def eora_factors(error: torch.Tensor, H: torch.Tensor, rank: int, eps: float = 1e-6,
                 root: torch.Tensor | None = None, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``B (out, r)``, ``A (r, in)`` with ``B A`` the best rank-r fit of ``error (out, in)`` in the
    norm weighted by the input second moment ``H = X^T X / n``; full rank returns ``error``.
    ``root``: ``weight_root(H)`` when already computed (matrices sharing an input).
    A small rank of a large matrix is fitted by a randomized SVD unless ``exact``."""
    B, A = _weighted_svd(error, H, eps, root, None if exact else rank)
    r = min(rank, B.shape[1])
    return B[:, :r].float(), A[:r].float()


def weight_root(H: torch.Tensor, eps: float = 1e-6, device: torch.device | str | None = None) -> torch.Tensor:
    """Lower-triangular ``M`` (float64, on ``device``, default ``H``'s) with ``M M^T = H + d I``: ``d``
    is ``eps`` times the mean of ``diag(H)``, raised tenfold until the factorization succeeds (inputs
    that never vary, or fewer calibration tokens than inputs, leave ``H`` singular)."""
    A = H.to(device or H.device, torch.float64, copy=True)  # one float64 copy, damped in place
    base = eps * float(A.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    added = 0.0
    for k in range(12):
        A.diagonal().add_(base * 10**k - added)
        added = base * 10**k
        M, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0 and bool(torch.isfinite(M).all()):  # a GPU's solver can succeed with NaN in its factor
            return M
        del M
    raise ValueError("the calibration inputs' second moment is not positive semi-definite (NaN or inf in them?)")


def _weighted_svd(error: torch.Tensor, H: torch.Tensor, eps: float = 1e-6, root: torch.Tensor | None = None,
                  rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # the factors of every rank up to ``rank`` (None: all) at once, best first: rank r is B[:, :r], A[:r]
    M = weight_root(H, eps) if root is None else root
    projected = error.double() @ M  # ||(E - B A) M||_F = ||(E - B A) X||_F / sqrt(n)
    if rank is not None and rank < RANDOMIZED_BELOW * min(projected.shape):
        q = min(rank + OVERSAMPLE, min(projected.shape))
        gen = torch.Generator(device=projected.device).manual_seed(0)  # the same factors on every run
        Uu, S, Vh = _randomized_svd(projected, q, POWER_ITERATIONS, gen)
    else:
        Uu, S, Vh = svd(projected)
    return Uu * S, torch.linalg.solve_triangular(M, Vh, upper=False, left=False)  # V^T M^-1


def _randomized_svd(M: torch.Tensor, q: int, iterations: int, gen: torch.Generator):
    """The ``q`` leading singular triplets of ``M`` by subspace iteration from a seeded Gaussian
    start (Halko, Martinsson and Tropp 2011, algorithm 4.4), re-orthonormalized at every step."""
    Y = M @ torch.randn(M.shape[1], q, dtype=M.dtype, device=M.device, generator=gen)
    Qm = torch.linalg.qr(Y).Q
    for _ in range(iterations):
        Qm = torch.linalg.qr(M.t() @ Qm).Q
        Qm = torch.linalg.qr(M @ Qm).Q
    small = Qm.t() @ M
    if not bool(torch.isfinite(small).all()):  # seen once on a GPU (its QR of a tiny error): the exact SVD
        return svd(M)
    u, S, Vh = svd(small)
    return Qm @ u, S, Vh


def svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of ``M``; where a GPU's solver fails to converge (cuSOLVER does on some
    ill-conditioned matrices that LAPACK handles), computed on the CPU and moved back."""
    try:
        return torch.linalg.svd(M, full_matrices=False)
    except torch.linalg.LinAlgError:
        if M.device.type == "cpu":
            raise
        return tuple(t.to(M.device) for t in torch.linalg.svd(M.cpu(), full_matrices=False))


def eora(model: nn.Module, qw: QuantizedWeights, calib: torch.Tensor | None, ranks: Sequence[int],
         batch_size: int = 8, budget_bytes: int | None = None) -> dict[int, QuantizedWeights]:
    """``qw`` with every quantized decoder matrix corrected by a rank-r EoRA term, for each r in ``ranks``.

    The input second moments come from ``calib`` a few layers at a time, so that at most
    ``budget_bytes`` of them are held (default: a quarter of the model's weight bytes, at least
    1 GiB); each group of layers costs one calibration pass. One SVD per matrix serves every rank.
    """
    if calib is None or calib.numel() == 0:
        raise ValueError("EoRA needs calibration tokens (its eigenspace comes from calibration inputs)")
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be at least 1, got {list(ranks)}")
    hf = unwrap(model)
    arch = resolve(hf)
    corrected: dict[int, dict] = {r: dict(qw.tensors) for r in ranks}
    names = [[n for n in arch.linear_names([layer]) if n in qw.tensors and not isinstance(qw.tensors[n], LowRank)]
             for layer in range(arch.n_layers)]
    for moments in moments_by_chunk(model, names, calib, batch_size, budget_bytes):
        _correct(hf, qw, moments, ranks, corrected)
    return {r: QuantizedWeights(qw.plan, corrected[r], qw.seconds, extras=qw.extras) for r in ranks}


def _correct(hf: nn.Module, qw: QuantizedWeights, moments: dict[str, torch.Tensor], ranks: Sequence[int],
             corrected: dict[int, dict]) -> None:
    # q/k/v (and gate/up) share one moment object (``input_moments``): one factorization for each input
    last, root = None, None
    for name, H in moments.items():
        w = weight_matrix(hf.get_submodule(name)).detach().float()
        if H is not last:
            last, root = H, None  # the previous factor goes before the next is made
            root = weight_root(H, device=w.device)
        q = qw.tensors[name]
        B, A = _weighted_svd(w - q.dequantize(torch.float32).to(w.device), H, root=root, rank=max(ranks))
        for r in ranks:
            k = min(r, B.shape[1])
            corrected[r][name] = LowRank(q, B[:, :k].float().contiguous(), A[:k].float().contiguous())


def eora_avg_bits(model: nn.Module, plan: Plan, rank: int) -> float:
    """Average bits of a plan plus 16-bit rank-r factors on every planned matrix."""
    arch = resolve(model)
    hf = unwrap(model)
    total_bits = total = 0.0
    for name in arch.linear_names():
        out, cols = weight_matrix(hf.get_submodule(name)).shape
        spec = plan.get(name, QuantSpec(16))
        extra = 16 * min(rank, out, cols) * (out + cols) if name in plan and not spec.is_full_precision else 0
        total_bits += bits_per_weight(spec, cols) * out * cols + extra
        total += out * cols
    return total_bits / total
