"""The logit lens (analysis 2 of the paper): read each layer's residual stream at the last token
through the model's own final norm and unembedding, and ask how likely the correct answer already
is there.

``final_norm=True`` (the default, and the paper's choice) applies the final norm before the
unembedding, so the last layer's lens equals the model's output; ``False`` unembeds the raw
residual stream, whose scale grows with depth, so early layers look flatter than they are.
Families that soft-cap their logits (gemma2/3) are soft-capped here too.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import Arch, resolve, unwrap
from .trace import collect


def project(model: nn.Module, hidden: torch.Tensor, final_norm: bool = True, arch: Arch | None = None) -> torch.Tensor:
    """Logits of ``hidden (..., d_model)`` as if it were the last layer's output: ``(..., vocab)``."""
    hf = unwrap(model)
    arch = arch or resolve(hf)
    h = hf.get_submodule(arch.final_norm)(hidden) if final_norm else hidden
    logits = hf.get_submodule(arch.unembed)(h).float()
    cap = getattr(getattr(hf.config, "text_config", None) or hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def prob_and_rank(logits: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability and rank (1 = top) of ``answer`` under ``logits (..., vocab)``; ``answer (...)``."""
    target = logits.gather(-1, answer[..., None])
    rank = 1 + (logits > target).sum(-1)
    prob = torch.softmax(logits, -1).gather(-1, answer[..., None])[..., 0]
    return prob, rank


@torch.no_grad()
def logit_lens(model, batch: dict, answer: torch.Tensor, final_norm: bool = True,
               arch: Arch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability and rank of each prompt's ``answer`` token at every layer, read at the last
    token: two ``(batch, layers)`` tensors."""
    arch = arch or resolve(model)
    last = torch.full((batch["input_ids"].shape[0], 1), batch["input_ids"].shape[1] - 1)
    resid = collect(model, batch, ("resid",), arch=arch, tokens=last)["resid"]
    dtype = next(unwrap(model).parameters()).dtype
    device = next(unwrap(model).parameters()).device
    probs, ranks = [], []
    for h in resid:
        logits = project(model, h[:, 0].to(device, dtype), final_norm, arch)
        p, r = prob_and_rank(logits, answer.to(device))
        probs.append(p.cpu())
        ranks.append(r.cpu())
    return torch.stack(probs, 1), torch.stack(ranks, 1)
