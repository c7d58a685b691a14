"""GPTQ (Frantar et al., 2023): quantize a matrix column by column, pushing each column's error
onto the columns not yet quantized through the inverse Hessian of the layer's inputs.

``gptq`` works on one matrix given ``H = X^T X / n``; the layer-by-layer calibration driver that
collects ``H`` lives in ``qdiag.calibrate``.
"""

from __future__ import annotations

import torch

from .quantize import QTensor, QuantSpec, dequantize, grouped, minmax_params, n_groups, quantize


def gptq(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, damp: float = 0.01, block_size: int = 128,
         act_order: bool = False) -> QTensor:
    """Quantize ``w`` (out, in) against the input second moment ``H`` (in, in).

    Groups are contiguous in the original column order. With ``act_order`` the columns are visited
    in order of decreasing ``diag(H)`` and the group parameters are fixed up front from ``w``
    ("static groups"), so the stored layout is the same as without it.
    """
    spec.check(w.shape[1])
    W = w.detach().clone().float()
    H = H.detach().clone().float()
    out, cols = W.shape
    gs = spec.group_size
    G = n_groups(cols, gs)
    maxq = 2**spec.bits - 1

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = act_order or gs is None
    scale = torch.zeros(out, G, device=W.device)
    zero = torch.zeros(out, G, device=W.device)
    if static:
        scale, zero = minmax_params(grouped(W, gs), spec.bits, spec.sym)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    group_of = (perm if perm is not None else torch.arange(cols, device=W.device))
    group_of = torch.zeros_like(group_of) if gs is None else group_of // gs

    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W)
    g_cur = -1
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % gs == 0:
                # the group's current (already error-corrected) columns
                window = torch.cat((W1[:, i:], W[:, i2:]), dim=1)[:, :gs]
                scale[:, col // gs], zero[:, col // gs] = minmax_params(window, spec.bits, spec.sym)
            g = int(group_of[col])
            if g != g_cur:
                s, z, g_cur = scale[:, g], zero[:, g], g
            w_col = W1[:, i]
            q = quantize(w_col, s, z, maxq)
            Q1[:, i] = q
            err = (w_col - dequantize(q, s, z)) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return QTensor.from_codes(Q, scale, zero, spec.bits, gs)


def reconstruction_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """The layer-output error GPTQ minimises: ``tr((W - Ŵ) H (W - Ŵ)^T)``, i.e. ||WX - ŴX||² / n."""
    d = (w - w_hat).float()
    return float(torch.einsum("oi,ij,oj->", d, H.float(), d))
