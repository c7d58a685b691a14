"""Component and representation metrics (analyses 4 and 5 of the paper) as plain functions on
tensors. Shapes use these names throughout:

- ``attn``: attention probabilities ``(batch, head, query, key)``, rows summing to 1 over keys;
  causal, so query ``t`` sees keys ``0..t``.
- ``x``, ``y``: activations ``(n, d)``: n samples (tokens) by d features.
"""

from __future__ import annotations

import math

import torch

_EPS = 1e-12


def attention_entropy(attn: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Normalized entropy ``H(A_t) / log(n_t)`` per (batch, head, query), where ``n_t`` is the
    number of keys query t can see: ``t + 1`` under a causal mask by default, or ``visible``
    (broadcastable to ``(batch, head, query)``; pass it for left-padded batches and sliding
    windows). 1 is uniform over the visible keys, 0 is one-hot; a query that sees one key gets 0.
    Returns ``(batch, head, query)``."""
    p = attn.float().clamp_min(0)
    h = -(p * torch.log(p.clamp_min(_EPS))).sum(-1)
    if visible is None:
        visible = torch.arange(1, attn.shape[-2] + 1, device=attn.device)
    norm = torch.log(torch.as_tensor(visible, device=attn.device, dtype=torch.float32)).expand_as(h)
    return torch.where(norm > 0, h / norm.clamp_min(_EPS), torch.zeros_like(h))


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log, so at most log 2) between distributions over the
    last dimension; any leading shape."""
    p, q = p.float(), q.float()
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (torch.log(a.clamp_min(_EPS)) - torch.log(b.clamp_min(_EPS)))).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def sign_flips(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per row of ``(..., d)``, the share of entries whose sign differs; exact zeros count as positive."""
    return ((ref >= 0) != (other >= 0)).float().mean(-1)


def sign_flip_rate(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Share of entries whose sign differs (e.g. MLP gate pre-activations, FP vs quantized);
    exact zeros count as positive."""
    return float(((ref >= 0) != (other >= 0)).float().mean())


def topk_overlap(ref: torch.Tensor, other: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Per row of ``(..., d)``, the Jaccard overlap of the ``fraction`` most activated features (by
    value) of ``ref`` and of ``other``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = max(1, math.ceil(fraction * ref.shape[-1]))
    a = torch.zeros_like(ref, dtype=torch.bool).scatter_(-1, ref.topk(k, dim=-1).indices, True)
    b = torch.zeros_like(other, dtype=torch.bool).scatter_(-1, other.topk(k, dim=-1).indices, True)
    return (a & b).sum(-1).float() / (a | b).sum(-1).float()


def topk_jaccard(ref: torch.Tensor, other: torch.Tensor, fraction: float = 0.01) -> float:
    """Mean over rows (tokens) of the Jaccard overlap of the ``fraction`` most activated features
    (by value) of ``ref`` and of ``other``; both ``(n, d)``."""
    return float(topk_overlap(ref, other, fraction).mean())


def chance_jaccard(d: int, fraction: float = 0.01) -> float:
    """Expected Jaccard overlap of two independent random sets of ``ceil(fraction * d)`` of ``d``
    features: what ``topk_jaccard`` gives when the two rankings are unrelated."""
    k = max(1, math.ceil(fraction * d))
    inter = k * k / d  # hypergeometric mean of the intersection
    return inter / (2 * k - inter)


def cosines(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per row of ``(..., d)``, the cosine similarity of ``ref`` and ``other``."""
    return torch.nn.functional.cosine_similarity(ref.float(), other.float(), dim=-1, eps=_EPS)


def mean_cosine(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity of ``ref`` and ``other`` ``(n, d)``."""
    return float(cosines(ref, other).mean())


def uniform_like(attn: torch.Tensor) -> torch.Tensor:
    """Attention spread evenly over the keys ``attn`` can see (its nonzero entries: masked keys get
    exactly 0 after the softmax), same shape: what a head that no longer focuses computes."""
    support = (attn > 0).float()
    return support / support.sum(-1, keepdim=True).clamp_min(1)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) between ``x (n, d1)`` and ``y (n, d2)``, features
    centred over the n samples: ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    num = (y.t() @ x).norm() ** 2
    den = (x.t() @ x).norm() * (y.t() @ y).norm()
    return float(num / den) if den > 0 else float("nan")


def principal_directions(x: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k right singular vectors of ``x (n, d)`` centred over samples: ``(d, k)``. With more
    samples than features they are the top eigenvectors of the ``d x d`` scatter matrix, which is
    several times faster to decompose than ``x`` itself."""
    x = x.double() - x.double().mean(0)
    k = min(k, *x.shape)
    if x.shape[0] < x.shape[1]:
        return torch.linalg.svd(x, full_matrices=False).Vh[:k].t()
    return torch.linalg.eigh(x.t() @ x).eigenvectors[:, -k:].flip(-1)


def subspace_similarity(u: torch.Tensor, v: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the column spaces of orthonormal
    ``u (d, k)`` and ``v (d, k)``: ``(1/k) sum_i sigma_i(u^T v)^2``; 1 same space, 0 orthogonal."""
    s = torch.linalg.svdvals(u.double().t() @ v.double())
    return float((s**2).sum() / min(u.shape[1], v.shape[1]))


def activation_subspace_similarity(x: torch.Tensor, y: torch.Tensor, k: int = 50,
                                   x_dirs: torch.Tensor | None = None) -> float:
    """Subspace similarity of the top-k principal directions of two activation matrices
    (``x_dirs``: ``principal_directions(x, k)``, when already computed)."""
    u = principal_directions(x, k) if x_dirs is None else x_dirs
    return subspace_similarity(u, principal_directions(y, k))


def error_alignment(ref: torch.Tensor, other: torch.Tensor, k: int = 50,
                    ref_dirs: torch.Tensor | None = None) -> float:
    """How much of the error ``other - ref`` lies in ``ref``'s signal subspace: the subspace
    similarity of the error's top-k principal directions with ``ref``'s (``ref_dirs``, when already
    computed). About k/d for isotropic noise; near 1 when the error moves along the main features;
    0 when there is no error."""
    err = other.float() - ref.float()
    if not err.any():
        return 0.0
    return activation_subspace_similarity(ref, err, k, ref_dirs)


def cka_matrix(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """Linear CKA of every pair ``(xs[i], ys[j])``, all ``(n, d)`` over the same n samples:
    ``(len(xs), len(ys))``, equal to ``linear_cka`` pair by pair. Works through n x n Gram matrices
    or d x d cross-products, whichever costs fewer multiplications."""
    def centred(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return x - x.mean(0)

    n, d = xs[0].shape
    a, b = len(xs), len(ys)
    out = torch.empty(a, b, dtype=torch.float64)
    if (a + b) * n * n * d + a * b * n * n <= a * b * n * d * d + (a + b) * n * d * d:
        gx = [centred(x) @ centred(x).t() for x in xs]
        gy = [centred(y) @ centred(y).t() for y in ys]
        nx, ny = [g.norm() for g in gx], [g.norm() for g in gy]
        for i, gi in enumerate(gx):
            for j, gj in enumerate(gy):
                out[i, j] = (gi * gj).sum() / (nx[i] * ny[j])
    else:
        cx, cy = [centred(x) for x in xs], [centred(y) for y in ys]
        nx = [(c.t() @ c).norm() for c in cx]
        ny = [(c.t() @ c).norm() for c in cy]
        for i, ci in enumerate(cx):
            for j, cj in enumerate(cy):
                out[i, j] = (cj.t() @ ci).norm() ** 2 / (nx[i] * ny[j])
    return out
