"""AWQ, activation-aware weight quantization (Lin et al., 2024), simulated like RTN and GPTQ.

Weights that meet large activations matter most. AWQ scales each input channel of a matrix by
``s = m^alpha`` (``m``: the channel's activation magnitude), quantizes ``W diag(s)`` and runs
``Q(W diag(s)) diag(s)^-1``, which a deployment gets for free by folding ``1/s`` into the
previous operation (a norm, or the matrix before). ``alpha`` is chosen on a grid of 20 per group
of matrices that read the same input (q, k and v share one scale, as do gate and up), and then
each group of weights is clipped to the shrink ratio (up to half its range, 20 steps) that
minimises the layer's output error, as in the AWQ paper and its reference code (q and k are not
clipped). Two differences from that code, both in what is measured: the activation magnitude
is the root mean square per channel (the reference uses the mean absolute value), and the error
minimised is each matrix's own output error ``tr(E H E^T)`` from the input second moment ``H``
that GPTQ and EoRA also use (the reference runs the whole attention or MLP block).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.arch import resolve, unwrap, weight_matrix
from .moments import moments_by_chunk
from .plan import Plan
from .quantize import QuantSpec, Scaled, grouped, minmax_params, quantize, rtn

GRID, CLIP_GRID, MAX_SHRINK = 20, 20, 0.5


def output_error(error: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``tr(E H E^T)``: the squared output error per token of a weight error ``E (out, in)`` on
    inputs with second moment ``H = X^T X / n``."""
    return ((error @ H) * error).sum()


def search_scale(ws: list[torch.Tensor], H: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """AWQ's per-input-channel scale ``s`` (in,) for matrices that read one input: the grid point
    ``alpha`` whose ``s = m^alpha`` (normalised) gives the least summed output error."""
    mag = H.diagonal().clamp_min(0).sqrt()
    best, best_s = float("inf"), torch.ones_like(mag)
    for i in range(GRID):
        s = mag.pow(i / GRID).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(float(output_error(rtn(w * s, spec).dequantize() / s - w, H)) for w in ws)
        if err < best:
            best, best_s = err, s
    return best_s


def clipped(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``w`` with each (row, group) clipped to ``[-r max|w|, r max|w|]`` for the shrink ratio r that
    minimises that group's share of the output error, ``e_g H_gg e_g^T``."""
    wg = grouped(w, spec.group_size)  # (out, G, g); a ragged last group is padded
    n_groups, g = wg.shape[1:]
    pad = n_groups * g - H.shape[0]
    Hp = torch.nn.functional.pad(H, (0, pad, 0, pad))  # padded columns weigh nothing
    blocks = torch.diagonal(Hp.reshape(n_groups, g, n_groups, g), dim1=0, dim2=2).permute(2, 0, 1)  # (G, g, g)
    top = wg.abs().amax(-1, keepdim=True)
    best_err = torch.full(wg.shape[:2], float("inf"), device=wg.device)
    best = wg
    for i in range(int(MAX_SHRINK * CLIP_GRID)):
        limit = top * (1 - i / CLIP_GRID)
        cur = wg.clamp(-limit, limit)
        e = _fake_quantize(cur, spec) - wg
        err = torch.einsum("ogi,gij,ogj->og", e, blocks, e)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(-1), cur, best)
    return best.reshape(w.shape[0], -1)[:, : w.shape[1]]


def _fake_quantize(wg: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    scale, zero = minmax_params(wg, spec.bits, spec.sym)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return scale * (quantize(wg, scale, zero, 2**spec.bits - 1) - zero)


def awq_group(ws: dict[str, torch.Tensor], H: torch.Tensor, plan: Plan, clip: set[str]) -> dict[str, Scaled]:
    """AWQ of matrices that read one input (a shared scale), each then clipped if named in ``clip``."""
    spec = plan[next(iter(ws))]
    s = search_scale(list(ws.values()), H, spec)
    Hs = H / s.unsqueeze(0) / s.unsqueeze(1)  # the scaled weights see inputs x / s
    out = {}
    for name, w in ws.items():
        scaled = w * s
        if name in clip:
            scaled = clipped(scaled, Hs, plan[name])
        out[name] = Scaled(rtn(scaled, plan[name]), s)
    return out


def awq(model: nn.Module, plan: Plan, calib: torch.Tensor, batch_size: int = 8, progress: bool = True,
        budget_bytes: int | None = None) -> dict[str, Scaled]:
    """AWQ of every matrix ``plan`` names, from the full-precision model's inputs on ``calib``."""
    if calib is None or calib.numel() == 0:
        raise ValueError("AWQ needs calibration token ids; pass calib=qdiag.data.calibration_tokens(...)")
    hf = unwrap(model)
    arch = resolve(hf)
    names = [[n for n in arch.linear_names([layer]) if n in plan] for layer in range(arch.n_layers)]
    clip = {n for types in arch.weights for t, n in types.items() if t not in ("q", "k", "qkv")}
    out: dict[str, Scaled] = {}
    bar = tqdm(total=sum(map(len, names)), desc="awq", disable=not progress)
    for moments in moments_by_chunk(model, names, calib, batch_size, budget_bytes):
        shared: dict[int, list[str]] = defaultdict(list)  # matrices that read one input share one H object
        for name, H in moments.items():
            shared[id(H)].append(name)
        for group in shared.values():
            ws = {n: weight_matrix(hf.get_submodule(n)).detach().float() for n in group}
            H = moments[group[0]].float().to(next(iter(ws.values())).device)
            specs = {plan[n] for n in group}
            parts = [dict(ws)] if len(specs) == 1 else [{n: ws[n]} for n in group]
            for part in parts:
                out.update(awq_group(part, H, plan, clip))
            bar.update(len(group))
    bar.close()
    return out
