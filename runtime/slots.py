"""Slot storage of a growing cache: the growth rule, and the packed storage of quantized heads.

`Slots` holds slots [0, total) of the keys (or values) of some heads of one layer at one `QuantSpec`: the first
`prefix` slots (every row's sinks) and the recent tail in the model's dtype, the slots between them as packed
integers with their scales (`ilc.runtime.quant`), quantized in whole groups as `bits.quantized_tokens` says.
`StaticSlots` is the same layout preallocated for a `StaticPoDCache` (the recent slots in a ring), written by a
decode step with no host read. With a `window` (a quantized STREAMING head: no prefix, its sinks kept apart),
both drop each packed group once all its tokens are older than the window (`bits.window_packed_tokens`): `Slots`
shifts its packed rows down, `StaticSlots` keeps the packed groups in a ring just long enough. `HeadSlots`
gathers one `Slots` (or `StaticSlots`) per precision for the heads of one layer and reads them back in head order.
Reading dequantizes (the reference path on CPU); nothing but the packed form is held for quantized slots.
"""

from __future__ import annotations

import torch

from .bits import Axis, QuantSpec, quantized_tokens, window_packed_tokens
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


def ring_read(ring: torch.Tensor, window: int, lo: int, hi: int) -> torch.Tensor:
    """Slots [lo, hi) of a ring buffer [B, H, min(window, cap), D] (slot s at s % window)."""
    if hi <= lo:
        return ring[:, :, :0]
    return ring.index_select(2, torch.arange(lo, hi, device=ring.device) % window)


def ring_write(ring: torch.Tensor, window: int, new: torch.Tensor, start: int) -> None:
    """Store the last `window` of `new` (slots start..) at ring slots (slot % window): at most two slice copies."""
    n = new.shape[2]
    keep = min(n, window)
    src = new[:, :, n - keep:]
    first = (start + n - keep) % window
    head = min(keep, window - first)
    ring[:, :, first:first + head] = src[:, :, :head]
    if keep > head:  # wrapped past the end of the ring
        ring[:, :, :keep - head] = src[:, :, head:]


