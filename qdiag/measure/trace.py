"""Trace a model with nnsight: collect, per decoder layer, the activations the component and
representation metrics need, for one batch of prompts.

What can be collected (``what``), per layer ``l``:
- ``resid``: the residual stream after layer l, ``(batch, pos, d_model)``
- ``attn``: attention probabilities, ``(batch, head, pos, pos)`` (run with eager attention)
- ``attn_out``: the attention block's output, ``(batch, pos, d_model)``
- ``gate``: MLP gate pre-activations ``(batch, pos, d_mlp)`` (phi3: the gate half of its fused
  projection); for families without a gated MLP (gpt2, gpt_neox), the first projection's output
- ``mlp_act``: the MLP's hidden activations entering the down projection ``(batch, pos, d_mlp)``
- ``mlp_out``: the MLP's output ``(batch, pos, d_model)``

With ``tokens`` (a ``(batch, m)`` index tensor), only those positions are kept, inside the trace,
so memory does not grow with prompt length: ``(batch, m, ...)``, and attention ``(batch, m,
head, key)`` (the query rows of those tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..core.arch import Arch, resolve, unwrap

KINDS = ("attn", "attn_out", "gate", "mlp_act", "mlp_out", "resid")  # in execution order within a layer


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Use the eager attention kernel inside the block, so attention probabilities exist."""
    hf = unwrap(model)
    before = hf.config._attn_implementation
    if before != "eager":
        hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            hf.set_attn_implementation(before)


def _path(arch: Arch, kind: str, layer: int) -> str:
    if kind in ("attn", "attn_out"):
        return f"{arch.attn[layer]}.output"
    if kind == "gate":
        return f"{arch.gate_site(layer)[0]}.output"
    if kind == "mlp_act":
        return f"{arch.weights[layer]['down']}.input"
    if kind == "mlp_out":
        return f"{arch.mlp[layer]}.output"
    return f"{arch.layers[layer]}.output"


@torch.no_grad()
def collect(model, batch: dict, what: tuple[str, ...] = KINDS, layers: list[int] | None = None,
            tokens: torch.Tensor | None = None) -> dict[str, list[torch.Tensor]]:
    """Run one traced forward on ``batch`` (input_ids, attention_mask, position_ids) and return
    ``{kind: [tensor per layer]}`` on the CPU, in float32; ``tokens`` keeps only those positions."""
    unknown = set(what) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown activation kinds {sorted(unknown)}; choose from {KINDS}")
    arch = resolve(model)
    layers = list(range(arch.n_layers)) if layers is None else layers
    order = [k for k in KINDS if k in what]
    saved: dict[str, list] = {k: [] for k in order}
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if tokens is not None:
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]
    with eager_attention(model) if "attn" in what else _nothing():
        with model.trace(**inputs):
            for i in layers:
                attn_output = None
                for kind in order:
                    path = _path(arch, kind, i)
                    if kind in ("attn", "attn_out"):  # one module output, read once
                        attn_output = attn_output if attn_output is not None else model.get(path)
                        value = attn_output[1] if kind == "attn" else attn_output[0]
                    else:
                        value = model.get(path)
                    if kind == "gate" and arch.gate_site(i)[1]:
                        value = value[..., : value.shape[-1] // 2]  # phi3: [gate, up] fused
                    if tokens is not None:
                        value = (value.transpose(1, 2) if kind == "attn" else value)[rows, tokens]
                    saved[kind].append(value.save())
    return {k: [t.float().cpu() for t in v] for k, v in saved.items()}


@contextmanager
def _nothing() -> Iterator[None]:
    yield
