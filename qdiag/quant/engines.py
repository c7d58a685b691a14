"""The engines people quantize with, as qdiag writes for them: which formats each one can give a
tensor (its menu), what each costs in bytes, and a prescription written as the engine's own input.

- ``llama.cpp``: the ``llama-quantize`` command, every tensor that differs from the default type
  named by a ``--tensor-type PATTERN=TYPE`` argument (with ``--pure``, so that llama.cpp's own
  mixture rules change nothing else), the embedding and output head by their own flags;
- ``gptqmodel``: GPTQModel's ``QuantizeConfig`` with a ``dynamic`` per-module override (regular
  expressions matched against module names, ``+:`` for an override);
- ``llm-compressor``: a recipe YAML whose ``config_groups`` give each module its scheme (every
  module named in exactly one group).

An allocation is ``{parameter name: format}``, the formats being llama.cpp type names or
``w<bits>`` for the GPTQ engines.
"""

from __future__ import annotations

import json
import re
import shlex
from collections import defaultdict
from dataclasses import dataclass

from . import gguf, llama_cpp
from .quantize import QuantSpec, bits_per_weight

ENGINES = ("llama.cpp", "gptqmodel", "llm-compressor")
# the llama.cpp types a prescription chooses from by default: each width's usual type (the i-quants
# need an importance matrix and are added with one)
LLAMA_TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0")
LLAMA_IMATRIX_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL")
GPTQ_BITS = (2, 3, 4, 8)  # what GPTQModel's kernels pack
COMPRESSOR_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class Tensor:
    """One tensor a prescription may store differently: its base parameter, its name in the file
    (llama.cpp's tensor names; module names for the GPTQ engines), its shape as ``(rows, cols)``."""

    parameter: str
    file_name: str
    rows: int
    cols: int
    role: str = "matrix"  # matrix, embedding, head
    unit: str = ""  # what it belongs to: "attention 3", "mlp 3", "embedding", "head"


def menu(engine: str, t: Tensor, group_size: int | None = 128, imatrix: bool = False,
         types: tuple[str, ...] | None = None) -> dict[str, int]:
    """``{format: bytes}`` for the formats ``engine`` can really store ``t`` in. For llama.cpp, a
    type whose block does not divide the rows is replaced by what llama-quantize falls back to,
    so every entry is what the file will hold; ``F16`` (no rounding to speak of) is always on it.
    The GPTQ engines' bytes are their packed storage: codes, a 16-bit scale and a zero point per
    group (GPTQ checkpoints store zero points even for symmetric codes)."""
    if engine == "llama.cpp":
        wanted = (types or (LLAMA_TYPES + (LLAMA_IMATRIX_TYPES if imatrix else ()))) + ("F16",)
        out = {}
        for name in wanted:
            stored = llama_cpp.stored_type(name, t.cols)
            out[stored] = t.rows * llama_cpp.row_bytes(stored, t.cols)
        return out
    if engine in ("gptqmodel", "llm-compressor"):
        if t.role != "matrix":
            return {}
        bits = GPTQ_BITS if engine == "gptqmodel" else COMPRESSOR_BITS
        g = None if group_size is None or group_size >= t.cols else group_size
        return {f"w{b}": round(bits_per_weight(QuantSpec(b, g, sym=False), t.cols) * t.rows * t.cols / 8)
                for b in bits}
    raise ValueError(f"unknown engine {engine!r}; qdiag writes for {', '.join(ENGINES)}")


def llama_quantize_command(allocation: dict[str, str], tensors: dict[str, Tensor], base: str, out: str,
                           imatrix: str | None = None, tools: str = "llama-quantize") -> list[str]:
    """The ``llama-quantize`` argument list that writes ``allocation`` from the float file ``base``.
    The most common matrix type is the default; the others are named by ``--tensor-type``
    patterns, one per (tensor kind, type), anchored on whole names."""
    matrices = {p: k for p, k in allocation.items() if tensors[p].role == "matrix"}
    if not matrices:
        raise ValueError("the allocation names no decoder matrix")
    counts: dict[str, int] = defaultdict(int)
    for p, k in matrices.items():
        counts[k] += tensors[p].rows * tensors[p].cols
    default = max(counts, key=counts.get)
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for p, k in matrices.items():
        if k != default:
            layer, kind = _split(tensors[p].file_name)
            groups[(kind, k)].append(layer)
    args = [tools]
    if imatrix:
        args += ["--imatrix", imatrix]
    args.append("--pure")
    for (kind, k), layers in sorted(groups.items()):
        numbers = "|".join(sorted(set(layers), key=lambda s: int(s) if s.isdigit() else s))
        args += ["--tensor-type", f"^blk\\.({numbers})\\.{re.escape(kind)}\\.weight$={k.lower()}"]
    for p, k in allocation.items():
        if tensors[p].role == "embedding":
            args += ["--token-embedding-type", k.lower()]
        elif tensors[p].role == "head":
            args += ["--output-tensor-type", k.lower()]
    return [*args, base, out, default.upper()]


def _split(name: str) -> tuple[str, str]:
    m = re.fullmatch(r"blk\.(\d+)\.(.+)\.weight", name)
    if m is None:
        raise ValueError(f"{name} is not a decoder block's matrix (blk.N.<kind>.weight)")
    return m.group(1), m.group(2)