class Slots:
    """Slots [0, total) of n heads at one `spec` (None: all in the model's dtype): [0, prefix) and the tail
    [prefix + packed, total) as floats, [prefix, prefix + packed) packed. Shapes: [B, n, slots, D]. With a
    `window` (spec set, prefix 0), packed slots [0, dropped) are gone and the packed rows hold [dropped, packed)."""

    def __init__(self, spec: QuantSpec | None, residual: int, prefix: int, like: torch.Tensor,
                 window: int | None = None):
        b, n, _, d = like.shape
        if window is not None and (spec is None or prefix):
            raise ValueError("a windowed Slots quantizes (spec set) and has no prefix")
        self.spec, self.residual, self.prefix = spec, residual, prefix if spec is not None else 0
        self.stream_window = window
        self.dropped = 0  # packed tokens dropped from the front (windowed only)
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
        drop = 0 if self.stream_window is None else window_packed_tokens(self.total, self.residual, self.spec.group,
                                                                         self.stream_window)[0]
        skip = drop - self.packed
        if skip > 0:  # tokens already older than the window's groups (a long prompt) leave unquantized
            self.tail = self.tail[:, :, skip:self.tail_len].clone()
            self.tail_len -= skip
            self.packed = self.dropped = drop
        self._drop(min(drop, self.packed))  # before packing, so a window's rows never outgrow its groups
        if target > self.packed:
            self._pack(target)
        self._drop(drop)

    def _pack(self, target: int) -> None:
        """Quantize the tail's oldest tokens up to `target` packed tokens, and shrink the tail."""
        new = target - self.packed
        q = quantize(self.tail[:, :, :new], self.spec)
        rows = self._rows
        have, want = self.packed - self.dropped, target - self.dropped  # packed rows held now / after this flush
        if want > self.data.shape[2]:
            cap = -(-grown_capacity(want) // self.spec.group) * self.spec.group
            if self.stream_window is not None:  # the groups a window can hold (as `StaticSlots`)
                cap = max(want, -(-(self.stream_window - self.residual) // self.spec.group) * self.spec.group)
            self.data = resized(self.data, cap, have)
            self.scale, self.minimum = (resized(t, rows(cap), rows(have)) for t in (self.scale, self.minimum))
        self.data[:, :, have:want] = q.data
        self.scale[:, :, rows(have):rows(want)] = q.scale
        self.minimum[:, :, rows(have):rows(want)] = q.minimum
        self.packed = target
        rest = self.tail[:, :, new:self.tail_len]
        keep = self.residual + self.spec.group  # the most a tail holds when one token arrives (then it flushes)
        self.tail = resized(rest, max(keep, rest.shape[2]) if self.tail.shape[2] > 2 * keep else self.tail.shape[2],
                            rest.shape[2])
        self.tail_len = rest.shape[2]

    def _rows(self, tokens: int) -> int:
        """Scale rows of `tokens` packed tokens."""
        return tokens if self.spec.axis == Axis.TOKEN else tokens // self.spec.group

    def _drop(self, dropped: int) -> None:
        """Drop packed slots [self.dropped, dropped) (whole groups): the rows after them move to the front."""
        k = dropped - self.dropped
        if k <= 0:
            return
        have = self.packed - dropped
        for t, n, skip in ((self.data, have, k), (self.scale, self._rows(have), self._rows(k)),
                           (self.minimum, self._rows(have), self._rows(k))):
            t[:, :, :n] = t[:, :, skip:skip + n].clone()
        self.dropped = dropped

    @property
    def first(self) -> int:
        """The first slot `read` returns after the prefix (0 unless a window has dropped packed slots)."""
        return self.prefix + self.dropped

    def read(self) -> torch.Tensor:
        """[B, n, total - dropped, D] in the model's dtype, slots [0, prefix) then [first, total): the packed slots
        dequantized."""
        parts = [self.head]
        have = self.packed - self.dropped
        if have:
            rows = self._rows(have)
            q = Quantized(self.data[:, :, :have], self.scale[:, :, :rows], self.minimum[:, :, :rows], self.spec)
            parts.append(dequantize(q, self.tail.dtype))
        parts.append(self.tail[:, :, :self.tail_len])
        return torch.cat(parts, dim=2)

    def window_slots(self) -> tuple[int, torch.Tensor]:
        """(first slot, [B, n, total - first, D]) of windowed slots: what they still hold, in slot order."""
        return self.first, self.read()

    def kernel_layout(self) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
        """(16-bit head, 16-bit tail, prefix, packed, ring) as the quantized decode kernel reads them (a linear tail:
        ring 0)."""
        return self.head, self.tail, self.head.shape[2], self.packed, 0

    def packed_rows(self) -> tuple[int, int]:
        """(first, groups) as the quantized decode kernel maps packed slots to rows: shifted by the dropped slots."""
        return self.dropped, 0

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.head, self.tail, self.data, self.scale, self.minimum) if t is not None]

    def nbytes(self, float_bytes: int | None = None) -> int:
        """Bytes allocated (growth slack included); `tensor_bytes` says what `float_bytes` does."""
        return sum(tensor_bytes(t, float_bytes) for t in self.tensors())

    def used_bytes(self) -> int:
        """Bytes of what the slots must keep: floats of the exact slots, integers and parameters of packed ones."""
        b, n, _, d = self.tail.shape
        exact = (self.head.shape[2] + self.tail_len) * d * self.tail.element_size()
        have = self.packed - self.dropped
        return b * n * (exact + (self.spec.stored_bytes(have, d) if have else 0))

    def map_batch(self, fn) -> None:
        self.head, self.tail = fn(self.head), fn(self.tail)
        if self.spec is not None:
            self.data, self.scale, self.minimum = fn(self.data), fn(self.scale), fn(self.minimum)


class StaticSlots:
    """`Slots`' layout preallocated for `length` slots (a `StaticPoDCache`): slots [0, prefix) in `head`, as many
    packed slots as `length` can ever quantize, and the recent slots in the model's dtype in a ring of
    `residual + group` (slot s at s % ring): the residual plus the group being quantized. With spec None the ring
    is `length` long and holds every slot. A decode step (`write_step`) writes its token and requantizes, with no
    host read, the group that has just left the residual (its old integers written back on the other steps); a
    prompt (`write`) runs eagerly. Packed and quantized exactly as `Slots` does, at the same boundaries. Packed
    group k sits at packed row (k % groups) * group: without a window `groups` covers the length (k < groups);
    with one it covers the groups a window can hold (`groups` * group >= window - residual), a ring."""

    def __init__(self, spec: QuantSpec | None, residual: int, prefix: int, like: torch.Tensor, length: int,
                 window: int | None = None):
        b, n, _, d = like.shape
        if window is not None and (spec is None or prefix):
            raise ValueError("a windowed StaticSlots quantizes (spec set) and has no prefix")
        self.spec, self.residual, self.length, self.stream_window = spec, residual, length, window
        self.prefix = min(prefix, length) if spec is not None else 0
        group = spec.group if spec is not None else 1
        self.capacity = quantized_tokens(length, self.prefix, residual, group) if spec is not None else 0
        if window is not None:
            self.capacity = min(self.capacity, -(-(window - residual) // group) * group)
        self.groups = self.capacity // group
        self.window = min(length, residual + group) if spec is not None else length  # the ring's size
        self.head = like.new_zeros(b, n, self.prefix, d)
        self.ring = like.new_zeros(b, n, self.window, d)
        self.packed = 0  # tokens held as integers after the last eager `write` (decode steps count on the device)
        self.written = 0  # slots after the last eager `write`
        self.data = self.scale = self.minimum = None
        if self.capacity:
            self.data = like.new_zeros(b, n, self.capacity, d * spec.bits // 8, dtype=torch.uint8)
            rows = self.capacity if spec.axis == Axis.TOKEN else self.capacity // spec.group
            params = d // spec.group if spec.axis == Axis.TOKEN else d
            self.scale = like.new_zeros(b, n, rows, params, dtype=torch.float16)
            self.minimum = like.new_zeros(b, n, rows, params, dtype=torch.float16)

    def _rows(self, tokens):
        """Scale rows of the first `tokens` packed tokens."""
        return tokens if self.spec.axis == Axis.TOKEN else tokens // self.spec.group

    def _group_rows(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed rows, scale rows) of the packed groups k [n] (group k at row (k % groups) * group)."""
        at = k % self.groups
        tokens = (at[:, None] * self.spec.group + torch.arange(self.spec.group, device=k.device)).flatten()
        return tokens, tokens if self.spec.axis == Axis.TOKEN else at

    def _packed_count(self, position: torch.Tensor) -> torch.Tensor:
        """Tokens held as integers after the token at slot `position` (a device tensor): `quantized_tokens`."""
        return (position + 1 - self.prefix - self.residual).clamp(min=0) // self.spec.group * self.spec.group

    def write(self, start: int, x: torch.Tensor) -> None:
        """Store x [B, n, m, D] as slots [start, start + m) and quantize what has left the residual (eager)."""
        m = x.shape[2]
        total = start + m
        if start < self.prefix:
            k = min(m, self.prefix - start)
            self.head[:, :, start:start + k] = x[:, :, :k]
        if self.capacity:
            g = self.spec.group
            target = quantized_tokens(total, self.prefix, self.residual, g)
            if target > self.packed:
                first = max(self.packed, target - self.capacity)  # earlier groups would be overwritten in the ring
                lo = self.prefix + first  # the first slot to quantize: in the ring, or in x
                src = torch.cat([ring_read(self.ring, self.window, lo, start), x[:, :, max(0, lo - start):]], dim=2)
                q = quantize(src[:, :, :target - first], self.spec)
                tokens, rows = self._group_rows(torch.arange(first // g, target // g, device=x.device))
                self.data.index_copy_(2, tokens, q.data)
                self.scale.index_copy_(2, rows, q.scale)
                self.minimum.index_copy_(2, rows, q.minimum)
                self.packed = target
        ring_write(self.ring, self.window, x, start)
        self.written = total

    def read(self) -> torch.Tensor:
        """[B, n, written, D] in the model's dtype (eager, after `write`)."""
        parts = [self.head[:, :, :self.written]]
        if self.packed:
            rows = self._rows(self.packed)
            q = Quantized(self.data[:, :, :self.packed], self.scale[:, :, :rows], self.minimum[:, :, :rows], self.spec)
            parts.append(dequantize(q, self.ring.dtype))
        parts.append(ring_read(self.ring, self.window, self.prefix + self.packed, self.written))
        return torch.cat(parts, dim=2)

    def write_step(self, x: torch.Tensor, position: torch.Tensor) -> None:
        """Store one token x [B, n, 1, D] at slot `position` (0-d device tensor) with no host read."""
        self.ring.index_copy_(2, (position % self.window).view(1), x)
        if self.prefix:
            slot = position.clamp(max=self.prefix - 1).view(1)
            self.head.index_copy_(2, slot, torch.where(position < self.prefix, x, self.head.index_select(2, slot)))
        if self.capacity:
            self._quantize_due(position + 1)

    def _quantize_due(self, total: torch.Tensor) -> None:
        """Quantize the group that leaves the residual when the slot count reaches `total` (a device tensor), as
        `quantized_tokens` says; on other steps the same rows are written back unchanged."""
        g = self.spec.group
        beyond = total - self.prefix - self.residual  # slots past the residual
        due = (beyond >= g) & (beyond % g == 0)
        k = (beyond - g).clamp(min=0) // g  # the group (when due)
        tokens, rows = self._group_rows(k.view(1))
        slots = self.prefix + k * g + torch.arange(g, device=total.device)
        q = quantize(self.ring.index_select(2, slots % self.window), self.spec)
        self.data.index_copy_(2, tokens, torch.where(due, q.data, self.data.index_select(2, tokens)))
        for t, new in ((self.scale, q.scale), (self.minimum, q.minimum)):
            t.index_copy_(2, rows, torch.where(due, new, t.index_select(2, rows)))

    def read_static(self, position: torch.Tensor) -> torch.Tensor:
        """[B, n, length, D] as stored after the token at slot `position` (device tensor; slots past it are
        arbitrary): sinks, dequantized slots, the ring's recent ones."""
        slots = torch.arange(self.length, device=position.device)
        recent = self.ring.index_select(2, slots % self.window)
        if not self.capacity:
            return torch.cat([self.head, recent[:, :, self.prefix:]], dim=2) if self.prefix else recent
        packed = self._packed_count(position)
        rest = recent[:, :, self.prefix + self.capacity:]
        stored = torch.cat([self.head, dequantize(Quantized(self.data, self.scale, self.minimum, self.spec),
                                                  self.ring.dtype), rest], dim=2)
        return torch.where((slots < self.prefix + packed)[:, None], stored, recent)

    def _packed_slots(self, packed: torch.Tensor | int) -> torch.Tensor:
        """[capacity] the slot each packed row holds once `packed` tokens are quantized (-1: none yet)."""
        g = self.spec.group
        row = torch.arange(self.capacity, device=self.ring.device)
        done = torch.as_tensor(packed, device=row.device) // g  # groups quantized
        ring_row = row // g
        k = ring_row + self.groups * torch.div(done - 1 - ring_row, self.groups, rounding_mode="floor")
        return torch.where(k >= 0, self.prefix + k * g + row % g, -1)

    def window_slots(self) -> tuple[int, torch.Tensor]:
        """As `Slots.window_slots`, after the last eager `write`: the packed groups the ring still holds, in slot
        order, then the ring's slots not yet packed."""
        g = self.spec.group
        first = max(0, self.packed - self.capacity)
        parts = []
        if self.packed > first:
            tokens, rows = self._group_rows(torch.arange(first // g, self.packed // g, device=self.ring.device))
            parts.append(dequantize(Quantized(self.data.index_select(2, tokens), self.scale.index_select(2, rows),
                                              self.minimum.index_select(2, rows), self.spec), self.ring.dtype))
        parts.append(ring_read(self.ring, self.window, self.packed, self.written))
        return first, torch.cat(parts, dim=2)

    def window_read(self, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(vectors [B, n, capacity + ring, D] in the model's dtype, the slot of each [capacity + ring], -1 where
        none) after the token at slot `position` (a device tensor): the packed rows dequantized, then the ring's
        slots not yet packed. For windowed slots; masks pick the window."""
        packed = self._packed_count(position)
        recent = ring_slots(position, self.window)
        recent = torch.where(recent >= self.prefix + packed, recent, -1)
        parts = [self.ring]
        slots = [recent]
        if self.capacity:
            parts.insert(0, dequantize(Quantized(self.data, self.scale, self.minimum, self.spec), self.ring.dtype))
            slots.insert(0, self._packed_slots(packed))
        return torch.cat(parts, dim=2), torch.cat(slots)

    def kernel_layout(self) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
        """As `Slots.kernel_layout`; packed is the capacity (the kernel counts the packed slots on the device)."""
        return self.head, self.ring, self.prefix, self.capacity, self.window

    def packed_rows(self) -> tuple[int, int]:
        """As `Slots.packed_rows`: a windowed `StaticSlots` keeps its packed groups in a ring of `groups`."""
        return 0, self.groups if self.stream_window is not None else 0

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.head, self.ring, self.data, self.scale, self.minimum) if t is not None]

    def nbytes(self, float_bytes: int | None = None) -> int:
        return sum(tensor_bytes(t, float_bytes) for t in self.tensors())

    def map_batch(self, fn) -> None:
        self.head, self.ring = fn(self.head), fn(self.ring)
        if self.capacity:
            self.data, self.scale, self.minimum = fn(self.data), fn(self.scale), fn(self.minimum)


def ring_slots(last: torch.Tensor, size: int) -> torch.Tensor:
    """[size] the slot each entry of a ring (slot s at s % size) holds after writing slot `last` (0-d tensor): the
    latest p <= last with p = entry (mod size); negative where nothing was written yet."""
    entry = torch.arange(size, device=last.device)
    return last - torch.remainder(last - entry, size)


def spec_groups(specs: list[QuantSpec | None]) -> list[list[int]]:
    """Positions of the heads stored together (one per distinct spec, in order of first appearance): the groups of
    a `HeadSlots` built from `specs`."""
    return [[i for i, s in enumerate(specs) if s == spec] for spec in dict.fromkeys(specs)]


class HeadSlots:
    """One layer's keys (or values) of several heads, head i at specs[i] (None: the model's dtype): one `Slots`
    per distinct spec. `read` returns [B, H, total, D] in head order."""

    def __init__(self, specs: list[QuantSpec | None], residual: int, prefix: int, like: torch.Tensor,
                 length: int | None = None):
        """length: None for growing `Slots`; a number of slots for `StaticSlots` preallocated to it."""
        self.specs, self.residual = specs, residual
        self.groups: list[tuple[list[int], Slots | StaticSlots]] = []
        for positions in spec_groups(specs):
            spec = specs[positions[0]]
            part = like[:, :len(positions)]
            slots = Slots(spec, residual, prefix, part) if length is None else StaticSlots(spec, residual, prefix,
                                                                                          part, length)
            self.groups.append((positions, slots))

    def _parts(self, x: torch.Tensor):
        """(slots, x's heads that they hold) per group."""
        return [(slots, x if len(self.groups) == 1 else x[:, positions]) for positions, slots in self.groups]

    def append(self, x: torch.Tensor, flush: bool = True) -> None:
        for slots, part in self._parts(x):
            slots.append(part, flush)

    def write(self, start: int, x: torch.Tensor) -> None:
        """`StaticSlots` only: store x [B, H, m, D] as slots [start, start + m) (a prompt, eagerly)."""
        for slots, part in self._parts(x):
            slots.write(start, part)

    def write_step(self, x: torch.Tensor, position: torch.Tensor) -> None:
        """`StaticSlots` only: store one token x [B, H, 1, D] at the device slot `position` (a decode step)."""
        for slots, part in self._parts(x):
            slots.write_step(part, position)

    def flush(self) -> None:
        for _, slots in self.groups:
            slots.flush()

    def read(self) -> torch.Tensor:
        return self._in_head_order([(positions, slots.read()) for positions, slots in self.groups])

    def read_static(self, position: torch.Tensor) -> torch.Tensor:
        """`StaticSlots` only: [B, H, length, D] as stored after the token at device slot `position`."""
        return self._in_head_order([(positions, slots.read_static(position)) for positions, slots in self.groups])

    def _in_head_order(self, parts: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
        if len(parts) == 1:
            return parts[0][1]
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
