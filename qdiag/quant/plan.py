"""Quantization plans: which weight matrix gets which ``QuantSpec``, and what that costs in bits.

A plan is a plain ``dict[str, QuantSpec]`` keyed by module name. Modules the plan leaves out stay
in full precision; by default plans cover the decoder layers' linear weights only, so embeddings
and the unembedding stay in full precision.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from ..core.arch import resolve, unwrap, weight_matrix
from . import gguf
from .quantize import FULL_PRECISION, QuantSpec, bits_per_weight, parse_bits

Plan = dict[str, QuantSpec]


def uniform_plan(model: nn.Module, spec: QuantSpec, layers: Iterable[int] | None = None,
                 weight_types: Iterable[str] | None = None) -> Plan:
    """One spec for the chosen layers and weight types (all by default) of the decoder."""
    arch = resolve(model)
    layer_idx = list(range(arch.n_layers)) if layers is None else list(layers)
    bad = [i for i in layer_idx if not 0 <= i < arch.n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has layers 0..{arch.n_layers - 1}")
    types = arch.weight_types if weight_types is None else list(weight_types)
    unknown = sorted(set(types) - set(arch.weight_types))
    if unknown:
        raise ValueError(f"unknown weight types {unknown} for {arch.family}; it has {arch.weight_types}")
    plan = {arch.weights[i][t]: spec for i in layer_idx for t in types}
    return validate(model, plan)


def check_specs(model: nn.Module, specs: Iterable[QuantSpec]) -> list[QuantSpec]:
    """Check that every spec fits every decoder matrix (a uniform plan of it), before any work."""
    specs = list(specs)
    if not specs:
        raise ValueError("no configurations given")
    hf, arch = unwrap(model), resolve(model)
    inputs = {weight_matrix(hf.get_submodule(n)).shape[1]: n for n in arch.linear_names()}
    for s in specs:
        if not isinstance(s, QuantSpec):
            raise TypeError(f"expected a QuantSpec, got {type(s).__name__}")
        for cols, name in sorted(inputs.items()):
            s.check(cols, name)
    return specs


def width_specs(bits: Sequence[int | str], methods: Sequence[str], group_size: int | None = 128,
                sym: bool = True) -> list[QuantSpec]:
    """The configurations of a sweep over widths and quantizers; full precision once, first, and
    widest first. A GGUF type (q4_0, ...) fixes its own width and block size: it comes once, after
    the other quantizers, whatever ``bits`` holds. Raises on bad input."""
    if not bits:
        raise ValueError("no bit widths given")
    if not methods:
        raise ValueError("no quantization methods given")
    widths = sorted({parse_bits(b) for b in bits}, reverse=True)
    specs = [QuantSpec(bits=FULL_PRECISION)] if FULL_PRECISION in widths else []
    specs += [QuantSpec(bits=b, group_size=group_size, sym=sym, method=m)
              for m in methods if m not in gguf.TYPES for b in widths if b != FULL_PRECISION]
    specs += [QuantSpec.gguf(m) for m in dict.fromkeys(methods) if m in gguf.TYPES]
    return specs


def mixed_plan(base: Plan, overrides: Plan) -> Plan:
    """``base`` with some modules given another spec (e.g. the first layers at 8 bits)."""
    return {**base, **overrides}


def validate(model: nn.Module, plan: Plan) -> Plan:
    """Check every name exists, is a weight matrix, and fits its spec; raise before any work."""
    if not plan:
        raise ValueError("the quantization plan names no module; build one with qdiag.plan.uniform_plan")
    modules = dict(unwrap(model).named_modules())
    for name, spec in plan.items():
        if name not in modules:
            raise ValueError(f"the plan names {name!r}, which is not a module of this model")
        module = modules[name]
        if not isinstance(getattr(module, "weight", None), nn.Parameter) or module.weight.dim() != 2:
            raise ValueError(f"{name!r} has no 2-D weight to quantize")
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"plan[{name!r}] must be a QuantSpec, got {type(spec).__name__}")
        spec.check(weight_matrix(module).shape[1], name)
    return plan


def avg_bits(model: nn.Module, plan: Plan) -> float:
    """Average storage bits per weight over all decoder-layer weight matrices, scales and zero
    points included; matrices the plan leaves out count as 16-bit."""
    arch = resolve(model)
    modules = dict(unwrap(model).named_modules())
    total_bits = total = 0.0
    for name in arch.linear_names():
        out, cols = weight_matrix(modules[name]).shape
        spec = plan.get(name, QuantSpec(bits=FULL_PRECISION))
        total_bits += bits_per_weight(spec, cols) * out * cols
        total += out * cols
    return total_bits / total
