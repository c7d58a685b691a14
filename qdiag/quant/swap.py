"""Swap quantized weights in and out of a model without ever copying its full-precision weights.

``QuantizedWeights`` holds integer codes and scales. While ``applied(model)`` is active, each
planned module de-quantizes its weight just before its own forward and drops it right after, so
peak memory grows by the codes plus one de-quantized matrix; the full-precision parameters are
never written, so leaving the context restores them bit for bit.
"""

from __future__ import annotations

import dataclasses
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
from .gguf import GGUFTensor
from .plan import Plan
from .quantize import QTensor, QuantSpec, Scaled


class QuantizedWeights:
    """The quantized view of a model: ``{module name: QTensor}`` plus the plan that made it;
    ``key`` names its content (weights, plan, calibration, quantizer code) for the run store.
    ``extras`` (``{parameter name: tensor}``) are other parameters swapped in with the weights: the
    norms or biases an existing checkpoint changed."""

    def __init__(self, plan: Plan, tensors: dict[str, QTensor], seconds: float = 0.0, key: str | None = None,
                 extras: dict[str, torch.Tensor] | None = None) -> None:
        self.plan = plan
        self.tensors = tensors
        self.seconds = seconds
        self.key = key
        self.extras = extras or {}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values()) + sum(
            t.numel() * t.element_size() for t in self.extras.values())

    @contextmanager
    def parked(self, device: torch.device | str = "cpu") -> Iterator[QuantizedWeights]:
        """Inside the block, these weights live on ``device`` (host memory by default), to free the
        GPU for another configuration; where they were again after it. Objects that share this
        one's tensors (a requantized or corrected copy) keep theirs: park before making them."""
        home = {n: device_of(t) for n, t in self.tensors.items()}
        self.tensors = {n: to_device(t, device) for n, t in self.tensors.items()}
        try:
            yield self
        finally:
            self.tensors = {n: to_device(t, home[n]) if home[n] is not None else t for n, t in self.tensors.items()}

    @contextmanager
    def applied(self, model: nn.Module, cache: bool = False) -> Iterator[nn.Module]:
        """Run ``model`` with these weights inside the block; full precision again after it.

        ``cache=True`` de-quantizes every matrix once on entry instead of at each forward: faster
        for many forwards, at the cost of holding the de-quantized matrices (use it for a few).
        """
        hf = unwrap(model)
        modules = dict(hf.named_modules())
        swaps = [(modules[name], "weight", _matrix(modules[name], q)) for name, q in self.tensors.items()]
        for name, t in self.extras.items():
            owner, _, leaf = name.rpartition(".")
            swaps.append((hf.get_submodule(owner), leaf, _fixed(t)))
        handles = []
        for module, leaf, make in swaps:
            handles += _install(module, leaf, make, cache)
        try:
            yield model
        finally:
            for h in handles:
                h.remove()
            for module, leaf, _ in swaps:
                _restore(module, leaf)


def to_device(t, device: torch.device | str):
    """A quantized matrix (any dataclass of tensors, nested) with its tensors on ``device``."""
    if isinstance(t, torch.Tensor):
        return t.to(device)
    if dataclasses.is_dataclass(t):
        return dataclasses.replace(t, **{f.name: to_device(getattr(t, f.name), device) for f in dataclasses.fields(t)
                                         if f.init})
    return t


def device_of(t) -> torch.device | None:
    """The device of a quantized matrix's (first) tensor; None when it holds none."""
    if isinstance(t, torch.Tensor):
        return t.device
    if dataclasses.is_dataclass(t):
        return next((d for f in dataclasses.fields(t) if (d := device_of(getattr(t, f.name))) is not None), None)
    return None


def _matrix(module: nn.Module, q: QTensor):
    def make(fp: torch.Tensor) -> torch.Tensor:
        return from_matrix(module, q.dequantize(fp.dtype).to(fp.device))
    return make


def _fixed(t: torch.Tensor):
    def make(fp: torch.Tensor) -> torch.Tensor:
        return t.to(fp.device, fp.dtype)
    return make


def _install(module: nn.Module, leaf: str, make, cache: bool = False) -> list:
    cached = make(module._parameters[leaf]) if cache else None

    def swap_in(mod: nn.Module, args: tuple) -> None:
        fp = mod._parameters[leaf]
        mod.__dict__[f"_qdiag_fp_{leaf}"] = fp  # bypass nn.Module.__setattr__, which would register it
        # a plain tensor in _parameters: autograd-free, and invisible to optimisers
        mod._parameters[leaf] = cached if cached is not None else make(fp)

    def swap_out(mod: nn.Module, args: tuple, output: object) -> None:
        _restore(mod, leaf)

    return [module.register_forward_pre_hook(swap_in), module.register_forward_hook(swap_out)]


def _restore(module: nn.Module, leaf: str = "weight") -> None:
    fp = module.__dict__.pop(f"_qdiag_fp_{leaf}", None)
    if fp is not None:
        module._parameters[leaf] = fp


def save(qw: QuantizedWeights, path: str | os.PathLike) -> Path:
    """Write the codes, scales and plan to one file (whole or not at all)."""
    buf = io.BytesIO()
    torch.save({"plan": {n: asdict(s) for n, s in qw.plan.items()},
                "tensors": {n: _record(t) for n, t in qw.tensors.items()}, "seconds": qw.seconds}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load(path: str | os.PathLike) -> QuantizedWeights:
    """Read what ``save`` wrote."""
    d = torch.load(path, weights_only=True)
    return QuantizedWeights({n: QuantSpec(**s) for n, s in d["plan"].items()},
                            {n: _tensor(t) for n, t in d["tensors"].items()}, d["seconds"])


def _record(t: QTensor | Scaled | GGUFTensor) -> dict:
    if isinstance(t, Scaled):
        return {"base": asdict(t.base), "col_scale": t.col_scale}
    return asdict(t)


def _tensor(d: dict) -> QTensor | Scaled | GGUFTensor:
    if "base" in d:
        return Scaled(QTensor(**d["base"]), d["col_scale"])
    return GGUFTensor(**d) if "qtype" in d else QTensor(**d)
