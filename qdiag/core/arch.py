"""Where each component lives in a model: one table per family, resolved against the module tree.

Sites are data, not code paths: adding a family means adding a row to ``FAMILIES``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

# A path (or a tuple of alternatives) is relative to the causal-LM module (layers, norm, unembed)
# or to one decoder layer (attn, mlp and the weight types). A weight type may be fused
# (phi3 "qkv", gpt2 "c_attn").
_LLAMA_LIKE = dict(
    layers="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
    attn="self_attn",
    mlp="mlp",
    weights={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
    gate="mlp.gate_proj",
)

FAMILIES: dict[str, dict] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gemma3": {
        **_LLAMA_LIKE,
        "layers": "model.language_model.layers",
        "final_norm": "model.language_model.norm",
        "embed": "model.language_model.embed_tokens",
    },
    "phi3": {
        **_LLAMA_LIKE,
        "weights": {
            "qkv": "self_attn.qkv_proj",
            "o": "self_attn.o_proj",
            "gate_up": "mlp.gate_up_proj",
            "down": "mlp.down_proj",
        },
        "gate": None,
    },
    "gpt2": dict(
        layers="transformer.h",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
        attn="attn",
        mlp="mlp",
        weights={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
        gate=None,
    ),
    "gpt_neox": dict(
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        unembed=("lm_head", "embed_out"),  # renamed to lm_head in transformers 5
        embed="gpt_neox.embed_in",
        attn="attention",
        mlp="mlp",
        weights={
            "qkv": "attention.query_key_value",
            "o": "attention.dense",
            "up": "mlp.dense_h_to_4h",
            "down": "mlp.dense_4h_to_h",
        },
        gate=None,
    ),
}


class UnsupportedModelError(ValueError):
    """The model's family is not in ``FAMILIES`` or its modules are not where the table says."""


@dataclass(frozen=True)
class Arch:
    """Resolved module paths of one model; every path is a name from ``model.named_modules()``."""

    family: str
    layers: list[str]
    final_norm: str
    unembed: str
    embed: str
    attn: list[str]
    mlp: list[str]
    # weights[layer][weight_type] -> module name
    weights: list[dict[str, str]] = field(repr=False)
    # gate pre-activation module per layer (None for families without a gated MLP)
    gate: list[str | None] = field(repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def gated(self) -> bool:
        """Whether the MLP has a gate (SwiGLU / GeGLU); gpt2 and gpt_neox do not."""
        return "gate" in self.weights[0] or "gate_up" in self.weights[0]

    @property
    def weight_types(self) -> list[str]:
        return list(self.weights[0])

    def gate_site(self, layer: int) -> tuple[str, bool]:
        """The module whose output holds layer ``layer``'s gate pre-activations, and whether that
        output is fused as ``[gate, up]`` (phi3; the gate is its first half). Families without a
        gated MLP (gpt2, gpt_neox) give their first MLP projection, whose output the activation reads."""
        w = self.weights[layer]
        if self.gate[layer]:
            return self.gate[layer], False
        if "gate_up" in w:
            return w["gate_up"], True
        return w["up"], False

    def linear_names(self, layers: list[int] | None = None) -> list[str]:
        """Names of the decoder-layer weight matrices, in execution order (the quantizable set)."""
        idx = range(self.n_layers) if layers is None else layers
        return [self.weights[i][t] for i in idx for t in self.weights[i]]


def model_type(model: nn.Module) -> str:
    """The ``config.model_type`` of a Hugging Face model (or of a model wrapped by nnsight)."""
    config = getattr(unwrap(model), "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no `config`; qdiag needs a Hugging Face causal LM")
    return config.model_type


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying torch module of an nnsight model, or the model itself."""
    if isinstance(model, nn.Module):
        return model
    inner = model.__dict__.get("_module")  # nnsight's Envoy keeps the torch module here
    if not isinstance(inner, nn.Module):
        raise TypeError(f"expected a torch module or an nnsight model, got {type(model).__name__}")
    return inner


# The architecture travels with the model: resolved once per module object, then looked up.
_RESOLVED: weakref.WeakKeyDictionary[nn.Module, Arch] = weakref.WeakKeyDictionary()


def resolve(model: nn.Module) -> Arch:
    """The model's ``Arch``: its family's row of ``FAMILIES``, every path checked against the
    module tree on the first call, then kept with the model."""
    model = unwrap(model)
    arch = _RESOLVED.get(model)
    if arch is None:
        arch = _RESOLVED[model] = _resolve(model)
    return arch


def _resolve(model: nn.Module) -> Arch:
    family = model_type(model)
    if family not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {family!r} is not in qdiag's architecture table (supported: "
            f"{', '.join(sorted(FAMILIES))}); add a row to qdiag.arch.FAMILIES naming its modules"
        )
    row = FAMILIES[family]
    modules = dict(model.named_modules())

    def need(path: str | tuple[str, ...], what: str) -> str:
        candidates = (path,) if isinstance(path, str) else path
        for p in candidates:
            if p in modules:
                return p
        where = " or ".join(repr(p) for p in candidates)
        raise UnsupportedModelError(f"{family}: expected the {what} at {where} but the model has no such module")

    layers_path = need(row["layers"], "decoder layers")
    n = len(modules[layers_path])
    layers = [f"{layers_path}.{i}" for i in range(n)]
    weights, gates = [], []
    for i, layer in enumerate(layers):
        weights.append({t: need(f"{layer}.{p}", f"{t} weight of layer {i}") for t, p in row["weights"].items()})
        gates.append(need(f"{layer}.{row['gate']}", f"MLP gate of layer {i}") if row["gate"] else None)
    return Arch(
        family=family,
        layers=layers,
        final_norm=need(row["final_norm"], "final norm"),
        unembed=need(row["unembed"], "unembedding"),
        embed=need(row["embed"], "token embedding"),
        attn=[need(f"{layer}.{row['attn']}", "attention") for layer in layers],
        mlp=[need(f"{layer}.{row['mlp']}", "MLP") for layer in layers],
        weights=weights,
        gate=gates,
    )


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out_features, in_features); GPT-2's Conv1D stores it transposed."""
    w = module.weight
    return w.t() if _is_conv1d(module) else w


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def from_matrix(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """Inverse of ``weight_matrix``: lay an (out, in) matrix out as the module stores it."""
    return w.t() if _is_conv1d(module) else w


def attention_window(model: nn.Module, layer: int) -> int | None:
    """How many keys (the query's own included) a layer's attention can see at most: the sliding
    window for layers that use one (gemma2/3, mistral, qwen2 with ``use_sliding_window``), else None."""
    config = unwrap(model).config
    config = getattr(config, "text_config", None) or config
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    types = getattr(config, "layer_types", None)
    if types:
        return window if types[layer] == "sliding_attention" else None
    return window if getattr(config, "use_sliding_window", True) else None
