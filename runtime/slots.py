"""Slot storage of a growing cache: the growth rule, and the packed storage of quantized heads.

`Slots` holds slots [0, total) of the keys (or values) of some heads of one layer at one `QuantSpec`: the first
`prefix` slots (every row's sinks) and the recent tail in the model's dtype, the slots between them as packed
integers with their scales (`ilc.runtime.quant`), quantized in whole groups as `bits.quantized_tokens` says.
`HeadSlots` gathers one `Slots` per precision for the heads of one layer and reads them back in head order.
Reading dequantizes (the reference path on CPU); nothing but the packed form is held for quantized slots.
"""

from __future__ import annotations

import torch

from .bits import Axis, QuantSpec, quantized_tokens
from .quant import Quantized, dequantize, quantize

GROWTH_MIN_SLOTS = 8  # the least a layer's storage grows by: a copy every 8 decode steps at short contexts


def grown_capacity(capacity_needed: int) -> int:
    """Slots to allocate when `capacity_needed` no longer fit: 1/128 more (at least GROWTH_MIN_SLOTS), so appends
    cost amortized O(1), never a full copy per decode step, and the slack stays in proportion to what is held
    (under 1% from 1k tokens on; at most 8 slots, 4% at 200 tokens)."""
    return capacity_needed + max(GROWTH_MIN_SLOTS, capacity_needed // 128)


def tensor_bytes(t: torch.Tensor | None, float_bytes: int | None = None) -> int:
    """Bytes of `t` as stored, or with floats counted at `float_bytes` each (a 16-bit cache's bytes from an fp32
    run: integers as stored, floats at 2 bytes)."""
    if t is None:
        return 0
    return t.numel() * (float_bytes if float_bytes and t.is_floating_point() else t.element_size())


def resized(t: torch.Tensor, capacity: int, used: int) -> torch.Tensor:
    """t [B, H, cap, X] with room for `capacity` slots along dim 2, its first `used` slots copied."""
    out = t.new_zeros(*t.shape[:2], capacity, *t.shape[3:])
    if used:
        out[:, :, :used] = t[:, :, :used]
    return out


class Slots:
    """Slots [0, total) of n heads at one `spec` (None: all in the model's dtype): [0, prefix) and the tail
    [prefix + packed, total) as floats, [prefix, prefix + packed) packed. Shapes: [B, n, slots, D]."""

    def __init__(self, spec: QuantSpec | None, residual: int, prefix: int, like: torch.Tensor):
        b, n, _, d = like.shape
        self.spec, self.residual, self.prefix = spec, residual, prefix if spec is not None else 0
        self.head = like.new_zeros(b, n, 0, d)  # slots [0, min(total, prefix))
        self.tail = like.new_zeros(b, n, 0, d)  # slots [prefix + packed, total) at [0, tail_len)
        self.tail_len = 0
        self.packed = 0  # tokens held as integers
        self.data = self.scale = self.minimum = None
        if spec is not None:
            self.data = like.new_zeros(b, n, 0, d * spec.bits // 8, dtype=torch.uint8)
            params = d // spec.group if spec.axis == Axis.TOKEN else d
            self.scale = like.new_zeros(b, n, 0, params, dtype=torch.float16)
            self.minimum = like.new_zeros(b, n, 0, params, dtype=torch.float16)

    @property
    def total(self) -> int:
        return self.head.shape[2] + self.packed + self.tail_len

    def append(self, x: torch.Tensor, flush: bool = True) -> None:
        """Append x [B, n, m, D] as slots [total, total + m); with `flush`, quantize what has left the residual."""
        k = min(x.shape[2], max(0, self.prefix - self.head.shape[2]))
        if k:
            self.head = torch.cat([self.head, x[:, :, :k]], dim=2)
            x = x[:, :, k:]
        m = x.shape[2]
        if m:
            if self.tail_len + m > self.tail.shape[2]:
                self.tail = resized(self.tail, grown_capacity(self.tail_len + m), self.tail_len)
            self.tail[:, :, self.tail_len:self.tail_len + m] = x
            self.tail_len += m
        if flush:
            self.flush()

    def flush(self) -> None:
        """Quantize the tail's oldest tokens as far as `quantized_tokens` allows, and shrink the tail."""
        if self.spec is None:
            return
        target = quantized_tokens(self.total, self.prefix, self.residual, self.spec.group)
        new = target - self.packed
        if new <= 0:
            return
        q = quantize(self.tail[:, :, :new], self.spec)
        rows = lambda tokens: tokens if self.spec.axis == Axis.TOKEN else tokens // self.spec.group  # noqa: E731
        if target > self.data.shape[2]:
            cap = -(-grown_capacity(target) // self.spec.group) * self.spec.group
            self.data = resized(self.data, cap, self.packed)
            self.scale, self.minimum = (resized(t, rows(cap), rows(self.packed)) for t in (self.scale, self.minimum))
        self.data[:, :, self.packed:target] = q.data
        self.scale[:, :, rows(self.packed):rows(target)] = q.scale
        self.minimum[:, :, rows(self.packed):rows(target)] = q.minimum
        self.packed = target
        rest = self.tail[:, :, new:self.tail_len]
        keep = self.residual + self.spec.group  # the most a tail holds when one token arrives (then it flushes)
        self.tail = resized(rest, max(keep, rest.shape[2]) if self.tail.shape[2] > 2 * keep else self.tail.shape[2],
                            rest.shape[2])
        self.tail_len = rest.shape[2]

    def read(self) -> torch.Tensor:
        """[B, n, total, D] in the model's dtype: the packed slots dequantized."""
        parts = [self.head]
        if self.packed:
            rows = self.packed if self.spec.axis == Axis.TOKEN else self.packed // self.spec.group
            q = Quantized(self.data[:, :, :self.packed], self.scale[:, :, :rows], self.minimum[:, :, :rows], self.spec)
            parts.append(dequantize(q, self.tail.dtype))
        parts.append(self.tail[:, :, :self.tail_len])
        return torch.cat(parts, dim=2)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.head, self.tail, self.data, self.scale, self.minimum) if t is not None]

    def nbytes(self, float_bytes: int | None = None) -> int:
        """Bytes allocated (growth slack included); `tensor_bytes` says what `float_bytes` does."""
        return sum(tensor_bytes(t, float_bytes) for t in self.tensors())

    def used_bytes(self) -> int:
        """Bytes of what the slots must keep: floats of the exact slots, integers and parameters of packed ones."""
        b, n, _, d = self.tail.shape
        exact = (self.head.shape[2] + self.tail_len) * d * self.tail.element_size()
        return b * n * (exact + (self.spec.stored_bytes(self.packed, d) if self.packed else 0))

    def map_batch(self, fn) -> None:
        self.head, self.tail = fn(self.head), fn(self.tail)
        if self.spec is not None:
            self.data, self.scale, self.minimum = fn(self.data), fn(self.scale), fn(self.minimum)


class HeadSlots:
    """One layer's keys (or values) of several heads, head i at specs[i] (None: the model's dtype): one `Slots`
    per distinct spec. `read` returns [B, H, total, D] in head order."""

    def __init__(self, specs: list[QuantSpec | None], residual: int, prefix: int, like: torch.Tensor):
        self.specs, self.residual = specs, residual
        self.groups: list[tuple[list[int], Slots]] = []
        for spec in dict.fromkeys(specs):
            positions = [i for i, s in enumerate(specs) if s == spec]
            self.groups.append((positions, Slots(spec, residual, prefix, like[:, :len(positions)])))

    def append(self, x: torch.Tensor, flush: bool = True) -> None:
        for positions, slots in self.groups:
            slots.append(x if len(self.groups) == 1 else x[:, positions], flush)

    def flush(self) -> None:
        for _, slots in self.groups:
            slots.flush()

    def read(self) -> torch.Tensor:
        if len(self.groups) == 1:
            return self.groups[0][1].read()
        parts = [(positions, slots.read()) for positions, slots in self.groups]
        first = parts[0][1]
        out = first.new_empty(first.shape[0], len(self.specs), *first.shape[2:])
        for positions, part in parts:
            out[:, positions] = part
        return out

    def rebuilt(self, x: torch.Tensor, prefix: int) -> "HeadSlots":
        """New slots holding x [B, H, T, D] (after token selection compacted them), quantized as far as allowed."""
        out = HeadSlots(self.specs, self.residual, prefix, x[:, :, :0])
        out.append(x)
        return out

    def tensors(self) -> list[torch.Tensor]:
        return [t for _, slots in self.groups for t in slots.tensors()]

    def nbytes(self, float_bytes: int | None = None) -> int:
        return sum(slots.nbytes(float_bytes) for _, slots in self.groups)

    def used_bytes(self) -> int:
        return sum(slots.used_bytes() for _, slots in self.groups)

    def map_batch(self, fn) -> None:
        for _, slots in self.groups:
            slots.map_batch(fn)
