"""Weight-only fake quantization: a spec, the min-max quantizer, and integer codes that de-quantize.

The pure core is ``quantize(w, scale, zero, maxq)`` as in the original GPTQ code; ``rtn`` finds
min-max parameters group-wise along the input dimension and returns a ``QTensor``.
Shapes: a weight is ``(out, in)``; with ``G = ceil(in / group_size)`` groups, ``scale`` and
``zero`` are ``(out, G)``. A group size that does not divide ``in`` leaves a ragged last group of
``in % group_size`` columns; it has its own scale and zero point and is counted in ``avg_bits``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import gguf

# rtn, gptq, hqq and awq quantize to any width and group size; a GGUF type (q4_0, ...) fixes both.
METHODS = ("rtn", "gptq", "hqq", "awq", *gguf.TYPES)
CALIBRATED = ("gptq", "awq")
FULL_PRECISION = 16
SCALE_BITS = 16  # scales are counted as 16-bit floats, as in packed GPTQ/AWQ checkpoints


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one weight matrix. ``bits=16`` means leave it in full precision.

    ``group_size=None`` is per output channel (one group spanning all inputs).
    """

    bits: int = 4
    group_size: int | None = 128
    sym: bool = True
    method: str = "rtn"

    def __post_init__(self) -> None:
        bits = parse_bits(self.bits)
        object.__setattr__(self, "bits", bits)
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive integer or None (per channel), got {self.group_size!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.is_gguf and not self.is_full_precision and (
                self.bits != gguf.nominal_bits(self.method) or self.group_size != gguf.block_size(self.method)):
            raise ValueError(f"{self.method} is {gguf.nominal_bits(self.method)}-bit in blocks of "
                             f"{gguf.block_size(self.method)}; build it with QuantSpec.gguf({self.method!r})")

    @classmethod
    def gguf(cls, name: str) -> QuantSpec:
        """llama.cpp's type ``name`` (q4_0, q8_0, ...): its width, block size and symmetry."""
        t = gguf.qtype(name)
        if t.name.lower() not in gguf.TYPES:
            raise ValueError(f"qdiag cannot quantize to {t.name}; it quantizes to {', '.join(gguf.TYPES)}")
        return cls(gguf.nominal_bits(t), gguf.block_size(t), not t.name.endswith("_1"), t.name.lower())

    def at_bits(self, bits: int) -> QuantSpec:
        """The same quantizer at another width (a GGUF type: the legacy type of that width, q8_0 for 8)."""
        if not self.is_gguf:
            return QuantSpec(bits, self.group_size, self.sym, self.method)
        same = [t for t in gguf.TYPES if t[0] == "q" and gguf.nominal_bits(t) == bits]
        if not same:
            raise ValueError(f"no GGUF type of {bits} bits to go with {self.method}; "
                             f"qdiag writes {', '.join(gguf.TYPES)}")
        return QuantSpec.gguf(same[0])

    @property
    def is_gguf(self) -> bool:
        return self.method in gguf.TYPES

    @property
    def is_full_precision(self) -> bool:
        return self.bits == FULL_PRECISION

    def check(self, in_features: int, name: str = "weight") -> None:
        """Raise if the group size cannot apply to a matrix with ``in_features`` inputs."""
        if self.is_gguf and not self.is_full_precision:
            gguf.check(self.method, in_features, name)
        if not self.is_full_precision and self.group_size is not None and self.group_size > in_features:
            raise ValueError(
                f"group_size {self.group_size} is larger than in_features={in_features} of {name}; "
                f"use a group size of at most {in_features}, or None for per-channel scales"
            )

    def label(self) -> str:
        if self.is_full_precision:
            return "fp"
        if self.is_gguf:
            return self.method
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        return f"{self.method}-w{self.bits}-{g}-{'sym' if self.sym else 'asym'}"


def parse_bits(bits: int | str) -> int:
    """Validate a bit width: an integer in 2..8, or 16 / "fp" / "fp16" for full precision."""
    if isinstance(bits, str):
        b = bits.strip().lower()
        if b in ("fp", "fp16", "bf16", "fp32", "16"):
            return FULL_PRECISION
        if not b.isdigit():
            raise ValueError(f"bits must be an integer in 2..8 or 'fp', got {bits!r}")
        bits = int(b)
    if isinstance(bits, bool) or not isinstance(bits, int) or not (2 <= bits <= 8 or bits == FULL_PRECISION):
        raise ValueError(f"bits must be in 2..8, or 16 / 'fp' for full precision; got {bits!r}")
    return bits


def n_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(in_features / group_size)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero, 0, maxq)``; all arguments broadcast. ``out``:
    written in place there (GPTQ's column loop, where allocating is most of the cost)."""
    if out is None:
        return torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return torch.div(x, scale, out=out).round_().add_(zero).clamp_(0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``scale * (q - zero)``; ``out``: written in place there."""
    if out is None:
        return scale * (q - zero)
    return torch.sub(q, zero, out=out).mul_(scale)


def minmax_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point over the last dim of ``w`` (..., n), the GPTQ min-max convention.

    The range always contains 0. Symmetric: zero point at ``(maxq + 1) / 2``, e.g. 8 for 4 bits.
    """
    maxq = 2**bits - 1
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, in) -> (out, G, g); a ragged last group is padded by repeating its own last column."""
    out, cols = w.shape
    g = cols if group_size is None else group_size
    pad = (-cols) % g
    if pad:
        # replicate-padding repeats a value already in the group, so its min and max are unchanged
        w = F.pad(w.unsqueeze(0), (0, pad), mode="replicate").squeeze(0)
    return w.reshape(out, -1, g)


def expand(p: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """Per-group parameters (out, G) -> per-column (out, in)."""
    g = in_features if group_size is None else group_size
    return p.repeat_interleave(g, dim=1)[:, :in_features]


@dataclass
class QTensor:
    """Integer codes plus per-group scale and zero point of one weight matrix (out, in).

    Codes of 4 bits or fewer are packed two per byte, so the codes of a float32 model take an
    eighth of its weight bytes at 2-4 bits and a quarter at 5-8 bits.
    """

    codes: torch.Tensor  # uint8, (out, in) or packed (out, ceil(in / 2))
    scale: torch.Tensor  # (out, G), float32
    zero: torch.Tensor  # (out, G), float32
    bits: int
    group_size: int | None
    in_features: int

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group_size: int | None) -> QTensor:
        q = q.to(torch.uint8)
        in_features = q.shape[1]
        if bits <= 4:
            if in_features % 2:
                q = F.pad(q, (0, 1))
            q = q[:, 0::2] | (q[:, 1::2] << 4)
        return cls(q, scale.float(), zero.float(), bits, group_size, in_features)

    def int_codes(self) -> torch.Tensor:
        """Unpacked codes, (out, in), int16."""
        if self.bits <= 4:
            lo, hi = self.codes & 0x0F, self.codes >> 4
            q = torch.stack((lo, hi), dim=-1).reshape(self.codes.shape[0], -1)[:, : self.in_features]
        else:
            q = self.codes
        return q.to(torch.int16)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The de-quantized weight, (out, in), in ``dtype``: ``scale * (q - zero)`` per group, with the
        group's parameters broadcast rather than expanded to the matrix's size (a swapped-in
        weight is de-quantized at every forward, so its temporaries set the peak memory)."""
        q = self.int_codes()
        out, n = q.shape
        g = n if self.group_size is None else self.group_size
        G = self.scale.shape[1]
        if G * g != n:  # a ragged last group: pad it to a full one, cut the padding off after
            q = F.pad(q, (0, G * g - n))
        w = q.view(out, G, g).float().sub_(self.zero.to(q.device)[..., None]).mul_(self.scale.to(q.device)[..., None])
        return w.view(out, G * g)[:, :n].to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


@dataclass
class Scaled:
    """A quantized ``W diag(s)`` read back as ``Q(W diag(s)) diag(s)^-1`` (AWQ): the per-input-channel
    scale ``s`` is folded into the previous operation when deployed, so it costs no storage."""

    base: QTensor
    col_scale: torch.Tensor  # (in,)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        base = self.base.dequantize(torch.float32)
        return (base / self.col_scale.to(base.device)).to(dtype)

    @property
    def nbytes(self) -> int:
        return self.base.nbytes


def rtn(w: torch.Tensor, spec: QuantSpec) -> QTensor | gguf.GGUFTensor:
    """Round-to-nearest quantization of an (out, in) matrix: min-max group-wise along inputs, or
    llama.cpp's block format for a GGUF type (which also rounds to nearest, with its own scales)."""
    spec.check(w.shape[1])
    if spec.is_gguf:
        return gguf.quantize_matrix(w, spec.method)
    maxq = 2**spec.bits - 1
    wg = grouped(w.float(), spec.group_size)
    scale, zero = minmax_params(wg, spec.bits, spec.sym)
    q = quantize(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), maxq)
    q = q.reshape(w.shape[0], -1)[:, : w.shape[1]]
    return QTensor.from_codes(q, scale, zero, spec.bits, spec.group_size)


def bits_per_weight(spec: QuantSpec, in_features: int) -> float:
    """Storage bits per weight of one matrix: codes, plus a 16-bit scale per group and, when
    asymmetric, a ``bits``-wide zero point per group (symmetric zero points are implied)."""
    if spec.is_full_precision:
        return float(FULL_PRECISION)
    if spec.is_gguf:
        return gguf.bits_per_weight(spec.method)
    # HQQ's zero point is a 16-bit float like the scale; a symmetric one is implied
    per_group = SCALE_BITS + (SCALE_BITS if spec.method == "hqq" else 0 if spec.sym else spec.bits)
    return spec.bits + per_group * n_groups(in_features, spec.group_size) / in_features
