"""The prescription: which tensors get which format, at what byte cost, written for the engine that
made the file (llama.cpp, GPTQModel, llm-compressor).

    p = prescribe(model, width, calib, budget="+0.25bpw")   # width: a checkpoint, or a qdiag quantization
    print(p.text); p.save("results/")                       # the table, the engine's command or config

How it decides, from what it measures:

1. **Where the damage is.** Each unit of the model (a layer's attention, a layer's MLP, the token
   embedding, the output head) is taken from the configuration alone, everything else kept as
   the reference, and its KL divergence from the reference is measured on calibration text: the
   sensitivity analysis, in nats. The units' KLs are the measured damage.
2. **What each format would cost there.** The Fisher information of the reference's own output
   (``measure.fisher``) turns any weight error into a predicted KL. Each tensor is rounded in each
   format its engine can store it in (llama.cpp's own quantizer where its tools are built, with the
   importance matrix if one is given; round to nearest at the width for the GPTQ engines, scaled by
   how much better than that the configuration's own quantizer did on the tensor), and the Fisher
   damage of that error, times the unit's measured KL over the Fisher damage of the
   configuration's own error (how far the second-order estimate is off for that unit), is the
   predicted damage of the format.
3. **The budget** (``+0.25bpw``: the configuration's bytes plus a quarter bit per weight;
   ``4.8bpw``; ``+5%``) is spent by ``quant.allocate`` over every tensor at once.

Where most of the measured damage sits outside the decoder's matrices (the embedding, the head),
only those tensors are changed and the text says so; tensors the format check finds are not
quantization damage are named, and the engine's command re-exports them from the base.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.arch import resolve, unwrap, weight_matrix
from ..core.io import atomic_write_bytes, records, save_analysis
from ..measure import fisher
from ..measure.patch import Rerun
from ..measure.readout import project
from ..measure.widths import Width
from ..quant import engines, gguf, llama_cpp
from ..quant.allocate import Option, allocate, random_allocation
from ..quant.format_check import flagged
from ..quant.gguf_file import tensor_names
from ..quant.quantize import QuantSpec, rtn
from ..quant.swap import QuantizedWeights

OUTSIDE = ("embedding", "head")


@dataclass
class Prescription:
    """A prescription for one configuration: ``tensors`` (one row per tensor: its unit, role, format
    and bytes now and prescribed, predicted damage of each), ``units`` (measured KL per unit), the
    engine's own input (``exports``: file name -> text) and a sentence (``text``)."""

    engine: str
    source: str
    tensors: pd.DataFrame
    units: pd.DataFrame
    budget: int
    text: str
    exports: dict[str, str]
    meta: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict, repr=False)  # tensor -> [Option], for other allocations
    imatrix: str | None = None

    @property
    def bytes(self) -> int:
        return int(self.tensors.bytes_to.sum())

    @property
    def file_bytes(self) -> int:
        return int(self.tensors.bytes_from.sum())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / int(self.tensors.n.sum())

    @property
    def allocation(self) -> dict[str, str]:
        return dict(zip(self.tensors.parameter, self.tensors.to))

    def summary(self) -> dict:
        """The numbers a report quotes: bytes and bits per weight now and prescribed, predicted KL."""
        n = int(self.tensors.n.sum())
        return {"engine": self.engine, "source": self.source, "budget": self.budget, "bytes_from": self.file_bytes,
                "bytes_to": self.bytes, "bpw_from": 8 * self.file_bytes / n, "bpw_to": self.bits_per_weight,
                "measured_kl_from": float(self.units.kl.sum()),
                "predicted_kl_from": float(self.tensors.damage_from.sum()),
                "predicted_kl_to": float(self.tensors.damage_to.sum()),
                "changed": int((self.tensors["from"] != self.tensors.to).sum())}

    def save(self, out: str | Path) -> None:
        """``prescription.json`` (summary, units, the allocation), ``prescription.csv`` (the tensors),
        the engine's files and ``prescription.md``, each whole or not at all."""
        out = Path(out)
        save_analysis(out, "prescription", self.meta, self.tensors,
                      extra={"summary": self.summary(), "units": records(self.units), "text": self.text,
                             "exports": sorted(self.exports)})
        for name, text in self.exports.items():
            atomic_write_bytes(out / name, text.encode())
        atomic_write_bytes(out / "prescription.md", self.report().encode())

    def report(self) -> str:
        """The prescription as a person reads it, Markdown."""
        s = self.summary()
        changed = self.tensors[self.tensors["from"] != self.tensors.to]
        lines = [f"# Prescription for {self.source} ({self.engine})", "", self.text, "",
                 f"- bytes: {s['bytes_from']:,} -> {s['bytes_to']:,} (budget {s['budget']:,}); bits per weight "
                 f"{s['bpw_from']:.3f} -> {s['bpw_to']:.3f}",
                 f"- KL from the reference, summed over units measured one at a time: {s['measured_kl_from']:.4f}; "
                 f"predicted after the prescription: {s['predicted_kl_to']:.4f}", "",
                 "| tensor | unit | now | prescribed | bytes now | bytes prescribed |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for r in changed.to_dict("records"):
            lines.append(f"| {r['file_name']} | {r['unit']} | {r['from']} | {r['to']} | {r['bytes_from']:,} | "
                         f"{r['bytes_to']:,} |")
        for name, text in self.exports.items():
            lines += ["", f"## {name}", "", "```", text.strip(), "```"]
        return "\n".join(lines) + "\n"

    def reallocate(self, budget: int, kind: str = "best", seed: int = 0) -> dict[str, str]:
        """Another allocation of the same options: ``best`` (the prescription's method) or ``random``
        (the baseline: the bytes over the file's own formats spent on random upgrades) at ``budget``
        bytes; ``{parameter: format}``."""
        start = dict(zip(self.tensors.parameter, self.tensors["from"]))
        choice = allocate(self.options, budget) if kind == "best" else \
            random_allocation(self.options, budget, seed, start=start)
        return {t: o.kind for t, o in choice.items()}

    def bytes_of(self, allocation: dict[str, str]) -> int:
        """The bytes of an allocation of these tensors."""
        return sum(next(o.bytes for o in self.options[t] if o.kind == k) for t, k in allocation.items())

    def file_allocation(self, ckpt) -> dict[str, str]:
        """What a GGUF checkpoint of the same model stores these tensors in: ``{parameter: type}``
        (another llama.cpp file, to compare with at its bytes)."""
        if self.engine != "llama.cpp" or ckpt.format != "gguf":
            raise ValueError("file_allocation reads llama.cpp files, for a llama.cpp prescription")
        return {p: ckpt.tensor_types.get(p, "F32").upper() for p in self.tensors.parameter}

    def bytes_in(self, allocation: dict[str, str]) -> int:
        """The bytes of these tensors in any llama.cpp types (not only the menu's): rows x row bytes."""
        t = self.tensors.set_index("parameter")
        return int(sum(int(t.at[p, "rows"]) * llama_cpp.row_bytes(k, int(t.at[p, "cols"]))
                       for p, k in allocation.items()))

    def command(self, allocation: dict[str, str] | None = None, base_file: str = "BASE-F32.gguf",
                out_file: str = "prescribed.gguf", tools: str = "llama-quantize") -> list[str]:
        """The ``llama-quantize`` arguments that write ``allocation`` (the prescription's by default)."""
        if self.engine != "llama.cpp":
            raise ValueError(f"a {self.engine} prescription has no llama-quantize command")
        tensors = {r.parameter: engines.Tensor(r.parameter, r.file_name, int(r.rows), int(r.cols), r.role, r.unit)
                   for r in self.tensors.itertuples()}
        return engines.llama_quantize_command(allocation or self.allocation, tensors, base_file, out_file,
                                              self.imatrix, tools)


def parse_budget(text: str, current: int, n_weights: int) -> int:
    """Bytes from ``+0.25bpw`` (the current bytes plus that many bits per weight), ``4.8bpw``
    (absolute), ``+5%`` or ``120MB`` / ``120MiB``; raises on anything else, saying what it takes."""
    t = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\+)?(\d+(?:\.\d+)?)bpw", t)
    if m:
        bits = float(m.group(2))
        return int(current + bits * n_weights / 8) if m.group(1) else int(bits * n_weights / 8)
    m = re.fullmatch(r"\+(\d+(?:\.\d+)?)%", t)
    if m:
        return int(current * (1 + float(m.group(1)) / 100))
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(mb|mib|gb|gib|b)", t)
    if m:
        scale = {"b": 1, "mb": 1e6, "mib": 2**20, "gb": 1e9, "gib": 2**30}[m.group(2)]
        return int(float(m.group(1)) * scale)
    raise ValueError(f"budget {text!r}: give +0.25bpw (bits per weight over the file's), 4.8bpw, +5% or 120MB")


