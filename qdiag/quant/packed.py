"""The int32-packed matrices of Hugging Face GPTQ, AWQ and compressed-tensors checkpoints, kept packed
and de-quantized at each forward (in torch, on the checkpoint's device).

GPTQ (AutoGPTQ / GPTQModel): ``qweight (in * bits / 32, out)`` packs consecutive inputs of one
output into an int32, lowest bits first; ``qzeros (G, out * bits / 32)`` packs zero points along
the outputs; ``scales (G, out)``; ``g_idx (in,)`` names each input's group (act-order permutes it).
The original format ("gptq", v1) stores each zero point minus one; "gptq_v2" stores it as is.
Weight = scale[g] * (q - zero[g]).

AWQ (AutoAWQ, GEMM layout): ``qweight (in, out * bits / 32)`` packs outputs, eight 4-bit values per
int32 in the order 0 2 4 6 1 3 5 7; ``qzeros (G, out * bits / 32)`` the same; ``scales (G, out)``;
group ``g`` holds inputs ``g * group_size`` onwards. Weight = scale * (q - zero).

Widths whose values straddle int32 words (GPTQ's 3 bits) are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # slot -> column, undoing the 0 2 4 6 1 3 5 7 packing


def check_bits(bits: int) -> None:
    if bits not in (2, 4, 8):
        raise ValueError(f"{bits}-bit packed checkpoints are not supported (values straddle int32 words); "
                         "qdiag reads 2-, 4- and 8-bit GPTQ and AWQ checkpoints")


def unpack(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The ``32 / bits`` values of every int32 of ``x``, lowest bits first, laid out along ``dim``."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=x.device, dtype=torch.int32)
    if dim == 0:
        v = (x.unsqueeze(1) >> shifts.view(1, per, 1)) & (2**bits - 1)  # (r, per, c)
        return v.reshape(-1, x.shape[1])
    v = (x.unsqueeze(2) >> shifts.view(1, 1, per)) & (2**bits - 1)  # (r, c, per)
    return v.reshape(x.shape[0], -1)


@dataclass
class GPTQTensor:
    """One GPTQ matrix as the checkpoint stores it."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    zero_offset: int = 1  # 1 for the original format (zeros stored minus one), 0 for gptq_v2

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight."""
        n_in, n_out = self.g_idx.shape[0], self.scales.shape[1]
        q = unpack(self.qweight, self.bits, 0)[:n_in].float()  # (in, out)
        z = (unpack(self.qzeros, self.bits, 1)[:, :n_out] + self.zero_offset).float()  # (G, out)
        g = self.g_idx.long()
        return (self.scales.float()[g] * (q - z[g])).t().to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.qzeros, self.scales, self.g_idx))


@dataclass
class AWQTensor:
    """One AWQ (GEMM layout) matrix as the checkpoint stores it."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    group_size: int
    bits: int = 4

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight."""
        order = torch.tensor(AWQ_REVERSE_ORDER, device=self.qweight.device)
        per = 32 // self.bits

        def columns(x: torch.Tensor) -> torch.Tensor:
            v = unpack(x, self.bits, 1).reshape(x.shape[0], -1, per)
            return v[:, :, order].reshape(x.shape[0], -1).float()

        q, z = columns(self.qweight), columns(self.qzeros)  # (in, out), (G, out)
        g = torch.arange(q.shape[0], device=q.device) // self.group_size
        return (self.scales.float()[g] * (q - z[g])).t().to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.qzeros, self.scales))


@dataclass
class CompressedTensor:
    """One matrix of a compressed-tensors checkpoint in its ``pack-quantized`` format (llm-compressor):
    ``weight_packed (out, in * bits / 32)`` packs consecutive inputs, each code stored as
    ``q + 2^(bits-1)`` (signed codes made unsigned); ``weight_scale (out, G)``; for asymmetric schemes
    ``weight_zero_point``, signed and packed the same way along the outputs; ``weight_g_idx`` when
    the groups follow act-order. Weight = scale * (q - zero)."""

    packed: torch.Tensor
    scale: torch.Tensor
    bits: int
    in_features: int
    group_size: int | None
    zero: torch.Tensor | None = None  # packed along the outputs
    g_idx: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight."""
        offset = 2 ** (self.bits - 1)
        out = self.scale.shape[0]
        q = (unpack(self.packed, self.bits, 1)[:, : self.in_features] - offset).float()
        if self.g_idx is not None:
            g = self.g_idx.long()
        else:
            g = torch.arange(self.in_features, device=q.device) // (self.group_size or self.in_features)
        w = q if self.zero is None else q - (unpack(self.zero, self.bits, 0)[:out] - offset).float()[:, g]
        return (self.scale.float()[:, g] * w).to(dtype)

    @property
    def nbytes(self) -> int:
        parts = (self.packed, self.scale, self.zero, self.g_idx)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)
