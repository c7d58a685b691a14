"""llama.cpp's GGUF weight types: a matrix kept in its packed blocks and de-quantized when needed,
and qdiag's own quantizers for the types the ``gguf`` package can write (``q4_0`` ... ``q8_0``,
``tq1_0``, ``tq2_0``, ``mxfp4``), so a user can ask what ``Q4_0`` does to a model without llama.cpp.

Every GGUF type quantizes each row independently in blocks of 32 or 256 weights; a block holds
its codes and its (often quantized) scales, so a type's storage is ``type_size * 8 / block_size``
bits per weight, scales included. The legacy types de-quantize here in torch (on the weight's
device); the others through the ``gguf`` package's numpy code, on the CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as np_dequantize
from gguf.quants import quantize as np_quantize

# qdiag's own GGUF quantizers: the types the gguf package can quantize, by their lower-case names.
TYPES = {t.name.lower(): t for t in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
                                     GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1,
                                     GGMLQuantizationType.Q8_0, GGMLQuantizationType.TQ1_0,
                                     GGMLQuantizationType.TQ2_0, GGMLQuantizationType.MXFP4)}
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def qtype(name: str | int | GGMLQuantizationType) -> GGMLQuantizationType:
    """A GGUF type from its name (``"Q4_0"``, ``"q4_0"``) or number; raises on unknown names."""
    if isinstance(name, str):
        try:
            return GGMLQuantizationType[name.upper()]
        except KeyError:
            raise ValueError(f"unknown GGUF type {name!r}; qdiag quantizes with {', '.join(TYPES)}") from None
    return GGMLQuantizationType(name)


def block_size(t: str | int | GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype(t)][0]


def bits_per_weight(t: str | int | GGMLQuantizationType) -> float:
    """Storage bits per weight of a type, its block scales included (Q4_0: 4.5, Q8_0: 8.5)."""
    block, size = GGML_QUANT_SIZES[qtype(t)]
    return size * 8 / block


def nominal_bits(t: str | int | GGMLQuantizationType) -> int:
    """The integer width a type is named for (Q4_K: 4, IQ2_XS: 2, TQ1_0: 2, MXFP4: 4, F16: 16)."""
    t = qtype(t)
    if t in FLOAT_TYPES:
        return 16
    if t.name.startswith("TQ"):
        return 2  # ternary: 1.6-2.1 bits per weight
    digits = re.search(r"\d+", t.name)
    return int(digits.group()) if digits else round(bits_per_weight(t))


@dataclass
class GGUFTensor:
    """One (out, in) matrix in a GGUF type: its packed blocks, row by row, as in the file."""

    data: torch.Tensor  # uint8, (out, bytes per row)
    qtype: int
    in_features: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The de-quantized matrix (out, in) in ``dtype``, on the packed data's device."""
        t = GGMLQuantizationType(self.qtype)
        if t in _LEGACY:
            w = _dequantize_legacy(self.data, t)
        elif t in _K_QUANTS:
            w = _dequantize_k(self.data, t)
        else:
            w = torch.from_numpy(np_dequantize(self.data.cpu().numpy(), t)).to(self.data.device)
        return w.reshape(self.data.shape[0], self.in_features).to(dtype)

    def to(self, device: torch.device | str) -> GGUFTensor:
        return GGUFTensor(self.data.to(device), self.qtype, self.in_features)

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def quantize_matrix(w: torch.Tensor, t: str | int | GGMLQuantizationType) -> GGUFTensor:
    """An (out, in) matrix in a GGUF type, quantized by the gguf package (as llama.cpp would, without an
    importance matrix); ``in`` must be a multiple of the type's block size."""
    t = qtype(t)
    check(t, w.shape[1])
    packed = np_quantize(np.ascontiguousarray(w.detach().float().cpu().numpy()), t)
    # kept on the weight's device: the legacy types de-quantize there at each forward
    return GGUFTensor(torch.from_numpy(packed.reshape(w.shape[0], -1)).to(w.device), int(t), w.shape[1])


def check(t: str | int | GGMLQuantizationType, in_features: int, name: str = "weight") -> None:
    """Raise if a matrix with ``in_features`` inputs cannot be stored in type ``t``."""
    block = block_size(t)
    if in_features % block:
        raise ValueError(f"{qtype(t).name} stores rows in blocks of {block} weights, but {name} has "
                         f"in_features={in_features}; choose a type with blocks dividing it (q4_0 ... q8_0 use 32)")


# Legacy block layouts (llama.cpp's ggml-common.h): a float16 scale d, for *_1 a float16 minimum m,
# for Q5 32 high bits, then the low bits; Q4/Q5 pack element j in the low nibble of byte j and
# element j + 16 in the high nibble. Weight = d * (q - offset), or d * q + m.
_LEGACY = {GGMLQuantizationType.Q4_0: (False, False, 8), GGMLQuantizationType.Q4_1: (True, False, 0),
           GGMLQuantizationType.Q5_0: (False, True, 16), GGMLQuantizationType.Q5_1: (True, True, 0),
           GGMLQuantizationType.Q8_0: (False, False, None)}


