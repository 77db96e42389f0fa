"""KV precision per head: the plan's ``precision:`` vocabulary and the byte rule that plan, cache and compiler share.

A head stores its keys and values at 16 bits (the model's dtype) or as integers (`QuantSpec`: 8, 4 or 2 bits,
groups of `group` elements sharing a 16-bit scale and minimum; `ilc.runtime.quant` does the arithmetic). Of the
slots a quantized head stores, the sinks and a recent ``residual`` stay in the model's dtype (as KIVI and KVQuant
keep them); tokens older than that are quantized in whole groups of `group` tokens (`quantized_tokens`), so a
per-channel key group always holds `group` tokens and a cache quantizes once per `group` decode steps.
A quantized STREAMING head stores its window the same way (slots counted from 0; its sinks are kept apart at 16
bits) and drops each packed group once none of its tokens is in the window (`window_packed_tokens`); it quantizes
both sides, and its window must reach past the residual by `STREAM_GROUPS` groups (`stream_layout_error`).
Followers' own keys hold only proximal tokens and stay 16-bit.
Torch-free, so that the plan module stays importable without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .heads import HeadKind, HeadSpec, Selection

BITS = (8, 4, 2)  # stored integer widths; 16 means "not quantized"
PARAM_BYTES = 2  # a scale or a minimum, 16-bit
DEFAULT_RESIDUAL = 128  # recent tokens of a quantized head kept in the model's dtype (KIVI's residual)
DEFAULT_GROUP = 32
STREAM_GROUPS = 4  # the fewest packed groups a quantized streaming head's window must reach past its residual: its
# 16-bit tail is allocated for the residual plus one group, so shorter windows save little or nothing

class Axis(str, Enum):
    """How elements are grouped under one scale: along head_dim, per token (TOKEN), or along tokens, per channel
    (CHANNEL: KIVI's keys, whose outliers sit in fixed channels)."""

    TOKEN = "token"
    CHANNEL = "channel"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class QuantSpec:
    """How one kind of vector (a head's keys or values) is stored: `bits` per element, groups of `group` elements
    along head_dim (TOKEN) or along tokens (CHANNEL)."""

    bits: int
    group: int = DEFAULT_GROUP
    axis: Axis = Axis.TOKEN

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits: expected one of {BITS}, got {self.bits!r}")
        if self.group < 1:
            raise ValueError(f"group: expected >= 1, got {self.group!r}")
        object.__setattr__(self, "axis", Axis(self.axis))

    def stored_bytes(self, tokens: int, head_dim: int) -> int:
        """Bytes `tokens` vectors of `head_dim` take: packed integers plus scales and minimums."""
        groups = tokens * -(-head_dim // self.group) if self.axis == Axis.TOKEN else -(-tokens // self.group) * head_dim
        return tokens * head_dim * self.bits // 8 + 2 * PARAM_BYTES * groups


_NAME = re.compile(r"^K(16|8|4|2)(c?)V(16|8|4|2)$")


@dataclass(frozen=True)
class HeadPrecision:
    """Bits of one head's keys and values (16: the model's dtype), e.g. ``K4cV2``: keys at 4 bits grouped per
    channel, values at 2 bits grouped per token."""

    key_bits: int = 16
    value_bits: int = 16
    key_axis: Axis = Axis.TOKEN
    group: int = DEFAULT_GROUP

    def __post_init__(self):
        object.__setattr__(self, "key_axis", Axis(self.key_axis))

    @property
    def name(self) -> str:
        return f"K{self.key_bits}{'c' if self.key_axis == Axis.CHANNEL else ''}V{self.value_bits}"

    @classmethod
    def parse(cls, name: str, group: int = DEFAULT_GROUP) -> "HeadPrecision":
        """``K4cV2`` -> HeadPrecision(4, 2, CHANNEL, group); raises ValueError naming the expected form."""
        m = _NAME.match(name) if isinstance(name, str) else None
        if m is None:
            raise ValueError(f"{name!r} is not a precision: expected K<bits>[c]V<bits> with bits in 16, 8, 4, 2 "
                             "(c: keys grouped per channel), e.g. K8V8 or K4cV2")
        return cls(int(m[1]), int(m[3]), Axis.CHANNEL if m[2] else Axis.TOKEN, group)

    @property
    def quantized(self) -> bool:
        return self.key_bits < 16 or self.value_bits < 16

    def key_spec(self) -> QuantSpec | None:
        return QuantSpec(self.key_bits, self.group, self.key_axis) if self.key_bits < 16 else None

    def value_spec(self) -> QuantSpec | None:
        return QuantSpec(self.value_bits, self.group) if self.value_bits < 16 else None

    def bytes_per_token(self, head_dim: int, tokens: int = 4096) -> float:
        """K + V bytes per token of one head when every token is quantized (scales and minimums included)."""
        return sum(vector_bytes(spec, tokens, head_dim, 0, 0) for spec in (self.key_spec(), self.value_spec())) / tokens

    def layout_error(self, head_dim: int) -> str | None:
        """Why `head_dim` cannot be stored this way, or None."""
        for spec in (self.key_spec(), self.value_spec()):
            if spec is None:
                continue
            if head_dim % (8 // spec.bits) or (spec.axis == Axis.TOKEN and head_dim % spec.group):
                return (f"{self.name} with group {self.group} needs head_dim divisible by {8 // spec.bits} and by the "
                        f"group, got head_dim {head_dim}")
        return None


FULL_PRECISION = HeadPrecision()


def quantized_tokens(stored: int, exact_prefix: int, residual: int, group: int) -> int:
    """Of `stored` slots of a quantized head, how many are held as integers: those after the first `exact_prefix`
    (the sinks) and before the last `residual`, in whole groups of `group` tokens."""
    return max(0, stored - exact_prefix - residual) // group * group


def window_packed_tokens(seen: int, residual: int, group: int, window: int) -> tuple[int, int]:
    """(packed tokens dropped, packed tokens kept) of a quantized STREAMING head's window storage after `seen`
    slots: `quantized_tokens` of them packed (from slot 0), less the whole groups that end before the window."""
    packed = quantized_tokens(seen, 0, residual, group)
    dropped = min(packed, max(0, seen - window) // group * group)
    return dropped, packed - dropped


def stream_layout_error(precision: "HeadPrecision", window: int, residual: int) -> str | None:
    """Why a STREAMING head with `window` cannot be stored at `precision`, or None (16-bit always can)."""
    if not precision.quantized:
        return None
    if precision.key_bits == 16 or precision.value_bits == 16:
        return f"{precision.name} on a streaming head: a quantized streaming head quantizes keys and values both"
    if window < residual + STREAM_GROUPS * precision.group:
        return (f"{precision.name} on a streaming head with window {window}: a window below the residual plus "
                f"{STREAM_GROUPS} groups ({residual} + {STREAM_GROUPS} x {precision.group}) has too little to "
                "quantize; keep it K16V16")
    return None


def vector_bytes(spec: QuantSpec | None, stored: int, head_dim: int, exact_prefix: int, residual: int,
                 dtype_bytes: int = 2) -> int:
    """Bytes of `stored` key (or value) vectors of one head and sequence under `spec` (None: all in the dtype)."""
    if spec is None:
        return stored * head_dim * dtype_bytes
    q = quantized_tokens(stored, exact_prefix, residual, spec.group)
    return spec.stored_bytes(q, head_dim) + (stored - q) * head_dim * dtype_bytes


def head_bytes(spec: HeadSpec, precision: HeadPrecision, context: int, sinks: int, head_dim: int,
               residual: int = DEFAULT_RESIDUAL, selection: Selection | None = None, dtype_bytes: int = 2) -> int:
    """The savings formula in bytes: K plus V bytes that one (layer, KV head) keeps for one sequence of `context`
    tokens (`heads.stored_vectors` counts the same vectors; this prices them at the head's precision)."""
    if spec.kind == HeadKind.STREAMING and precision.quantized:
        return sum(stream_side_bytes(side, context, sinks, spec.window, head_dim, residual, dtype_bytes)
                   for side in (precision.key_spec(), precision.value_spec()))
    kept = selection.kept(context, sinks) if selection is not None else context
    proximal = min(context, sinks + spec.window)
    keys = {HeadKind.FULL: kept}.get(spec.kind, proximal)
    values = proximal if spec.kind == HeadKind.STREAMING else kept
    key_spec = precision.key_spec() if spec.kind == HeadKind.FULL else None
    value_spec = precision.value_spec() if spec.kind != HeadKind.STREAMING else None
    return (vector_bytes(key_spec, keys, head_dim, sinks, residual, dtype_bytes)
            + vector_bytes(value_spec, values, head_dim, sinks, residual, dtype_bytes))


def stream_side_bytes(spec: QuantSpec, seen: int, sinks: int, window: int, head_dim: int, residual: int,
                      dtype_bytes: int = 2) -> int:
    """Bytes of a quantized STREAMING head's keys (or values) after `seen` slots: the sinks at 16 bits, the window
    storage's packed groups still holding a window token, and its tail (slots past the packed ones) at 16 bits."""
    dropped, kept = window_packed_tokens(seen, residual, spec.group, window)
    tail = seen - dropped - kept
    return (min(seen, sinks) + tail) * head_dim * dtype_bytes + spec.stored_bytes(kept, head_dim)


@dataclass(frozen=True)
class Precision:
    """A plan's ``precision:`` section: bits per (KV head, layer) (each carrying the one group size) and the
    residual window."""

    heads: tuple[tuple[HeadPrecision, ...], ...]  # heads[kv_head][layer]
    residual: int = DEFAULT_RESIDUAL

    def __post_init__(self):
        groups = {p.group for row in self.heads for p in row}
        if len(groups) > 1:
            raise ValueError(f"precision: every head shares one group size, got {sorted(groups)}")

    @property
    def group(self) -> int:
        """Elements per scale, the same for every head (the plan format writes it once)."""
        return next((p.group for row in self.heads for p in row), DEFAULT_GROUP)

    def of(self, layer: int, kv_head: int) -> HeadPrecision:
        return self.heads[kv_head][layer]

    def counts(self) -> dict[str, int]:
        """(layer, KV head) pairs per precision name."""
        out: dict[str, int] = {}
        for row in self.heads:
            for p in row:
                out[p.name] = out.get(p.name, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    @property
    def any_quantized(self) -> bool:
        return any(p.quantized for row in self.heads for p in row)



def uniform_precision(head_table, precision: HeadPrecision, residual: int = DEFAULT_RESIDUAL) -> Precision:
    """One precision for every head a plan's `head_table` [layer][kv_head] can quantize: FULL heads take it whole,
    followers its value bits (their keys are the anchor's), streaming heads stay 16-bit (their windows are usually
    shorter than the residual; calibration prices their bits head by head)."""
    def of(spec: HeadSpec) -> HeadPrecision:
        if spec.kind == HeadKind.FULL:
            return precision
        if spec.kind == HeadKind.FOLLOWER:
            return HeadPrecision(16, precision.value_bits, group=precision.group)
        return HeadPrecision(group=precision.group)

    heads = tuple(tuple(of(row[h]) for row in head_table) for h in range(len(head_table[0])))
    return Precision(heads, residual)
