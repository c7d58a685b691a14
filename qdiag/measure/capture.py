"""Record, in one plain forward (torch hooks, no tracing), what every decoder layer's components
computed: attention probabilities and output, the MLP's input, gate pre-activations and output,
and the residual stream after the layer. With ``mlp_inputs``, each MLP is fed those inputs
instead of its own (to test an MLP on the reference's inputs, isolated from the attention before it).

    with eager_attention(model), capturing(model) as cap:
        run = Rerun(model, batch)            # cap.attn[layer]: (batch, head, query, key), ...

Tensors are kept on the model's device in float32; ``layer`` indexes each dict.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.arch import resolve, unwrap


@dataclass
class Capture:
    """Per layer: ``attn (batch, head, query, key)``, ``attn_out``, ``mlp_in``, ``mlp_out`` and
    ``resid (batch, pos, d_model)``, ``gate (batch, pos, d_mlp)``."""

    attn: dict[int, torch.Tensor] = field(default_factory=dict)
    attn_out: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp_in: dict[int, torch.Tensor] = field(default_factory=dict)
    gate: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp_out: dict[int, torch.Tensor] = field(default_factory=dict)
    resid: dict[int, torch.Tensor] = field(default_factory=dict)

    def drop(self, layer: int) -> None:
        """Forget one layer's tensors (a caller that reads layer by layer holds one at a time)."""
        for store in (self.attn, self.attn_out, self.mlp_in, self.gate, self.mlp_out, self.resid):
            store.pop(layer, None)


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capturing(model: nn.Module, mlp_inputs: dict[int, torch.Tensor] | None = None) -> Iterator[Capture]:
    """Hooks that fill a ``Capture`` while the block runs (attention probabilities need the eager
    kernel: wrap in ``trace.eager_attention``)."""
    hf, arch = unwrap(model), resolve(model)
    cap = Capture()
    handles = []

    def keep(store: dict, layer: int, x: torch.Tensor) -> None:
        store[layer] = x.detach().float()

    for i in range(arch.n_layers):
        gate_name, fused = arch.gate_site(i)

        def attn_hook(m, a, out, i=i):
            keep(cap.attn_out, i, out[0])
            if isinstance(out, tuple) and len(out) > 1 and torch.is_tensor(out[1]):
                keep(cap.attn, i, out[1])

        def mlp_pre(m, args, kwargs, i=i):
            own = args[0] if args else kwargs["hidden_states"]
            x = own if mlp_inputs is None or i not in mlp_inputs else mlp_inputs[i].to(own.device, own.dtype)
            keep(cap.mlp_in, i, x)
            if x is own:
                return None
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        def gate_hook(m, a, out, i=i, fused=fused):
            keep(cap.gate, i, out[..., : out.shape[-1] // 2] if fused else out)

        handles += [
            hf.get_submodule(arch.attn[i]).register_forward_hook(attn_hook),
            hf.get_submodule(arch.mlp[i]).register_forward_pre_hook(mlp_pre, with_kwargs=True),
            hf.get_submodule(gate_name).register_forward_hook(gate_hook),
            hf.get_submodule(arch.mlp[i]).register_forward_hook(
                lambda m, a, out, i=i: keep(cap.mlp_out, i, _first(out))),
            hf.get_submodule(arch.layers[i]).register_forward_hook(
                lambda m, a, out, i=i: keep(cap.resid, i, _first(out))),
        ]
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()