def _dequantize_legacy(data: torch.Tensor, t: GGMLQuantizationType) -> torch.Tensor:
    has_min, has_high, offset = _LEGACY[t]
    block, size = GGML_QUANT_SIZES[t]
    blocks = data.reshape(data.shape[0], -1, size)

    def half(at: int) -> torch.Tensor:
        return blocks[..., at:at + 2].contiguous().view(torch.float16).float()

    d, at = half(0), 2
    m = None
    if has_min:
        m, at = half(2), 4
    if offset is None:  # Q8_0: signed bytes
        q = blocks[..., at:at + block].contiguous().view(torch.int8).float()
        return (d * q).reshape(data.shape[0], -1)
    high = None
    if has_high:
        qh = blocks[..., at:at + 4].contiguous().view(torch.int32)
        shifts = torch.arange(block, device=data.device, dtype=torch.int32)
        high = ((qh >> shifts) & 1).to(torch.uint8) << 4
        at += 4
    qs = blocks[..., at:at + block // 2]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1)
    if high is not None:
        q = q | high
    w = d * q.float() + m if has_min else d * (q.float() - offset)
    return w.reshape(data.shape[0], -1)


# The k-quants (llama.cpp's ggml-common.h; the same steps as the gguf package's numpy code, in torch on
# the data's device): super-blocks of 256 weights in 16 (Q2_K, Q3_K, Q6_K) or 8 (Q4_K, Q5_K) sub-blocks,
# each with its own scale (and minimum) packed in 4 or 6 bits, under one or two float16 factors.
_K_QUANTS = {GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q4_K,
             GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K}


def _bits(x: torch.Tensor, n: int, width: int, shifts: list[int], mask: int) -> torch.Tensor:
    """``x (n, m)`` bytes as ``(n, m // width, len(shifts), width)``, each shifted right and masked."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=x.device).reshape(1, 1, -1, 1)
    return (x.reshape(n, -1, 1, width) >> s) & mask


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Q4_K / Q5_K: eight 6-bit scales and eight 6-bit minima in 12 bytes
    d, m, m_d = scales.reshape(-1, 3, 4).unbind(1)
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), -1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), -1)
    return sc.float(), mn.float()


def _dequantize_k(data: torch.Tensor, t: GGMLQuantizationType) -> torch.Tensor:
    _, size = GGML_QUANT_SIZES[t]
    b = data.reshape(-1, size)
    n = b.shape[0]

    def f16(at: int) -> torch.Tensor:
        return b[:, at:at + 2].contiguous().view(torch.float16).float()

    if t == GGMLQuantizationType.Q2_K:  # scales (16) qs (64) d dmin
        sc, qs = b[:, :16], b[:, 16:80]
        dl = (f16(80) * (sc & 0x0F).float()).reshape(n, 16, 1)
        ml = (f16(82) * (sc >> 4).float()).reshape(n, 16, 1)
        q = _bits(qs, n, 32, [0, 2, 4, 6], 3).reshape(n, 16, 16).float()
        w = dl * q - ml
    elif t == GGMLQuantizationType.Q3_K:  # hmask (32) qs (64) scales (12) d
        hmask, qs, sc = b[:, :32], b[:, 32:96], b[:, 96:108]
        low = (sc[:, :8].reshape(n, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device)
               .reshape(1, 2, 1)).reshape(n, 16)
        high = (sc[:, 8:].reshape(n, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device)
                .reshape(1, 4, 1)).reshape(n, 16)
        scale = (((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int16) - 32).float()
        dl = (f16(108) * scale).reshape(n, 16, 1)
        ql = _bits(qs, n, 32, [0, 2, 4, 6], 3).reshape(n, 16, 16)
        qh = _bits(hmask, n, 32, list(range(8)), 1).reshape(n, 16, 16) ^ 1  # a set bit means no offset
        w = dl * (ql.to(torch.int16) - (qh << 2).to(torch.int16)).float()
    elif t in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K):  # d dmin scales (12) [qh (32)] qs
        sc, mn = _scale_min_k4(b[:, 4:16])
        d = (f16(0) * sc).reshape(n, -1, 1)
        dm = (f16(2) * mn).reshape(n, -1, 1)
        if t == GGMLQuantizationType.Q4_K:
            q = _bits(b[:, 16:], n, 32, [0, 4], 0x0F).reshape(n, -1, 32).float()
        else:
            qh, qs = b[:, 16:48], b[:, 48:]
            low = _bits(qs, n, 32, [0, 4], 0x0F).reshape(n, -1, 32)
            high = _bits(qh, n, 32, list(range(8)), 1).reshape(n, -1, 32)
            q = (low | (high << 4)).float()
        w = d * q - dm
    else:  # Q6_K: ql (128) qh (64) scales (16, signed) d
        ql, qh, sc = b[:, :128], b[:, 128:192], b[:, 192:208]
        d = (f16(208) * sc.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
        low = _bits(ql, n, 64, [0, 4], 0x0F).reshape(n, -1, 32)
        high = _bits(qh, n, 32, [0, 2, 4, 6], 3).reshape(n, -1, 32)
        q = ((low | (high << 4)).to(torch.int16) - 32).reshape(n, 16, -1).float()
        w = d * q
    return w.reshape(data.shape[0], -1)