def engine_of(width: Width) -> str:
    """The engine that made a configuration: llama.cpp for GGUF files and types, GPTQModel for GPTQ
    checkpoints and qdiag's integer quantizers, llm-compressor for compressed-tensors folders."""
    if width.checkpoint is not None:
        return {"gguf": "llama.cpp", "gptq": "gptqmodel", "ct": "llm-compressor"}.get(width.checkpoint.format,
                                                                                       "gptqmodel")
    return "llama.cpp" if width.method in gguf.TYPES else "gptqmodel"


def prescribe(model: nn.Module, width: Width, calib: torch.Tensor, budget: str | int = "+0.25bpw",
              engine: str | None = None, imatrix: str | Path | None = None, types: tuple[str, ...] | None = None,
              kl_windows: int = 4, fisher_windows: int = 16, rows: int = 512, tools=None, seed: int = 0,
              base_file: str = "BASE-F32.gguf", out_file: str = "prescribed.gguf",
              progress: bool = True) -> Prescription:
    """The prescription for ``width`` (module docstring). ``calib (n, T)``: calibration windows, the
    first ``kl_windows`` for the units' KL and ``fisher_windows`` for the Fisher information."""
    if width.is_reference or width.weights is None:
        raise ValueError("nothing to prescribe for the reference: give a quantized configuration or checkpoint")
    engine = engine or engine_of(width)
    if engine not in engines.ENGINES:
        raise ValueError(f"unknown engine {engine!r}; qdiag writes for {', '.join(engines.ENGINES)}")
    if width.checkpoint is not None and width.checkpoint.format == "awq":
        raise ValueError("an AWQ checkpoint folds scales into its norms: its matrices are not the base's weights "
                         "rounded, so their formats cannot be re-chosen against the base")
    tools = llama_cpp.find() if tools is None else (tools or None)
    if imatrix is not None and engine != "llama.cpp":
        raise ValueError("an importance matrix is a llama.cpp input; GPTQModel and llm-compressor calibrate themselves")
    if calib is None or calib.shape[0] < 1:
        raise ValueError("the prescription needs calibration text (calib windows)")
    hf = unwrap(model)
    group = _group(width)
    tensors = _tensors(model, width, engine)
    imat = llama_cpp.read_imatrix(imatrix) if imatrix is not None else {}
    factors = fisher.fisher_factors(model, calib[:fisher_windows], seed=seed, progress=progress)
    current = {p: _current(width, t, engine) for p, t in tensors.items()}
    units = _measure_units(model, width, tensors, calib[:kl_windows], progress)
    rows_out, options = [], {}
    modules = dict(hf.named_modules())
    per_tensor_file = {}
    for p, t in tqdm(tensors.items(), desc="formats", disable=not progress, leave=False):
        base = _base(modules, p).detach()
        idx, w = fisher.sample_rows(factors[p], base.shape[0], rows)
        ref = base[idx.to(base.device)].float()
        mine = _stored_rows(width, p, idx, modules)
        mine = None if mine is None else mine.to(ref.device)
        per_tensor_file[p] = fisher.sampled_damage(factors[p], mine - ref, idx, w) if mine is not None else 0.0
        menu = engines.menu(engine, t, group, imatrix=bool(imat), types=types)
        kappa = 1.0
        if engine != "llama.cpp" and mine is not None and current[p][0] in menu:
            plain = fisher.sampled_damage(factors[p], _round(ref, current[p][0], engine, group, None, None) - ref,
                                          idx, w)
            kappa = per_tensor_file[p] / plain if plain > 0 else 1.0
        im = imat.get(t.file_name)
        raw = {k: kappa * fisher.sampled_damage(factors[p], _round(ref, k, engine, group, tools, im) - ref, idx, w)
               for k in menu}
        options[p] = raw
    scale = _scales(units, tensors, per_tensor_file)
    opt = {p: [Option(k, b, scale[tensors[p].unit] * options[p][k])
               for k, b in engines.menu(engine, tensors[p], group, imatrix=bool(imat), types=types).items()]
           for p in tensors}
    n = sum(t.rows * t.cols for t in tensors.values())
    file_bytes = sum(c[1] for c in current.values())
    target = budget if isinstance(budget, int) else parse_budget(budget, file_bytes, n)
    outside = _outside_share(units)
    if outside >= 0.5:  # the damage is not in the decoder's matrices: they keep their formats
        for p, t in tensors.items():
            if t.role == "matrix" and current[p][0] in {o.kind for o in opt[p]}:
                opt[p] = [o for o in opt[p] if o.kind == current[p][0]]
    choice = allocate(opt, target)
    for p, t in tensors.items():
        now_kind, now_bytes = current[p]
        rows_out.append({"parameter": p, "file_name": t.file_name, "unit": t.unit, "role": t.role, "rows": t.rows,
                         "cols": t.cols, "n": t.rows * t.cols,
                         "from": now_kind, "to": choice[p].kind, "bytes_from": now_bytes, "bytes_to": choice[p].bytes,
                         "damage_from": scale[t.unit] * per_tensor_file[p], "damage_to": choice[p].damage})
    table = pd.DataFrame(rows_out)
    flags = flagged(width.checkpoint.format_report) if width.checkpoint is not None and \
        width.checkpoint.format_report is not None else pd.DataFrame(columns=["file_name"])
    source = width.checkpoint.path if width.checkpoint is not None else width.method
    p = Prescription(engine, str(Path(str(source)).name), table, units, target, "", {}, options=opt,
                     imatrix=str(imatrix) if imatrix else None,
                     meta={"kl_windows": kl_windows, "fisher_windows": fisher_windows, "rows": rows,
                           "quantizer": "llama.cpp" if tools and engine == "llama.cpp" else "qdiag",
                           "outside_share": outside, "group_size": group})
    p.text = _text(p, outside, list(flags.file_name))
    p.exports = exports(p, tensors, base_file, out_file, group)
    return p


