"""Read-outs: turn a hidden state into logits the way the model's own head does, and read the
answer's probability and rank from logits. Every analysis and building block reads answers here.

``project`` applies the final norm (unless ``final_norm=False``) and the unembedding, and the
soft-capping of families that cap their logits (gemma2/3), so the last layer's read-out equals
the model's output.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..core.arch import resolve, unwrap

# An answer within the top 5 is "present" (the paper's "rank drop" keeps it there); one ranked in
# the thousands has "collapsed".
TOP_K = 5
COLLAPSE_RANK = 1000


def project(model: nn.Module, hidden: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
    """Logits of ``hidden (..., d_model)`` as if it were the last layer's output: ``(..., vocab)``
    in float32, on the unembedding's device (``hidden`` is moved there, in the model's dtype)."""
    hf = unwrap(model)
    arch = resolve(hf)
    unembed = hf.get_submodule(arch.unembed)
    hidden = hidden.to(unembed.weight.device, unembed.weight.dtype)
    h = hf.get_submodule(arch.final_norm)(hidden) if final_norm else hidden
    logits = unembed(h).float()
    cap = getattr(getattr(hf.config, "text_config", None) or hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def last_logits(hf: nn.Module, inputs: dict) -> torch.Tensor:
    """The model's logits at the last position, ``(batch, vocab)`` in float32, with the head run
    at that position only where the family's forward allows (``logits_to_keep``): a large
    vocabulary's logits at every position are most of a short prompt's memory."""
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}
    return hf(**inputs, **kwargs, use_cache=False).logits[:, -1].float()


def prob_and_rank(logits: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability and rank (1 = top) of ``answer (...)`` under ``logits (..., vocab)``."""
    logits = logits.float()
    target = logits.gather(-1, answer.to(logits.device)[..., None])
    rank = 1 + (logits > target).sum(-1)
    prob = torch.softmax(logits, -1).gather(-1, answer.to(logits.device)[..., None])[..., 0]
    return prob, rank


def answer_prob(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """``logits (..., batch, vocab)`` -> probability of each prompt's ``answer (batch,)``,
    ``(..., batch)`` on the CPU; leading dimensions (variants of a sweep) broadcast."""
    p = torch.softmax(logits.float(), -1)
    return p.gather(-1, answer.to(p.device).expand(*p.shape[:-1])[..., None])[..., 0].cpu()
