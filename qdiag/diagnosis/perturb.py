"""Perturbations whose failure mode is known by construction: the ground truth a diagnosis is
checked against, and a way for users to calibrate it on their own models.

Each returns a ``Width`` (``qdiag.measure.widths``): a label and a context that applies it, so it
can be diagnosed, and passed to any analysis, exactly like a quantized configuration. Nothing is
copied: weights are swapped in per forward (as quantized weights are) or outputs are edited by hooks.

Signal Degradation (every component keeps computing what it computed; error accumulates):

- ``residual_noise``: Gaussian noise added to the residual stream after every layer; the
  components' weights are untouched, so each computes exactly what it did on the same input;
- ``weight_noise``: Gaussian noise on every decoder weight matrix, ``scale`` times each matrix's
  root-mean-square; small scales leave each component's function nearly intact.

Computation Collapse (some components stop working; everything else exact):

- ``uniform_attention``: the queries of the chosen layers are zeroed, so every head spreads its
  attention evenly over the keys it can see (it no longer focuses anywhere);
- ``scrambled_gates``: half of each chosen layer's MLP neurons, at random, have the sign of their
  gate pre-activation flipped (for MLPs without a gate, of their first projection);
- ``replaced_mlp``: the chosen layers' MLP matrices replaced by random matrices of the same
  shapes and root-mean-square: the MLP computes something unrelated to what it computed.

``match_damage`` tunes a perturbation's scale to a given loss of answers, to build pairs of the
two modes matched in damage: a diagnosis that only measured damage could not tell them apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pandas as pd
import torch
from torch import nn

from ..core.arch import resolve, unwrap, weight_matrix
from ..core.data import Fact
from ..measure.evaluate import score_prompts
from ..measure.widths import Reference, Width
from ..quant.quantize import FULL_PRECISION
from ..quant.swap import QuantizedWeights

DEGRADATION = ("residual_noise", "weight_noise")
COLLAPSE = ("uniform_attention", "scrambled_gates", "replaced_mlp")


class _Dense:
    """A weight computed on demand, in the shape ``weight_matrix`` uses: ``make(dtype)``."""

    def __init__(self, make) -> None:
        self.make = make
        self.nbytes = 0

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.make(dtype)


def _rms(w: torch.Tensor) -> float:
    return float(w.float().pow(2).mean().sqrt())


def _seed(seed: int, name: str) -> torch.Generator:
    """A generator for one module: the same noise every time the module runs."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**63)


def _width(name: str, apply=None, weights: QuantizedWeights | None = None) -> Width:
    return Width(method=name, bits=FULL_PRECISION, avg_bits=float(FULL_PRECISION),
                 apply=apply or weights.applied, weights=weights)


def _layers(model: nn.Module, layers: Sequence[int]) -> list[int]:
    n = resolve(model).n_layers
    layers = list(layers)
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range: the model has layers 0..{n - 1}")
    return layers


def weight_noise(model: nn.Module, scale: float, seed: int = 0) -> Width:
    """Every decoder matrix ``W + scale * rms(W) * Z`` with a fixed standard normal ``Z`` per matrix
    (the same ``Z`` at every scale, so a graded family differs only in size)."""
    if scale < 0:
        raise ValueError(f"scale must be at least 0, got {scale}")
    hf, arch = unwrap(model), resolve(model)
    tensors = {}
    for name in arch.linear_names():
        w = weight_matrix(hf.get_submodule(name))

        def make(dtype, w=w, name=name):
            z = torch.randn(w.shape, generator=_seed(seed, name)).to(w.device)
            return (w.float() + scale * _rms(w) * z).to(dtype)

        tensors[name] = _Dense(make)
    return _width(f"weight_noise_{scale:g}", weights=QuantizedWeights({}, tensors))


def residual_noise(model: nn.Module, scale: float, seed: int = 0) -> Width:
    """After every decoder layer, ``scale * rms(h) * Z`` added to each token's residual stream ``h``
    (``Z`` standard normal, drawn from a generator seeded per layer and per call shape)."""
    if scale < 0:
        raise ValueError(f"scale must be at least 0, got {scale}")
    hf, arch = unwrap(model), resolve(model)

    @contextmanager
    def apply(_model) -> Iterator[nn.Module]:
        handles = []
        for i, path in enumerate(arch.layers):
            def hook(module, args, output, i=i):
                h = output[0] if isinstance(output, tuple) else output
                g = _seed(seed, f"{i}:{tuple(h.shape)}")
                z = torch.randn(h.shape, generator=g).to(h.device, h.dtype)
                rms = h.float().pow(2).mean(-1, keepdim=True).sqrt().to(h.dtype)
                noisy = h + scale * rms * z
                return (noisy, *output[1:]) if isinstance(output, tuple) else noisy

            handles.append(hf.get_submodule(path).register_forward_hook(hook))
        try:
            yield _model
        finally:
            for h in handles:
                h.remove()

    return _width(f"residual_noise_{scale:g}", apply)


def _query_rows(hf: nn.Module, arch, layer: int) -> tuple[str, slice | torch.Tensor]:
    """The module whose output holds layer ``layer``'s queries, and which output features they are."""
    w = arch.weights[layer]
    if "q" in w:
        return w["q"], slice(None)
    config = getattr(hf.config, "text_config", None) or hf.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    d = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or d // heads
    if arch.family == "gpt_neox":  # per head [q, k, v] interleaved
        idx = torch.arange(heads * 3 * head_dim).reshape(heads, 3, head_dim)[:, 0].reshape(-1)
        return w["qkv"], idx
    return w["qkv"], slice(0, heads * head_dim)  # gpt2, phi3: [q, k, v] blocks