def _group(width: Width) -> int | None:
    if width.checkpoint is not None:
        return width.checkpoint.group_size if width.checkpoint.format != "gguf" else 128
    return width.group_size if width.method not in gguf.TYPES else 128


def _tensors(model: nn.Module, width: Width, engine: str) -> dict[str, engines.Tensor]:
    hf, arch = unwrap(model), resolve(model)
    names = width.checkpoint.file_names if width.checkpoint is not None and width.checkpoint.format == "gguf" else {}
    if engine == "llama.cpp" and not names:
        names = tensor_names(model)
    out = {}
    for i in range(arch.n_layers):
        for name in arch.weights[i].values():
            m = hf.get_submodule(name)
            rows, cols = weight_matrix(m).shape
            unit = f"attention {i}" if name.startswith(arch.attn[i] + ".") else f"mlp {i}"
            file_name = names.get(f"{name}.weight", name) if engine == "llama.cpp" else name
            out[f"{name}.weight"] = engines.Tensor(f"{name}.weight", file_name, rows, cols, "matrix", unit)
    if engine == "llama.cpp":
        embed, head = hf.get_input_embeddings(), hf.get_output_embeddings()
        e = f"{arch.embed}.weight"
        out[e] = engines.Tensor(e, names.get(e, "token_embd.weight"), *embed.weight.shape, "embedding", "embedding")
        if head.weight is not embed.weight:
            h = f"{arch.unembed}.weight"
            out[h] = engines.Tensor(h, names.get(h, "output.weight"), *head.weight.shape, "head", "head")
    return out


