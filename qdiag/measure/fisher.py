"""How much a weight's error costs the output, to second order: the Fisher information of the model's
own next-token distribution, kept as per-row and per-column factors for every weight matrix.

For a matrix ``W (out, in)`` of a linear map ``y = W x``, an error ``E`` changes the output
distribution by ``KL ~ 1/2 E[(g . E x)^2]`` per token, ``g`` the gradient of ``log p(token)`` at
``y`` with the token drawn from the model's own distribution (the Fisher's definition). With the
factorised approximation ``E[g_i^2 x_j^2] ~ E[g_i^2] E[x_j^2]`` (diagonal K-FAC, as HAWQ and FIT use
for bit allocation) that is

    damage(E) = 1/2 * sum_ij rows_i * cols_j * E_ij^2,   rows = E[g^2] (out,), cols = E[x^2] (in,)

so the cost of any quantization of ``W`` is one weighted sum, without running the model again. An
embedding table's rows are weighted by how often each token occurs and its columns by ``E[g^2]`` at
its output; a tied embedding adds its use as the output head.

    factors = fisher_factors(model, calib)          # {parameter name: [(rows, cols), ...]}
    damage(factors["model.layers.0.mlp.down_proj.weight"], E)
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.arch import _is_conv1d, resolve, unwrap

Factors = list[tuple[torch.Tensor, torch.Tensor]]  # (rows, cols) pairs of one parameter, float64 on the CPU


def fisher_factors(model: nn.Module, tokens: torch.Tensor, batch_size: int = 1, seed: int = 0,
                   progress: bool = False) -> dict[str, Factors]:
    """Per weight parameter of the decoder's matrices, the embedding and the output head, its
    Fisher factors on ``tokens (n, T)`` (calibration windows), means over tokens. One forward and
    one backward per batch; the model's weights are not touched and need no gradient."""
    hf = unwrap(model)
    arch = resolve(model)
    modules = dict(hf.named_modules())
    targets = {n: modules[n] for n in arch.linear_names()}
    head = hf.get_output_embeddings()
    embed = hf.get_input_embeddings()
    head_name = next(n for n, m in modules.items() if m is head)
    embed_name = next(n for n, m in modules.items() if m is embed)
    targets[head_name] = head
    rows = {n: torch.zeros(_shape(m)[0], dtype=torch.float64) for n, m in targets.items()}
    cols = {n: torch.zeros(_shape(m)[1], dtype=torch.float64) for n, m in targets.items()}
    freq = torch.zeros(embed.weight.shape[0], dtype=torch.float64)
    embed_cols = torch.zeros(embed.weight.shape[1], dtype=torch.float64)
    count = 0
    handles = []

    def watch(name: str):
        def hook(mod, args, out):
            x = args[0].detach()
            cols[name] += x.reshape(-1, x.shape[-1]).double().square().sum(0).cpu()
            if out.requires_grad:
                out.register_hook(lambda g: _accumulate(rows[name], g))
        return hook

    def embedded(mod, args, out):
        out = out.detach().requires_grad_(True)  # the graph starts here: gradients reach every activation
        out.register_hook(lambda g: _accumulate(embed_cols, g))
        return out

    for name, m in targets.items():
        handles.append(m.register_forward_hook(watch(name)))
    handles.append(embed.register_forward_hook(embedded))
    gen = torch.Generator().manual_seed(seed)
    device = next(hf.parameters()).device
    try:
        with torch.enable_grad():
            for start in tqdm(range(0, tokens.shape[0], batch_size), desc="fisher", disable=not progress,
                              leave=False):
                ids = tokens[start : start + batch_size].to(device)
                logits = hf(input_ids=ids, use_cache=False).logits[:, :-1].float()
                logp = torch.log_softmax(logits, -1)
                drawn = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]).cpu(), 1, generator=gen)
                picked = logp.reshape(-1, logp.shape[-1]).gather(-1, drawn.to(device)).sum()
                picked.backward()
                freq.index_add_(0, ids[:, :-1].reshape(-1).cpu(), torch.ones(ids[:, :-1].numel(), dtype=torch.float64))
                count += ids[:, :-1].numel()
    finally:
        for h in handles:
            h.remove()
    # the inputs counted every position; the gradients only those before the last: same count up to one a row
    n_in = tokens.shape[0] * tokens.shape[1]
    out: dict[str, Factors] = {}
    for name in targets:
        r, c = rows[name] / count, cols[name] / n_in
        out[f"{name}.weight"] = [(r, c)]
    embed_key = f"{embed_name}.weight"
    pair = (freq / count, embed_cols / count)
    if head.weight is embed.weight:  # tied: one table, used twice
        out[embed_key] = out.pop(f"{head_name}.weight") + [pair]
    else:
        out[embed_key] = [pair]
    return out


def _accumulate(total: torch.Tensor, g: torch.Tensor) -> None:
    """Add the squared gradient, summed over tokens, to ``total``; returns None (a hook that returned
    a tensor would replace the gradient)."""
    total.add_(g.reshape(-1, g.shape[-1]).double().square().sum(0).cpu())


def _shape(m: nn.Module) -> tuple[int, int]:
    w = m.weight
    return (w.shape[1], w.shape[0]) if _is_conv1d(m) else (w.shape[0], w.shape[1])


def damage(factors: Factors, error: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    """The second-order KL per token an error ``(out, in)`` of one parameter costs (module docstring).
    ``rows`` (indices): ``error`` holds only those rows of the parameter; the sum is over them."""
    e2 = error.detach().double().square().cpu()
    total = 0.0
    for r, c in factors:
        rr = r if rows is None else r[rows.cpu()]
        total += 0.5 * float(rr @ e2 @ c)
    return total


def sample_rows(factors: Factors, n_rows: int, k: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows to estimate ``damage`` from, and each one's weight: the ``k // 2`` rows of largest row
    factor exactly (weight 1), and ``k // 2`` spread evenly over the rest, each standing for its
    share of them; all rows (weight 1) when there are at most ``k``."""
    if n_rows <= k:
        idx = torch.arange(n_rows)
        return idx, torch.ones(n_rows, dtype=torch.float64)
    weight = sum(r for r, _ in factors)
    top = torch.topk(weight, k // 2).indices.sort().values
    rest = torch.ones(n_rows, dtype=torch.bool)
    rest[top] = False
    others = rest.nonzero().squeeze(1)
    spread = others[torch.linspace(0, others.numel() - 1, k - k // 2).round().long().unique()]
    idx = torch.cat([top, spread])
    w = torch.cat([torch.ones(top.numel(), dtype=torch.float64),
                   torch.full((spread.numel(),), others.numel() / spread.numel(), dtype=torch.float64)])
    order = idx.argsort()
    return idx[order], w[order]


def sampled_damage(factors: Factors, error_rows: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> float:
    """``damage`` of a whole parameter estimated from its rows ``idx`` (``sample_rows``)."""
    e2 = error_rows.detach().double().square().cpu()
    return sum(0.5 * float((r[idx] * weights) @ e2 @ c) for r, c in factors)

