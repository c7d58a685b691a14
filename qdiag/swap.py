"""Swap quantized weights in and out of a model without ever copying its full-precision weights.

``QuantizedWeights`` holds integer codes and scales. While ``applied(model)`` is active, each
planned module de-quantizes its weight just before its own forward and drops it right after, so
peak memory grows by the codes plus one de-quantized matrix; the full-precision parameters are
never written, so leaving the context restores them bit for bit.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .arch import from_matrix, unwrap, weight_matrix
from .gptq import ORDERS
from .io import atomic_write_bytes
from .plan import Plan, validate
from .quantize import QTensor, QuantSpec, rtn


class QuantizedWeights:
    """The quantized view of a model: ``{module name: QTensor}`` plus the plan that made it."""

    def __init__(self, plan: Plan, tensors: dict[str, QTensor], seconds: float = 0.0) -> None:
        self.plan = plan
        self.tensors = tensors
        self.seconds = seconds

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


def _cache_key(model: nn.Module, plan: Plan, calib: torch.Tensor, **settings) -> str:
    """A digest of everything GPTQ's result depends on: the planned weights (shape, sums and a
    sample of values), the plan, the calibration tokens, the settings and the quantizer's own code
    (a change to it, even one that only moves float rounding, must not load old results)."""
    import inspect

    from . import __version__, calibrate, gptq, quantize

    h = hashlib.blake2b(digest_size=16)
    h.update(repr((__version__, sorted(settings.items()))).encode())
    for module in (calibrate, gptq, quantize):
        h.update(inspect.getsource(module).encode())
    modules = dict(unwrap(model).named_modules())
    for name in sorted(plan):
        w = modules[name].weight.detach()
        stats = torch.stack([w.double().sum(), w.double().square().sum()]).cpu()
        h.update(repr((name, asdict(plan[name]), tuple(w.shape), str(w.dtype))).encode())
        h.update(stats.numpy().tobytes() + w.flatten()[:256].float().cpu().numpy().tobytes())
    h.update(calib.cpu().numpy().tobytes())
    return h.hexdigest()


def quantize_model(model: nn.Module, plan: Plan, calib: torch.Tensor | None = None, *, damp: float = 0.01,
                   order: str = "group", true_sequential: bool = True, batch_size: int = 8,
                   calib_dtype: torch.dtype | None = None, progress: bool = True,
                   cache_dir: str | os.PathLike | None = None) -> QuantizedWeights:
    """Quantize the weights a plan names; GPTQ specs need ``calib`` token ids (n, seq_len).

    The model's own parameters are left untouched; use ``.applied(model)`` to run quantized.
    ``calib_dtype`` runs GPTQ's calibration passes in another dtype (see ``sequential_quantize``).
    GPTQ results are kept in ``cache_dir`` (default: ``$QDIAG_QUANT_CACHE``, unset means no cache),
    keyed by the weights, plan, calibration tokens and settings, so a rerun loads them instead.
    """
    validate(model, plan)
    if order not in ORDERS:
        raise ValueError(f"unknown GPTQ column order {order!r}; choose one of {', '.join(ORDERS)}")
    t0 = time.perf_counter()
    active = {n: s for n, s in plan.items() if not s.is_full_precision}
    if any(s.method == "gptq" for s in active.values()):
        if calib is None or calib.numel() == 0:
            raise ValueError("GPTQ needs calibration token ids; pass calib=qdiag.data.calibration_tokens(...)")
        cache_dir = cache_dir or os.environ.get("QDIAG_QUANT_CACHE")
        settings = dict(damp=damp, order=order, true_sequential=true_sequential)
        if calib_dtype is not None:
            settings["calib_dtype"] = str(calib_dtype)
        path = Path(cache_dir) / f"{_cache_key(model, active, calib, **settings)}.pt" if cache_dir else None
        if path is not None and path.exists():
            cached = load(path)
            return QuantizedWeights(plan, cached.tensors, cached.seconds)
        from .calibrate import sequential_quantize

        tensors = sequential_quantize(model, active, calib, damp=damp, order=order,
                                      true_sequential=true_sequential, batch_size=batch_size,
                                      calib_dtype=calib_dtype, progress=progress)
        if path is not None:
            save(QuantizedWeights(active, tensors, time.perf_counter() - t0), path)
    else:
        modules = dict(unwrap(model).named_modules())
        tensors = {n: rtn(weight_matrix(modules[n]).detach(), s) for n, s in active.items()}
    return QuantizedWeights(plan, tensors, time.perf_counter() - t0)