def _current(width: Width, t: engines.Tensor, engine: str) -> tuple[str, int]:
    """The tensor's format in the configuration and its bytes there."""
    owner = t.parameter.removesuffix(".weight")
    if width.checkpoint is not None:
        kind = width.checkpoint.tensor_types.get(t.parameter, "F32")
        if width.checkpoint.format != "gguf":
            q = width.weights.tensors.get(owner)
            return f"w{width.checkpoint.bits}", int(q.nbytes) if q is not None else 2 * t.rows * t.cols
        kind = kind.upper()
        return kind, t.rows * llama_cpp.row_bytes(kind, t.cols)
    if t.role != "matrix":
        return "F16", 2 * t.rows * t.cols  # qdiag keeps embeddings in full precision, counted at 16 bits
    if engine == "llama.cpp":
        kind = width.method.upper() if width.method in gguf.TYPES else llama_cpp.stored_type(f"Q{width.bits}_K", t.cols)
        return kind, t.rows * llama_cpp.row_bytes(kind, t.cols)
    q = width.weights.tensors.get(owner)
    return f"w{width.bits}", int(q.nbytes) if q is not None else 2 * t.rows * t.cols


def _base(modules: dict, parameter: str) -> torch.Tensor:
    owner = modules[parameter.removesuffix(".weight")]
    return weight_matrix(owner) if hasattr(owner, "in_features") or type(owner).__name__ == "Conv1D" else owner.weight


