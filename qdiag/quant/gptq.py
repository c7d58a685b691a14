"""GPTQ (Frantar et al., 2023): quantize a matrix column by column, pushing each column's error
onto the columns not yet quantized through the inverse Hessian of the layer's inputs.

``gptq`` works on one matrix given ``H = X^T X / n``; the layer-by-layer calibration driver that
collects ``H`` lives in ``qdiag.calibrate``.
"""

from __future__ import annotations

import torch

from .quantize import QTensor, QuantSpec, dequantize, grouped, minmax_params, n_groups, quantize

ORDERS = ("natural", "act", "group")


def column_order(diag: torch.Tensor, group_size: int | None, order: str) -> torch.Tensor | None:
    """The order GPTQ visits columns in; None for the natural order.

    ``act``: all columns by decreasing ``diag(H)`` (act-order). ``group``: group-aware reordering
    as in GPTQModel: full groups by their largest ``diag(H)``, columns within a group by
    ``diag(H)``, a ragged last group kept last, so every group stays contiguous in visiting order.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown GPTQ column order {order!r}; choose one of {', '.join(ORDERS)}")
    if order == "natural" or (order == "group" and group_size is None):
        return None
    if order == "act":
        return torch.argsort(diag, descending=True)
    n_full = diag.numel() // group_size
    full = diag[: n_full * group_size].view(n_full, group_size)
    local = torch.argsort(full, dim=1, descending=True, stable=True)
    groups = torch.argsort(full.amax(dim=1), descending=True, stable=True)
    starts = torch.arange(n_full, device=diag.device)[:, None] * group_size
    perm = (local + starts)[groups].reshape(-1)
    tail = torch.arange(n_full * group_size, diag.numel(), device=diag.device)
    return torch.cat((perm, tail))


def gptq(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, damp: float = 0.01, block_size: int = 128,
         order: str = "natural") -> QTensor:
    """Quantize ``w`` (out, in) against the input second moment ``H`` (in, in).

    Groups are contiguous in the original column order, so the stored layout never depends on
    ``order``. With ``order="act"`` the group parameters are fixed up front from ``w`` ("static
    groups"); otherwise each group's are found when GPTQ reaches it, from its error-corrected
    columns.
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

    static = order == "act" or gs is None
    scale = torch.zeros(out, G, device=W.device)
    zero = torch.zeros(out, G, device=W.device)
    if static:
        scale, zero = minmax_params(grouped(W, gs), spec.bits, spec.sym)

    perm = column_order(torch.diag(H), gs, order)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    group_of = (perm if perm is not None else torch.arange(cols, device=W.device))
    group_of = [0] * cols if gs is None else (group_of // gs).tolist()  # a list: no tensor indexing per column

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
        d = Hinv1.diagonal().tolist()
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % gs == 0:
                # the group's current (already error-corrected) columns
                window = torch.cat((W1[:, i:], W[:, i2:]), dim=1)[:, :gs]
                g_new = group_of[col]  # visiting order keeps groups contiguous
                scale[:, g_new], zero[:, g_new] = minmax_params(window, spec.bits, spec.sym)
            g = group_of[col]
            if g != g_cur:
                s, z, g_cur = scale[:, g], zero[:, g], g
            w_col = W1[:, i]
            q = quantize(w_col, s, z, maxq)
            Q1[:, i] = q
            err = (w_col - dequantize(q, s, z)) / d[i]
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
