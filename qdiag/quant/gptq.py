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
         order: str = "natural", graphs: bool | None = None) -> QTensor:
    """Quantize ``w`` (out, in) against the input second moment ``H`` (in, in).

    Groups are contiguous in the original column order, so the stored layout never depends on
    ``order``. With ``order="act"`` the group parameters are fixed up front from ``w`` ("static
    groups"); otherwise each group's are found when GPTQ reaches it, from its error-corrected
    columns. ``graphs`` (default: on a CUDA device) replays each block's column loop as a CUDA graph:
    the loop is some ten small kernels per column, so on a GPU launching them is most of the time.
    """
    spec.check(w.shape[1])
    W = w.detach().clone().float()
    H = H.detach().float()
    out, cols = W.shape
    gs = spec.group_size
    G = n_groups(cols, gs)

    diag = torch.diag(H).clone()
    dead = diag == 0
    diag[dead] = 1
    W[:, dead] = 0

    static = order == "act" or gs is None
    scale = torch.zeros(out, G, device=W.device)
    zero = torch.zeros(out, G, device=W.device)
    if static:
        scale, zero = minmax_params(grouped(W, gs), spec.bits, spec.sym)

    perm = column_order(diag, gs, order)
    # one working copy of H (permuted, or cloned), factored and let go: H is the largest thing here
    if perm is not None:
        W, H, dead = W[:, perm], H.index_select(0, perm).index_select(1, perm), dead[perm]
    else:
        H = H.clone()
    H[dead, dead] = 1
    group_of = perm if perm is not None else torch.arange(cols, device=W.device)
    group_of = torch.zeros_like(group_of) if gs is None else group_of // gs

    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    del H
    Hinv = torch.cholesky_inverse(L)
    del L
    Hinv = torch.linalg.cholesky(Hinv, upper=True)

    graphs = W.is_cuda if graphs is None else graphs
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        n = i2 - i1
        # columns of this block where a group starts (its parameters are found there, not fixed up front)
        starts = () if static else tuple(i for i in range(n) if (i1 + i) % gs == 0)
        groups = group_of[i1:i2]
        S1, Z1 = scale[:, groups], zero[:, groups]  # per column; groups begun in an earlier block are set
        block = _Block(W[:, i1:i2], Hinv[i1:i2, i1:i2], S1, Z1, W[:, i2:], starts, gs, spec)
        fits = all(min(i1 + i + gs, cols) <= i2 for i in starts)  # no group runs past the block
        if graphs and fits:
            _GRAPHS.run(block)
        else:
            block.run()
        for i in starts:
            scale[:, groups[i]], zero[:, groups[i]] = block.S1[:, i], block.Z1[:, i]
        Q[:, i1:i2] = block.Q1
        W[:, i1:i2] = block.W1
        W[:, i2:] -= block.Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return QTensor.from_codes(Q, scale, zero, spec.bits, gs)


class _Block:
    """One block of GPTQ's column loop: the block's columns ``W1``, its corner of the inverse
    Hessian's Cholesky factor, per-column scales and zero points (filled in where a group starts),
    and the codes and scaled errors it produces. ``rest``: the columns after the block, which a
    group that starts in it but runs past its end reads its parameters from."""

    def __init__(self, W1, Hinv1, S1, Z1, rest, starts: tuple, gs: int | None, spec: QuantSpec) -> None:
        self.W1, self.Hinv1, self.S1, self.Z1, self.rest = W1.clone(), Hinv1, S1, Z1, rest
        self.d = Hinv1.diagonal().clone()
        self.Q1 = torch.zeros_like(self.W1)
        self.Err1 = torch.zeros_like(self.W1)
        self.starts, self.gs, self.spec = starts, gs, spec
        self.key = (tuple(self.W1.shape), self.W1.device, starts, gs, spec.bits, spec.sym)

    def run(self) -> None:
        # the loop runs on the block transposed, a column to a contiguous row, and writes into
        # preallocated rows: on a CPU it is op-bound, and this is some 40% faster than column views
        maxq = 2**self.spec.bits - 1
        W, S, Z = self.W1.t().contiguous(), self.S1.t().contiguous(), self.Z1.t().contiguous()
        Q, E = torch.empty_like(W), torch.empty_like(W)
        for i in range(W.shape[0]):
            if i in self.starts:
                window = W[i : i + self.gs]
                if window.shape[0] < self.gs and self.rest.shape[1]:
                    window = torch.cat((W[i:], self.rest.t()), dim=0)[: self.gs]
                s, z = minmax_params(window.t(), self.spec.bits, self.spec.sym)
                S[i:] = s  # until the next start overwrites the columns after it
                Z[i:] = z
            w, s, z, q, e = W[i], S[i], Z[i], Q[i], E[i]
            quantize(w, s, z, maxq, out=q)
            torch.sub(w, dequantize(q, s, z, out=e), out=e)
            e.div_(self.d[i])
            W[i:].addr_(self.Hinv1[i, i:], e, alpha=-1)
        for name, value in (("W1", W), ("S1", S), ("Z1", Z), ("Q1", Q), ("Err1", E)):
            getattr(self, name).copy_(value.t())  # in place: a captured CUDA graph writes its static buffers


class _GraphCache:
    """One captured CUDA graph of ``_Block.run`` per block shape and group layout, replayed on
    static copies of each block's inputs (blocks of one matrix, and matrices of one shape in
    every layer, share it)."""

    def __init__(self) -> None:
        self.graphs: dict = {}

    def run(self, block: _Block) -> None:
        device = block.W1.device  # a sharded model's layers sit on several cards: a graph per card
        with torch.cuda.device(device):
            entry = self.graphs.get((device, block.key))
            if entry is None:
                entry = self.graphs[(device, block.key)] = self._capture(block)
            graph, static = entry
            for name in ("W1", "Hinv1", "d", "S1", "Z1"):
                getattr(static, name).copy_(getattr(block, name))
            graph.replay()
        for name in ("W1", "S1", "Z1", "Q1", "Err1"):
            setattr(block, name, getattr(static, name).clone())

    @staticmethod
    def _capture(block: _Block):
        static = _Block(block.W1, block.Hinv1.clone(), block.S1.clone(), block.Z1.clone(),
                        block.rest[:, :0], block.starts, block.gs, block.spec)
        side = torch.cuda.Stream(block.W1.device)
        side.wait_stream(torch.cuda.current_stream(block.W1.device))
        with torch.cuda.stream(side):
            static.run()  # a warm-up run before capture, as CUDA graphs need
        torch.cuda.current_stream(block.W1.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # on this card's own stream: torch's default capture stream sits on the first card it was used on
        with torch.cuda.graph(graph, stream=side):
            static.run()
        return graph, static


_GRAPHS = _GraphCache()


def release_graphs() -> None:
    """Let go of the captured graphs and their buffers (after quantizing a whole model)."""
    _GRAPHS.graphs.clear()


def reconstruction_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """The layer-output error GPTQ minimises: ``tr((W - Ŵ) H (W - Ŵ)^T)``, i.e. ||WX - ŴX||² / n."""
    d = (w - w_hat).float()
    return float(torch.einsum("oi,ij,oj->", d, H.float(), d))