def _stored_rows(width: Width, parameter: str, idx: torch.Tensor, modules: dict) -> torch.Tensor | None:
    """Rows ``idx`` of the configuration's value of a parameter; None where it keeps the base's."""
    owner = parameter.removesuffix(".weight")
    q = width.weights.tensors.get(owner)
    if q is not None:
        if isinstance(q, gguf.GGUFTensor):
            sub = gguf.GGUFTensor(q.data[idx.to(q.data.device)], q.qtype, q.in_features)
            return sub.dequantize(torch.float32).cpu()
        return q.dequantize(torch.float32)[idx.to(_device(q))].cpu()
    if parameter in width.weights.extras:
        return width.weights.extras[parameter].float()[idx.to(width.weights.extras[parameter].device)].cpu()
    return None


def _device(q) -> torch.device:
    from ..quant.swap import device_of

    return device_of(q) or torch.device("cpu")


def _round(ref: torch.Tensor, kind: str, engine: str, group: int | None, tools, imatrix) -> torch.Tensor:
    """``ref (rows, cols)`` in format ``kind`` as the engine would round it (see the module docstring)."""
    if engine == "llama.cpp":
        if kind in ("F32",):
            return ref
        if kind in ("F16", "BF16"):
            return ref.to(torch.float16 if kind == "F16" else torch.bfloat16).float()
        if tools is not None:
            return llama_cpp.quantize(ref, kind, tools, imatrix).dequantize(torch.float32).to(ref.device)
        if kind.lower() in gguf.TYPES:
            return gguf.quantize_matrix(ref, kind).dequantize(torch.float32)
        raise ValueError(f"{kind} needs llama.cpp's quantizer: build its tools ({llama_cpp.BUILD}) and set "
                         f"{llama_cpp.ENV}, or pass types= of {', '.join(t.upper() for t in gguf.TYPES)}")
    bits = int(kind.removeprefix("w"))
    g = None if group is None or group >= ref.shape[1] else group
    return rtn(ref, QuantSpec(bits, g, sym=False)).dequantize(torch.float32)


