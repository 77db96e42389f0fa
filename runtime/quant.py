"""KV-cache quantization arithmetic: the one stored layout for keys and values at 8, 4 or 2 bits (`bits.QuantSpec`).

Asymmetric integers, as KIVI stores them: a group of `group` elements shares one scale and one minimum, both
stored in 16 bits; x ~ q * scale + minimum with q in [0, 2^bits - 1] (a float minimum, not an integer zero point:
a group whose range excludes 0, like an outlier channel of keys, keeps its full resolution).
- `Axis.TOKEN`: groups run along head_dim, one (scale, zero) per token and group of channels (values; keys
  optionally);
- `Axis.CHANNEL`: groups run along tokens, one (scale, zero) per channel and group of tokens (KIVI's keys).
Integers are packed in bytes along head_dim: 8 bits one per byte; 4 bits element d with element d + D/2 (low
nibble, high nibble); 2 bits elements d, d + D/4, d + D/2, d + 3D/4 (lowest bits first). A decode kernel unpacks a
byte with one shift and one mask per element and needs no gather.

torchao's affine primitives (`choose_qparams_affine` / `quantize_affine` / `dequantize_affine`) were tried: they
fit the per-group layout, but their asymmetric mapping uses an integer zero point over a range widened to include
0, and importing torchao 0.18 on a CPU machine prints load failures of its CUDA extensions and adds seconds to
the runtime's import, for ten lines of arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bits import Axis, QuantSpec


@dataclass
class Quantized:
    """Packed integers [..., T, D * bits / 8] uint8, and scale / minimum per group (16-bit): [..., T, D / group]
    for TOKEN, [..., T / group, D] for CHANNEL."""

    data: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    spec: QuantSpec

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.minimum))


def quantize(x: torch.Tensor, spec: QuantSpec, param_dtype: torch.dtype = torch.float16) -> Quantized:
    """x [..., T, D] -> Quantized. D must divide by 8 / bits and, for TOKEN, by `group`; T by `group` for
    CHANNEL (a cache keeps the remainder unquantized until a group fills)."""
    t, d = x.shape[-2:]
    grouped = _grouped(x.float(), spec)  # [..., groups..., group]
    lo = grouped.amin(-1, keepdim=True).to(param_dtype)
    levels = (1 << spec.bits) - 1
    scale = ((grouped.amax(-1, keepdim=True) - lo.float()) / levels).clamp_min(torch.finfo(param_dtype).tiny)
    scale = scale.to(param_dtype)
    q = ((grouped - lo.float()) / scale.float()).round().clamp(0, levels).to(torch.uint8)
    return Quantized(pack(_ungrouped(q, spec, t, d), spec.bits), scale.squeeze(-1), lo.squeeze(-1), spec)


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Quantized -> [..., T, D] in `dtype`."""
    ints = unpack(q.data, q.spec.bits).float()
    t, d = ints.shape[-2:]
    grouped = _grouped(ints, q.spec)
    x = grouped * q.scale.float().unsqueeze(-1) + q.minimum.float().unsqueeze(-1)
    return _ungrouped(x, q.spec, t, d).to(dtype)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 integers [..., D] below 2^bits -> [..., D * bits / 8]: the 8 / bits quarters (halves) of head_dim
    interleaved into one byte, lowest bits first."""
    per_byte = 8 // bits
    parts = q.chunk(per_byte, dim=-1)
    out = torch.zeros_like(parts[0])
    for i, part in enumerate(parts):
        out |= part << (i * bits)
    return out


def unpack(data: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: [..., D * bits / 8] -> [..., D] uint8."""
    mask = (1 << bits) - 1
    return torch.cat([(data >> (i * bits)) & mask for i in range(8 // bits)], dim=-1)


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    t, d = x.shape[-2:]
    if spec.axis == Axis.TOKEN:
        return x.reshape(*x.shape[:-1], d // spec.group, spec.group)  # [..., T, D/g, g]
    return x.reshape(*x.shape[:-2], t // spec.group, spec.group, d).transpose(-1, -2)  # [..., T/g, D, g]


def _ungrouped(x: torch.Tensor, spec: QuantSpec, t: int, d: int) -> torch.Tensor:
    if spec.axis == Axis.TOKEN:
        return x.reshape(*x.shape[:-2], d)
    return x.transpose(-1, -2).reshape(*x.shape[:-3], t, d)
