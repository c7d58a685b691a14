"""The front door of quantization: ``quantize_model`` turns a plan into ``QuantizedWeights``, by
round-to-nearest or by GPTQ's layer-by-layer calibration, and keeps GPTQ results in a disk cache
keyed by everything they depend on."""

from __future__ import annotations

import hashlib
import inspect
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..core.arch import unwrap, weight_matrix
from ..core.store import weights_digest
from . import awq, calibrate, gguf, gptq, hqq, quantize
from .calibrate import sequential_quantize
from .gptq import ORDERS
from .hqq import without_calibration
from .plan import Plan, validate
from .quantize import CALIBRATED
from .swap import QuantizedWeights, load, save


def _cache_key(model: nn.Module, plan: Plan, calib: torch.Tensor | None, **settings) -> str:
    """A digest of everything a quantization's result depends on: every weight of the model (where
    each value sits, ``weights_digest``: calibration runs through the layers before the quantized
    one), the plan, the calibration tokens, the settings and the quantizer's own code (a change to
    it, even one that only moves float rounding, must not load old results)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((__version__, sorted(settings.items()))).encode())
    for module in (awq, calibrate, gguf, gptq, hqq, quantize):
        h.update(inspect.getsource(module).encode())
    h.update(weights_digest(model).encode())
    modules = dict(unwrap(model).named_modules())
    for name in sorted(plan):
        w = modules[name].weight
        h.update(repr((name, asdict(plan[name]), tuple(w.shape), str(w.dtype))).encode())
    if calib is not None:
        h.update(calib.cpu().numpy().tobytes())
    return h.hexdigest()


def quantize_model(model: nn.Module, plan: Plan, calib: torch.Tensor | None = None, *, damp: float = 0.01,
                   order: str = "group", true_sequential: bool = True, batch_size: int = 8,
                   calib_dtype: torch.dtype | None = None, progress: bool = True,
                   cache_dir: str | os.PathLike | None = None) -> QuantizedWeights:
    """Quantize the weights a plan names; GPTQ and AWQ specs need ``calib`` token ids (n, seq_len).

    The model's own parameters are left untouched; use ``.applied(model)`` to run quantized.
    ``calib_dtype`` runs GPTQ's calibration passes in another dtype (see ``sequential_quantize``).
    GPTQ and AWQ results are kept in ``cache_dir`` (default: ``$QDIAG_QUANT_CACHE``, unset means no cache),
    keyed by the weights, plan, calibration tokens and settings, so a rerun loads them instead.
    """
    validate(model, plan)
    if order not in ORDERS:
        raise ValueError(f"unknown GPTQ column order {order!r}; choose one of {', '.join(ORDERS)}")
    t0 = time.perf_counter()
    active = {n: s for n, s in plan.items() if not s.is_full_precision}
    if any(s.method in CALIBRATED for s in active.values()):
        if calib is None or calib.numel() == 0:
            raise ValueError("GPTQ and AWQ need calibration token ids; pass calib=qdiag.data.calibration_tokens(...)")
        cache_dir = cache_dir or os.environ.get("QDIAG_QUANT_CACHE")
        settings = dict(damp=damp, order=order, true_sequential=true_sequential)
        if calib_dtype is not None:
            settings["calib_dtype"] = str(calib_dtype)
        key = _cache_key(model, active, calib, **settings)
        path = Path(cache_dir) / f"{key}.pt" if cache_dir else None
        if path is not None and path.exists():
            cached = load(path)
            return QuantizedWeights(plan, cached.tensors, cached.seconds, key)
        rest = {n: s for n, s in active.items() if s.method != "awq"}
        if any(s.method == "gptq" for s in rest.values()):
            tensors = sequential_quantize(model, rest, calib, damp=damp, order=order,
                                          true_sequential=true_sequential, batch_size=batch_size,
                                          calib_dtype=calib_dtype, progress=progress)
        else:
            tensors = _without_calibration(model, rest)
        awq_plan = {n: s for n, s in active.items() if s.method == "awq"}
        if awq_plan:
            tensors.update(awq.awq(model, awq_plan, calib, batch_size, progress))
        if path is not None:
            save(QuantizedWeights(active, tensors, time.perf_counter() - t0), path)
    else:
        key = _cache_key(model, active, None)
        tensors = _without_calibration(model, active)
    return QuantizedWeights(plan, tensors, time.perf_counter() - t0, key)


def _without_calibration(model: nn.Module, plan: Plan) -> dict:
    modules = dict(unwrap(model).named_modules())
    return {n: without_calibration(weight_matrix(modules[n]).detach(), s) for n, s in plan.items()}


def requantize(model: nn.Module, base: QuantizedWeights, plan: Plan) -> QuantizedWeights:
    """``base`` with the matrices whose spec ``plan`` changes re-quantized by RTN at the new spec
    (used for protection at 8 bits, where RTN and GPTQ agree to a fraction of a percent); the
    other matrices keep ``base``'s codes."""
    validate(model, plan)
    hf = unwrap(model)
    tensors = dict(base.tensors)
    for name, spec in plan.items():
        if base.plan.get(name) != spec:
            tensors[name] = without_calibration(weight_matrix(hf.get_submodule(name)).detach(), spec)
    return QuantizedWeights(plan, tensors, base.seconds)