def _measure_units(model: nn.Module, width: Width, tensors: dict, windows: torch.Tensor,
                   progress: bool) -> pd.DataFrame:
    """Each unit's KL from the reference on ``windows`` (every token after the first) with only that
    unit taken from the configuration. The reference's layer inputs are recorded once, so a unit of
    layer ``l`` reruns only layers ``l`` and above (the layers below it are the reference's)."""
    hf = unwrap(model)
    device = next(hf.parameters()).device
    by_unit: dict[str, list[str]] = {}
    for p, t in tensors.items():
        by_unit.setdefault(t.unit, []).append(p)
    batches = []
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1].to(device)
        r = Rerun(model, {"input_ids": ids})
        final = r.hidden_from(0)  # the reference's last hidden state: what the head reads
        batches.append((ids, r, final, torch.log_softmax(project(hf, final)[0, :-1].float(), -1)))
    rows = []
    for unit, params in tqdm(by_unit.items(), desc="units", disable=not progress, leave=False):
        owners = [p.removesuffix(".weight") for p in params]
        mats = {o: width.weights.tensors[o] for o in owners if o in width.weights.tensors}
        extras = {p: width.weights.extras[p] for p in params if p in width.weights.extras}
        if unit == "embedding":  # a tied table is the head too: swapped in both places, as the file has it
            mats.update({o: q for o, q in width.weights.tensors.items() if q is mats.get(owners[0])})
        if not mats and not extras:
            rows.append({"unit": unit, "kl": 0.0, "top1_agreement": 1.0})
            continue
        kind, _, layer = unit.partition(" ")
        kl, agree, n = 0.0, 0.0, 0
        with QuantizedWeights({}, mats, extras=extras).applied(model):
            for ids, r, final, ref in batches:
                if kind == "embedding":  # its output feeds every layer: the whole model again
                    logits = hf(input_ids=ids, use_cache=False).logits
                elif kind == "head":
                    logits = project(hf, final)
                else:
                    logits = project(hf, r.hidden_from(int(layer)))
                q = torch.log_softmax(logits[0, :-1].float(), -1)
                kl += float((ref.exp() * (ref - q)).sum())
                agree += float((ref.argmax(-1) == q.argmax(-1)).sum())
                n += ref.shape[0]
        rows.append({"unit": unit, "kl": max(kl / n, 0.0), "top1_agreement": agree / n})
    return pd.DataFrame(rows)


def _scales(units: pd.DataFrame, tensors: dict, file_damage: dict[str, float]) -> dict[str, float]:
    """Per unit, measured KL over the Fisher damage of the configuration's own error; units without
    either take the median of their kind (attention, mlp), or 1."""
    fisher_by_unit: dict[str, float] = {}
    for p, t in tensors.items():
        fisher_by_unit[t.unit] = fisher_by_unit.get(t.unit, 0.0) + file_damage[p]
    kl = dict(zip(units.unit, units.kl))
    raw = {u: kl.get(u, 0.0) / d for u, d in fisher_by_unit.items() if d > 0 and kl.get(u, 0.0) > 0}
    out = {}
    for u in fisher_by_unit:
        if u in raw:
            out[u] = raw[u]
            continue
        kind = u.split()[0]
        same = [v for k, v in raw.items() if k.split()[0] == kind] or list(raw.values())
        out[u] = float(np.median(same)) if same else 1.0
    return out


def _outside_share(units: pd.DataFrame) -> float:
    total = float(units.kl.sum())
    if total <= 0:
        return 0.0
    return float(units[units.unit.isin(OUTSIDE)].kl.sum()) / total


def _text(p: Prescription, outside: float, not_quantization: list[str]) -> str:
    s = p.summary()
    t = p.tensors
    up = t[t.bytes_to > t.bytes_from]
    down = t[t.bytes_to < t.bytes_from]
    parts = []
    if outside >= 0.5:
        where = t[t.role.isin(OUTSIDE)]
        names = ", ".join(f"{r['file_name']} ({r['from']} -> {r['to']})" for r in where.to_dict("records"))
        parts.append(f"The damage is outside the decoder's matrices: the {' and '.join(sorted(set(where.role)))} "
                     f"carries {outside:.0%} of the KL the units cause one at a time. Re-quantize {names} from the "
                     "base; the decoder's matrices keep their formats.")
    elif up.empty:
        parts.append("The budget buys no format with less predicted damage: keep the configuration as it is.")
    else:
        grouped = up.groupby("to").file_name.apply(list)
        said = "; ".join(f"{k}: {_names(v)}" for k, v in grouped.items())
        parts.append(f"Give more bits where the measured damage is: {said}.")
        if len(down):
            parts.append(f"{len(down)} tensor{'s' if len(down) > 1 else ''} where little damage was measured "
                         f"take{'' if len(down) > 1 else 's'} fewer bits to pay for it.")
    parts.append(f"That is {s['bytes_to']:,} bytes ({s['bpw_to']:.2f} bits per weight) against {s['bytes_from']:,} "
                 f"({s['bpw_from']:.2f}); predicted KL from the reference {s['predicted_kl_to']:.4f} against "
                 f"{s['measured_kl_from']:.4f} measured now, units taken one at a time.")
    if not_quantization:
        parts.append(f"Not quantization damage, re-exported from the base by the command: {_names(not_quantization)}.")
    return " ".join(parts)


