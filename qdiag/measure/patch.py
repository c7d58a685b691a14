"""Interventions on the decoder layers: write another run's activation (or zero) into a site and
see what the output does. The building block of cross-model patching, zero ablation and
clean-signal injection (analysis 3 of the paper).

A *site* is a layer's residual stream output (``resid``), its attention output (``attn``) or its
MLP output (``mlp``). An ``Edit`` writes values into one site of one layer, at one token per
prompt or at every token.

Two ways to run edits, which must agree (the tests check it):

- ``patch_nnsight``: one nnsight trace, one full forward, per set of edits. Simple; the
  reference implementation.
- ``Rerun``: a sweep. One plain forward records what every decoder layer was called with; an
  edit at layer l then only reruns layers l and above from that record (upstream layers cannot
  change), and many edit sets run side by side in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from ..core.arch import Arch, resolve, unwrap
from .readout import last_logits, project

SITES = ("resid", "attn", "mlp")


@dataclass
class Edit:
    """Write ``value`` into ``site`` of ``layer``.

    ``index``: ``(batch,)`` token index per prompt and ``value`` ``(batch, d_model)``; or ``index``
    None and ``value`` ``(batch, pos, d_model)`` for every token. ``value`` may be a number (0 for
    zero ablation)."""

    layer: int
    site: str
    index: torch.Tensor | None
    value: torch.Tensor | float

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"unknown site {self.site!r}; choose from {', '.join(SITES)}")

    def apply(self, x: torch.Tensor, rows: slice | None = None) -> None:
        """Write into ``x (batch, pos, d)`` in place (``rows``: the block of rows this edit owns)."""
        block = x if rows is None else x[rows]
        value = self.value.to(x.device, x.dtype) if torch.is_tensor(self.value) else self.value
        if self.index is None:
            block[:] = value
        else:
            block[torch.arange(block.shape[0], device=x.device), self.index.to(x.device)] = value


def site_module(arch: Arch, layer: int, site: str) -> str:
    """The module whose output is the site (for ``resid``, the decoder layer itself)."""
    return {"resid": arch.layers, "attn": arch.attn, "mlp": arch.mlp}[site][layer]


@torch.no_grad()
def patch_nnsight(model, batch: dict, edits: Sequence[Edit]) -> torch.Tensor:
    """Logits ``(batch, vocab)`` at the last token, with ``edits`` written in during one nnsight
    trace of the whole model."""
    arch = resolve(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    order = {s: i for i, s in enumerate(("attn", "mlp", "resid"))}  # execution order within a layer
    edits = sorted(edits, key=lambda e: (e.layer, order[e.site]))
    with model.trace(**inputs):
        for e in edits:
            out = model.get(f"{site_module(arch, e.layer, e.site)}.output")
            e.apply(out[0] if isinstance(out, tuple) else out)
        logits = model.get("output").logits[:, -1].save()
    return logits.float()


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class Rerun:
    """What one forward pass called each decoder layer with, to rerun layers from any depth.

    Holds, per layer, the hidden states it received and its other arguments (masks, position
    embeddings), for one batch; ``logits`` is the unedited output at the last token."""

    def __init__(self, model, batch: dict) -> None:
        self.hf = unwrap(model)
        self.arch = resolve(model)
        self.layers = [self.hf.get_submodule(p) for p in self.arch.layers]
        self.inputs: list[torch.Tensor] = []
        self.args: list[tuple] = []
        self.kwargs: list[dict] = []
        self.batch_size = batch["input_ids"].shape[0]

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if args:
                hidden, rest = args[0], args[1:]
            else:
                kwargs = dict(kwargs)
                hidden, rest = kwargs.pop("hidden_states"), ()
            self.inputs.append(hidden)
            self.args.append(rest)
            self.kwargs.append({k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values",
                                                                               "past_key_value", "layer_past")})

        handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in self.layers]
        try:
            device = next(self.hf.parameters()).device
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
            with torch.no_grad():
                self.logits = last_logits(self.hf, inputs)
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def hidden_from(self, start: int) -> torch.Tensor:
        """The last layer's output at every token, ``(batch, pos, d_model)``, with layers ``start`` and
        above run again (as the model now is: weights swapped in since the record count) from what
        layer ``start`` received."""
        hidden = self.inputs[start]
        for layer in range(start, len(self.layers)):
            hidden = _first(self.layers[layer](hidden, *self.args[layer], **self.kwargs[layer]))
        return hidden

    def _expand(self, x: object, copies: int) -> object:
        if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == self.batch_size and copies > 1:
            return x.repeat(copies, *([1] * (x.dim() - 1)))
        if isinstance(x, tuple):
            return tuple(self._expand(t, copies) for t in x)
        return x

    @torch.no_grad()
    def run(self, variants: Sequence[Sequence[Edit]], hidden_at: Sequence[int] = (),
            start: int | None = None) -> tuple[torch.Tensor, dict]:
        """Run every variant (a list of edits) side by side from the first layer any edit touches
        (or from ``start``, which must not be above it).

        Returns the logits at the last token, ``(len(variants), batch, vocab)``, and, for each
        layer in ``hidden_at`` at or after that start, the residual stream at the last token
        ``{layer: (len(variants), batch, d_model)}``."""
        v, b = len(variants), self.batch_size
        edits = [(i, e) for i, var in enumerate(variants) for e in var]
        first = min((e.layer for _, e in edits), default=len(self.layers))
        if start is not None and start > first:
            raise ValueError(f"start={start} is above the first edited layer {first}")
        start = first if start is None else start
        hidden = self._expand(self.inputs[start], v).clone() if start < len(self.layers) else None
        saved = {}
        for layer in range(start, len(self.layers)):
            here = [(i, e) for i, e in edits if e.layer == layer]
            with ExitStack() as stack:
                for site in ("attn", "mlp"):
                    todo = [(i, e) for i, e in here if e.site == site]
                    if todo:
                        module = self.hf.get_submodule(site_module(self.arch, layer, site))
                        stack.enter_context(_edit_output(module, todo, b))
                args = self._expand(self.args[layer], v)
                kwargs = {k: self._expand(x, v) for k, x in self.kwargs[layer].items()}
                hidden = _first(self.layers[layer](hidden, *args, **kwargs))
            for i, e in here:
                if e.site == "resid":
                    e.apply(hidden, slice(i * b, (i + 1) * b))
            if layer in hidden_at:
                saved[layer] = hidden[:, -1].reshape(v, b, -1).float()
        if hidden is None:
            return self.logits.expand(v, *self.logits.shape).clone(), saved
        logits = project(self.hf, hidden[:, -1])
        return logits.reshape(v, b, -1), saved


class _edit_output:
    """Context: a forward hook that writes the edits into a module's output rows."""

    def __init__(self, module: nn.Module, edits: list[tuple[int, Edit]], batch_size: int) -> None:
        self.module, self.edits, self.b = module, edits, batch_size

    def __enter__(self) -> None:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            x = _first(output)
            for i, e in self.edits:
                e.apply(x, slice(i * self.b, (i + 1) * self.b))

        self.handle = self.module.register_forward_hook(hook)

    def __exit__(self, *exc) -> None:
        self.handle.remove()