def _edits_width(name: str, hf: nn.Module, edits: dict[str, Callable]) -> Width:
    """A configuration that rewrites some modules' outputs, ``{module name: output -> output}``,
    with forward hooks while it is applied."""
    @contextmanager
    def apply(model):
        handles = [hf.get_submodule(n).register_forward_hook(lambda m, a, out, f=f: f(out)) for n, f in edits.items()]
        try:
            yield model
        finally:
            for h in handles:
                h.remove()

    return _width(name, apply)


def uniform_attention(model: nn.Module, layers: Sequence[int] = (0,)) -> Width:
    """The chosen layers' queries set to zero: every score equal, every head's attention uniform
    over the keys it can see."""
    hf, arch = unwrap(model), resolve(model)
    edits = {}
    for layer in _layers(model, layers):
        name, rows = _query_rows(hf, arch, layer)

        def zero(out, rows=rows):
            out = out.clone()
            out[..., rows] = 0
            return out

        edits[name] = zero
    return _edits_width(f"uniform_attention_{_span(layers)}", hf, edits)


def scrambled_gates(model: nn.Module, layers: Sequence[int] = (0,), seed: int = 0) -> Width:
    """In the chosen layers, a random half of the MLP neurons get the sign of their gate
    pre-activation flipped: those gates open where they were shut and shut where they were open."""
    hf, arch = unwrap(model), resolve(model)
    edits = {}
    for layer in _layers(model, layers):
        name, fused = arch.gate_site(layer)
        out_features = weight_matrix(hf.get_submodule(name)).shape[0]
        width = out_features // 2 if fused else out_features
        g = _seed(seed, name)
        sign = torch.ones(width)
        sign[torch.randperm(width, generator=g)[: width // 2]] = -1

        def flip(out, sign=sign, width=width):
            s = sign.to(out.device, out.dtype)
            if out.shape[-1] == width:
                return out * s
            return torch.cat([out[..., :width] * s, out[..., width:]], -1)

        edits[name] = flip
    return _edits_width(f"scrambled_gates_{_span(layers)}", hf, edits)


def replaced_mlp(model: nn.Module, layers: Sequence[int] = (0,), seed: int = 0) -> Width:
    """The chosen layers' MLP matrices replaced by random normal matrices of the same shapes and
    root-mean-square."""
    hf, arch = unwrap(model), resolve(model)
    mlp_types = [t for t in arch.weight_types if t in ("gate", "up", "down", "gate_up")]
    tensors = {}
    for layer in _layers(model, layers):
        for t in mlp_types:
            name = arch.weights[layer][t]
            w = weight_matrix(hf.get_submodule(name))

            def make(dtype, w=w, name=name):
                z = torch.randn(w.shape, generator=_seed(seed, name)).to(w.device)
                return (_rms(w) * z).to(dtype)

            tensors[name] = _Dense(make)
    return _width(f"replaced_mlp_{_span(layers)}", weights=QuantizedWeights({}, tensors))


def _span(layers: Sequence[int]) -> str:
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
        return f"{layers[0]}-{layers[-1]}"
    return "+".join(str(i) for i in layers)


def answers_lost(model: nn.Module, facts: list[Fact] | pd.DataFrame, width: Width) -> float:
    """The share of the prompts the reference answers right that ``width`` gets wrong; ``facts``
    may also be those prompts already (``reference_right_prompts``)."""
    right = facts if isinstance(facts, pd.DataFrame) else reference_right_prompts(model, facts)
    with width.applied(model):
        scored = score_prompts(model, model.tokenizer, right)
    return float(1 - scored.correct.mean())


def reference_right_prompts(model: nn.Module, facts: list[Fact]) -> pd.DataFrame:
    """The prompts of ``facts`` the reference answers right (a prompt table)."""
    ref = Reference(model, facts)
    right = ref.table[ref.scored.correct.to_numpy()]
    if right.empty:
        raise ValueError("the reference answers none of these prompts correctly")
    return right


def match_damage(model: nn.Module, facts: list[Fact] | pd.DataFrame, make: Callable[[float], Width], target: float,
                 high: float = 4.0, steps: int = 12) -> tuple[Width, float]:
    """The perturbation ``make(scale)`` whose share of lost answers is closest to ``target``, found by
    bisection on ``scale`` in ``[0, high]`` (loss grows with scale); returns it and its loss. Used
    to build pairs matched in damage: e.g. ``match_damage(m, facts, lambda s: residual_noise(m, s),
    answers_lost(m, facts, scrambled_gates(m)))``. ``facts`` may be the reference-right prompts."""
    if not 0 <= target <= 1:
        raise ValueError(f"target must be a share of answers in [0, 1], got {target}")
    right = facts if isinstance(facts, pd.DataFrame) else reference_right_prompts(model, facts)
    lo, hi = 0.0, high
    best = (make(0.0), answers_lost(model, right, make(0.0)))
    for _ in range(steps):
        mid = (lo + hi) / 2
        w = make(mid)
        lost = answers_lost(model, right, w)
        if abs(lost - target) < abs(best[1] - target):
            best = (w, lost)
        if lost < target:
            lo = mid
        else:
            hi = mid
    return best