def _names(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def exports(p: Prescription, tensors: dict, base_file: str, out_file: str, group: int | None) -> dict[str, str]:
    """The engine's own input for the allocation: file name -> text."""
    alloc = p.allocation
    if p.engine == "llama.cpp":
        cmd = engines.llama_quantize_command(alloc, tensors, base_file, out_file, p.imatrix)
        return {"llama-quantize.sh": "#!/bin/sh\n# written by qdiag prescribe: the prescription as llama-quantize "
                                     "writes it, from the float file of the base\n" + engines.shell(cmd) + "\n"}
    if p.engine == "gptqmodel":
        return {"gptqmodel_config.json": json.dumps(engines.gptqmodel_config(alloc, tensors, group), indent=2) + "\n"}
    import yaml

    return {"recipe.yaml": yaml.safe_dump(engines.compressor_recipe(alloc, tensors, group), sort_keys=False)}


def prescribed_width(model: nn.Module, p: Prescription, allocation: dict[str, str] | None = None,
                     calib: torch.Tensor | None = None, tools=None, label: str = "prescribed") -> Width:
    """An allocation (the prescription's by default) applied to the base in qdiag, as the engine would
    write it: llama.cpp's quantizer per tensor (bytes equal to what the exported command writes),
    or qdiag's GPTQ at each module's width; for re-measuring it with any analysis."""
    allocation = allocation or p.allocation
    hf, arch = unwrap(model), resolve(model)
    modules = dict(hf.named_modules())
    tools = llama_cpp.find() if tools is None else (tools or None)
    linear = set(arch.linear_names())
    n = sum(int(np.prod(weight_matrix(modules[o]).shape)) for o in linear)
    if p.engine == "llama.cpp":
        imat = llama_cpp.read_imatrix(p.imatrix) if p.imatrix else {}
        names = dict(zip(p.tensors.parameter, p.tensors.file_name))
        q = {}
        for param, kind in allocation.items():
            base = _base(modules, param).detach()
            im = imat.get(names[param])
            if tools is not None:
                q[param.removesuffix(".weight")] = llama_cpp.quantize(base, kind, tools, im)
            else:
                q[param.removesuffix(".weight")] = gguf.quantize_matrix(base, kind)
        embed, head = hf.get_input_embeddings(), hf.get_output_embeddings()
        e = f"{arch.embed}"
        if head.weight is embed.weight and e in q:
            q[arch.unembed] = q[e]
        bits = sum(q[o].nbytes * 8 for o in linear) / n
        qw = QuantizedWeights({}, q)
    else:
        from ..quant.quantizer import quantize_model

        group = _group_of(p)
        plan = {param.removesuffix(".weight"): QuantSpec(int(kind.removeprefix("w")), group, True, "gptq")
                for param, kind in allocation.items()}
        qw = quantize_model(model, plan, calib, progress=False)
        bits = 8 * p.bytes_of(allocation) / n  # GPTQ's packed storage, as the menu counts it
    return Width(label, int(round(bits)), None, None, bits, 0.0, apply=qw.applied, weights=qw)


def _group_of(p: Prescription) -> int | None:
    g = p.meta.get("group_size", 128)
    return None if g in (None, -1) else g


def bpw(p: Prescription, allocation: dict[str, str]) -> float:
    """Bits per weight of an allocation of the prescription's tensors."""
    return 8 * p.bytes_of(allocation) / int(p.tensors.n.sum())

