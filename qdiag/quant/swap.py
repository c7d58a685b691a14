"""Swap quantized weights in and out of a model without ever copying its full-precision weights.

``QuantizedWeights`` holds integer codes and scales. While ``applied(model)`` is active, each
planned module de-quantizes its weight just before its own forward and drops it right after, so
peak memory grows by the codes plus one de-quantized matrix; the full-precision parameters are
never written, so leaving the context restores them bit for bit.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..core.arch import from_matrix, unwrap
from ..core.io import atomic_write_bytes
from .plan import Plan
from .quantize import QTensor, QuantSpec


class QuantizedWeights:
    """The quantized view of a model: ``{module name: QTensor}`` plus the plan that made it;
    ``key`` names its content (weights, plan, calibration, quantizer code) for the run store."""

    def __init__(self, plan: Plan, tensors: dict[str, QTensor], seconds: float = 0.0, key: str | None = None) -> None:
        self.plan = plan
        self.tensors = tensors
        self.seconds = seconds
        self.key = key

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @contextmanager
    def applied(self, model: nn.Module, cache: bool = False) -> Iterator[nn.Module]:
        """Run ``model`` with these weights inside the block; full precision again after it.

        ``cache=True`` de-quantizes every matrix once on entry instead of at each forward: faster
        for many forwards, at the cost of holding the de-quantized matrices (use it for a few).
        """
        modules = dict(unwrap(model).named_modules())
        handles = []
        for name, q in self.tensors.items():
            handles += _install(modules[name], q, cache)
        try:
            yield model
        finally:
            for h in handles:
                h.remove()
            for name in self.tensors:
                _restore(modules[name])


def _install(module: nn.Module, q: QTensor, cache: bool = False) -> list:
    fp0 = module._parameters["weight"]
    cached = from_matrix(module, q.dequantize(fp0.dtype).to(fp0.device)) if cache else None

    def swap_in(mod: nn.Module, args: tuple) -> None:
        fp = mod._parameters["weight"]
        mod.__dict__["_qdiag_fp"] = fp  # bypass nn.Module.__setattr__, which would register it
        # a plain tensor in _parameters: autograd-free, and invisible to optimisers
        mod._parameters["weight"] = cached if cached is not None else from_matrix(
            mod, q.dequantize(fp.dtype).to(fp.device))

    def swap_out(mod: nn.Module, args: tuple, output: object) -> None:
        _restore(mod)

    return [module.register_forward_pre_hook(swap_in), module.register_forward_hook(swap_out)]


def _restore(module: nn.Module) -> None:
    fp = module.__dict__.pop("_qdiag_fp", None)
    if fp is not None:
        module._parameters["weight"] = fp


def save(qw: QuantizedWeights, path: str | os.PathLike) -> Path:
    """Write the codes, scales and plan to one file (whole or not at all)."""
    buf = io.BytesIO()
    torch.save({"plan": {n: asdict(s) for n, s in qw.plan.items()},
                "tensors": {n: asdict(t) for n, t in qw.tensors.items()}, "seconds": qw.seconds}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load(path: str | os.PathLike) -> QuantizedWeights:
    """Read what ``save`` wrote."""
    d = torch.load(path, weights_only=True)
    return QuantizedWeights({n: QuantSpec(**s) for n, s in d["plan"].items()},
                            {n: QTensor(**t) for n, t in d["tensors"].items()}, d["seconds"])
