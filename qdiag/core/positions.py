"""Token positions the analyses look at: the last token of the subject, the last token of the
prompt (where the answer is predicted), or every real token.

Prompts are batched with left padding (see ``evaluate.encode_prompts``), so the last token of
every prompt sits at index ``-1`` and the subject's last token is found from the tokenizer's
character offsets.
"""

from __future__ import annotations

import pandas as pd
import torch

from .data import Fact

POSITIONS = ("last_subject", "last", "all")


def check(positions) -> list[str]:
    """The position kinds asked for, validated; raises with the valid choices."""
    positions = [positions] if isinstance(positions, str) else list(positions)
    bad = [p for p in positions if p not in POSITIONS]
    if bad or not positions:
        raise ValueError(f"unknown token positions {bad or positions}; choose from {', '.join(POSITIONS)}")
    return positions


def subject_end(fact: Fact, template: int) -> int:
    """Character offset just past the subject in the prompt of ``fact``'s template number ``template``."""
    return fact.templates[template].index("[X]") + len(fact.subject)


def encode(tokenizer, prompts: list[str], subject_ends: list[int] | None = None,
           device: torch.device | str = "cpu") -> dict:
    """A left-padded batch (``input_ids``, ``attention_mask``, ``position_ids``) plus, when
    ``subject_ends`` is given, ``last_subject``: the index of each prompt's last subject token."""
    if not prompts:
        raise ValueError("no prompts to encode")
    tokenizer.padding_side = "left"
    want_offsets = subject_ends is not None
    if want_offsets and not getattr(tokenizer, "is_fast", False):
        raise ValueError("finding the subject's tokens needs a fast tokenizer (character offsets)")
    enc = tokenizer(prompts, return_tensors="pt", padding=True, return_offsets_mapping=want_offsets)
    mask = enc.attention_mask
    batch = {"input_ids": enc.input_ids.to(device), "attention_mask": mask.to(device),
             "position_ids": ((mask.cumsum(-1) - 1).clamp(min=0)).to(device)}
    if want_offsets:
        start, end = enc.offset_mapping[..., 0], enc.offset_mapping[..., 1]
        ends = torch.tensor(subject_ends)[:, None]
        inside = (mask == 1) & (end > start) & (start < ends)  # real tokens that begin inside the subject
        if not inside.any(1).all():
            bad = [p for p, ok in zip(prompts, inside.any(1).tolist()) if not ok]
            raise ValueError(f"no subject token found in prompts {bad[:3]}")
        idx = torch.arange(mask.shape[1]).expand_as(mask)
        batch["last_subject"] = torch.where(inside, idx, -1).amax(1)
    return batch


def token_index(batch: dict, position: str) -> torch.Tensor:
    """``(batch,)`` index of the token to read per prompt, for ``last_subject`` or ``last``."""
    if position == "last":
        return torch.full((batch["input_ids"].shape[0],), batch["input_ids"].shape[1] - 1)
    if position == "last_subject":
        return batch["last_subject"]
    raise ValueError(f"position {position!r} is not a single token; use select() for 'all'")


def select(x: torch.Tensor, batch: dict, position: str) -> torch.Tensor:
    """Rows of ``x (batch, pos, ...)`` at ``position``: ``(batch, ...)`` for one token per prompt,
    ``(n_real_tokens, ...)`` for ``all`` (padding dropped)."""
    if position == "all":
        return x[batch["attention_mask"].to(x.device).bool()]
    idx = token_index(batch, position).to(x.device)
    return x[torch.arange(x.shape[0], device=x.device), idx]


def batches(table: pd.DataFrame, facts: list[Fact], batch_size: int) -> list[pd.DataFrame]:
    """The prompt table in chunks of similar prompt length (less padding), with ``subject_end``."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    by_id = {f.id: f for f in facts}
    table = table.assign(subject_end=[subject_end(by_id[f], t) for f, t in zip(table.fact, table.template)])
    table = table.iloc[table.prompt.str.len().argsort(kind="stable")]
    return [table.iloc[i : i + batch_size] for i in range(0, len(table), batch_size)]