def parse_tensor_types(args: list[str]) -> list[tuple[re.Pattern, str]]:
    """The ``--tensor-type`` arguments as llama-quantize reads them (``tools/quantize/quantize.cpp``:
    the name lowercased, split at the first ``=``, the type a ggml type name): ``[(pattern, TYPE)]``
    in order; raises on what llama-quantize refuses."""
    out = []
    for i, a in enumerate(args):
        if a != "--tensor-type":
            continue
        value = args[i + 1]
        name, sep, kind = value.partition("=")
        if not sep or not name or not kind:
            raise ValueError(f"malformed tensor type {value!r}")
        gguf.qtype(kind)  # a type llama.cpp knows
        out.append((re.compile(name.lower()), kind.upper()))
    return out


def types_written(args: list[str], names: list[str], default: str) -> dict[str, str]:
    """What llama-quantize asked with ``args`` would request for each tensor name (the first pattern
    that matches, searched as llama.cpp's regex_search does; else the default type, as ``--pure``
    asks), before its fallback for rows the type does not fit."""
    patterns = parse_tensor_types(args)
    out = {}
    for n in names:
        hit = next((k for p, k in patterns if p.search(n.lower())), None)
        out[n] = hit or default
    return out


def gptqmodel_config(allocation: dict[str, str], tensors: dict[str, Tensor], group_size: int | None = 128,
                     sym: bool = True) -> dict:
    """GPTQModel's ``QuantizeConfig`` arguments: the most common width as ``bits``, every module of
    another width in ``dynamic`` (``+:`` regular expressions on the module name, matched from the
    start as GPTQModel and vLLM do)."""
    widths = {p: int(k.removeprefix("w")) for p, k in allocation.items() if tensors[p].role == "matrix"}
    if not widths:
        raise ValueError("the allocation names no decoder matrix")
    counts: dict[int, int] = defaultdict(int)
    for p, b in widths.items():
        counts[b] += tensors[p].rows * tensors[p].cols
    default = max(counts, key=counts.get)
    by_width: dict[int, list[str]] = defaultdict(list)
    for p, b in widths.items():
        if b != default:
            by_width[b].append(p.removesuffix(".weight"))
    dynamic = {}
    for b, mods in sorted(by_width.items()):
        dynamic[f"+:^({'|'.join(re.escape(m) for m in sorted(mods))})$"] = {"bits": b,
                                                                           "group_size": group_size or -1}
    return {"bits": default, "group_size": group_size or -1, "sym": sym, "desc_act": False, "dynamic": dynamic}


def dynamic_bits(config: dict, module: str) -> int | None:
    """The width GPTQModel gives ``module`` under ``config`` (first matching ``dynamic`` pattern,
    ``re.match`` as GPTQModel and vLLM's ``get_dynamic_override``; None: skipped)."""
    for pattern, override in config["dynamic"].items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], module):
                return None
        elif re.match(pattern.removeprefix("+:"), module):
            return override.get("bits", config["bits"])
    return config["bits"]


def compressor_recipe(allocation: dict[str, str], tensors: dict[str, Tensor], group_size: int | None = 128,
                      sym: bool = True, modifier: str = "GPTQModifier") -> dict:
    """An llm-compressor recipe (as a mapping; ``yaml.safe_dump`` writes the file): one config group
    per width, each naming its modules by a ``re:`` target, the output head ignored."""
    widths: dict[int, list[str]] = defaultdict(list)
    for p, k in allocation.items():
        if tensors[p].role == "matrix":
            widths[int(k.removeprefix("w"))].append(p.removesuffix(".weight"))
    if not widths:
        raise ValueError("the allocation names no decoder matrix")
    groups = {}
    for i, (b, mods) in enumerate(sorted(widths.items())):
        scheme = {"num_bits": b, "type": "int", "symmetric": sym, "strategy": "group" if group_size else "channel",
                  "dynamic": False}
        if group_size:
            scheme["group_size"] = group_size
        groups[f"group_{i}"] = {"targets": [f"re:^({'|'.join(re.escape(m) for m in sorted(mods))})$"],
                                "weights": scheme}
    return {"quant_stage": {"quant_modifiers": {modifier: {"ignore": ["lm_head"], "config_groups": groups}}}}


def check_recipe(recipe: dict, modules: list[str]) -> None:
    """Raise unless ``recipe`` has the layout llm-compressor reads (``quant_stage.quant_modifiers.
    <Modifier>.config_groups``, each with ``targets`` and integer ``weights``) and names every module
    in exactly one group."""
    try:
        (modifier, body), = recipe["quant_stage"]["quant_modifiers"].items()
        groups = body["config_groups"]
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"not an llm-compressor recipe: {e}") from None
    seen: dict[str, str] = {}
    for gname, g in groups.items():
        w = g["weights"]
        if w["type"] != "int" or not 2 <= w["num_bits"] <= 8 or w["strategy"] not in ("group", "channel"):
            raise ValueError(f"{gname}: not an integer weight scheme llm-compressor packs ({w})")
        if w["strategy"] == "group" and not isinstance(w.get("group_size"), int):
            raise ValueError(f"{gname}: a group strategy needs an integer group_size")
        for target in g["targets"]:
            if not target.startswith("re:"):
                raise ValueError(f"{gname}: target {target!r} is not a re: pattern")
            rx = re.compile(target[3:])
            for m in modules:
                if rx.match(m):
                    if m in seen:
                        raise ValueError(f"{m} is in both {seen[m]} and {gname}")
                    seen[m] = gname
    missing = [m for m in modules if m not in seen]
    if missing:
        raise ValueError(f"{len(missing)} modules are in no group ({', '.join(missing[:3])})")


def shell(args: list[str]) -> str:
    """A command line to paste into a shell."""
    return " ".join(shlex.quote(a) for a in args)


def to_json(config: dict) -> str:
    return json.dumps(config, indent=2)
