"""HQQ, half-quadratic quantization (Badri and Shaji, 2023): calibration-free, min-max scales with
zero points fitted by a proximal solver that minimises the l_p norm (p = 0.7) of the weight error,
whose small p lets a few large errors stand so that most weights land closer.

A re-implementation of the ``hqq`` package's default solver (``optimize_weights_proximal_legacy``,
version 0.2.8): the same initialisation, shrinkage and early stop, in float32, and like it a fixed
beta (the paper grows beta by kappa = 1.01 each step; the package's default solver no longer does);
``benchmarks/hqq_parity.py`` compares the two. The zero point stays a float (16 bits in storage,
like the scale), so a group costs 32 bits on top of its codes.
"""

from __future__ import annotations

import torch

from .quantize import QTensor, QuantSpec, grouped, rtn

LP_NORM, BETA, ITERS = 0.7, 10.0, 20


def shrink(x: torch.Tensor, beta: float, p: float = LP_NORM) -> torch.Tensor:
    """The generalised soft threshold: the proximal step of ``|x|^p / beta``."""
    a = x.abs()
    return torch.sign(x) * (a - a.pow(p - 1) / beta).clamp_min(0)


def hqq(w: torch.Tensor, spec: QuantSpec) -> QTensor:
    """HQQ of an (out, in) matrix, group-wise along inputs, at ``spec.bits``."""
    spec.check(w.shape[1])
    maxq = 2**spec.bits - 1
    out, cols = w.shape
    wg = grouped(w.float(), spec.group_size)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    denom = hi - lo
    inv = torch.where(denom.abs() <= 1e-4, torch.ones_like(denom), maxq / denom).clamp(max=2e4)  # 1 / scale
    zero = -lo * inv
    best = float("inf")
    for _ in range(ITERS):
        q = torch.round(wg * inv + zero).clamp(0, maxq)
        r = (q - zero) / inv
        e = shrink(wg - r, BETA)
        zero = torch.mean(q - (wg - e) * inv, dim=-1, keepdim=True)
        error = float((wg - r).abs().mean())
        if error >= best:
            break
        best = error
    q = torch.round(wg * inv + zero).clamp(0, maxq).reshape(out, -1)[:, :cols]
    return QTensor.from_codes(q, (1 / inv).squeeze(-1), zero.squeeze(-1), spec.bits, spec.group_size)


def without_calibration(w: torch.Tensor, spec: QuantSpec):
    """A matrix quantized by a calibration-free method: HQQ, or round to nearest (min-max or a GGUF type)."""
    return hqq(w, spec) if spec.method == "hqq" else rtn(w, spec)
