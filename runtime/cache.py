"""A transformers `Cache` that stores a PoD plan's layout and really holds fewer bytes.

Per layer, in slot coordinates (slot = position in the padded batch, the same for every row), by head kind
(`ilc.runtime.heads`):
- values of every token for its FULL and FOLLOWER heads (``values``, indexed by `value_pos`);
- full keys for its FULL heads (anchors and dense heads);
- FOLLOWER heads: only their own keys of the sink tokens (the first ``sinks`` real tokens of each row) and of
  the last ``window`` slots (a ring buffer). A key is overwritten as its token leaves the window; the distant
  keys come from the anchor layer;
- STREAMING heads: keys and values of the sinks and of their own last ``window`` slots (one ring per window
  size), nothing else; a quantized streaming head (the plan's precision:) keeps its window in windowed `Slots`
  instead of a ring (`QuantizedPoDLayer`).

`update` cannot return a dense key tensor for such a layer, so it returns a `PoDKeys` view that the
registered attention function (`ilc.runtime.attention`) understands. With a plan's token selection, the first
decode step has `ilc.runtime.selection` choose the tokens to keep and compacts the value heads' storage
(`PoDCache.select`); from then on their slots are *stored* slots (logical slot - ``state.shift``) while streaming
heads keep logical slots. Storage grows in chunks of 1/128 of its size, at least 8 slots (amortized O(1) appends,
slack in proportion to what is held), never by a full copy per decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .bits import FULL_PRECISION, HeadPrecision
from .heads import HeadKind, HeadSpec, Mode, Selection, stored_vectors
from .plan import Plan, PlanError
from .selection import SelectionShape, choose_tokens, selection_shape
from .slots import HeadSlots, Slots, StaticSlots, grown_capacity, resized, ring_read, ring_write, tensor_bytes


@dataclass
class CacheState:
    """What every layer of one cache shares: padding offsets, the scores-mode query scratch, selection state."""

    sinks: int
    window: int
    mode: Mode
    skip_threshold: float | None
    row_start: torch.Tensor | None = None  # [B] first real (stored) slot of each row (left padding); None = none
    row_start_min: int = 0  # smallest row start, kept on the host (kernel loop bounds without a device sync)
    row_start_max: int = 0  # largest row start, on the host (when every row's sinks are stored)
    stream_row_start: torch.Tensor | None = None  # [B] first real logical slot (streaming heads); None = none
    stream_row_start_max: int = 0
    selection: Selection | None = None
    selected: bool = False  # selection has run (it runs once)
    shift: int = 0  # logical slot - stored slot of value heads and followers' own keys (after selection)
    observed: dict = field(default_factory=dict)  # layer -> (last prompt queries [B, Hq, w, D], scaling)
    replay_scores: dict = field(default_factory=dict)  # layer -> [B, Hkv, T] (the replay scorer, `ilc.runtime.replay`)
    queries: dict = field(default_factory=dict)  # anchor layer -> its query of the current forward ("scores" mode)
    kernel_scratch: dict = field(default_factory=dict)  # buffers the Triton kernels reuse across layers and steps
    skipped_rows: int = 0  # follower query rows whose distant attention was skipped (skip_threshold)
    follower_rows: int = 0
    kernels: bool | None = None  # Triton kernels: None = on CUDA tensors, True = always, False = never
    residual: int = 0  # recent tokens a quantized head keeps in the model's dtype (the plan's precision:)
    reference_only: bool = False  # quantized heads and followers: the PyTorch reference path serves all

    def set_stored_row_start(self, row_start: torch.Tensor | None) -> None:
        """Row starts in stored slots (value heads, followers); `set_row_start` sets both kinds before selection."""
        self.row_start, self.row_start_min, self.row_start_max = _row_bounds(row_start)

    def set_stream_row_start(self, row_start: torch.Tensor | None) -> None:
        """Row starts in logical slots (streaming heads)."""
        self.stream_row_start, _, self.stream_row_start_max = _row_bounds(row_start)

    def row_starts(self, batch: int, device, streaming: bool = False) -> torch.Tensor:
        """[B] each row's first real slot (stored slots; logical ones for streaming heads), zeros without padding."""
        rs = self.stream_row_start if streaming else self.row_start
        return torch.zeros(batch, dtype=torch.long, device=device) if rs is None else rs.to(device)


def _row_bounds(row_start: torch.Tensor | None) -> tuple[torch.Tensor | None, int, int]:
    """(row starts, or None when no row is padded; smallest; largest), the bounds read on the host once."""
    if row_start is None or not bool((row_start > 0).any()):
        return None, 0, 0
    return row_start, int(row_start.min()), int(row_start.max())


@dataclass
class PoDKeys:
    """What `update` hands to the attention function instead of a dense key tensor (not a tensor itself)."""

    layer: "PoDLayer"
    start: int  # stored slot of the first new token (= its logical slot unless selection has run)
    total: int  # stored slots after this update
    recent_start: int  # first slot any new query sees through its window
    chunk_recent: torch.Tensor | None = None  # recent keys of a multi-token update (the ring has dropped some)
    stream_recent: dict = field(default_factory=dict)  # StreamGroup index -> (recent_start, keys, values)

    @property
    def state(self) -> CacheState:
        return self.layer.state

    @property
    def logical_start(self) -> int:
        """Logical slot of the first new token: the coordinates of streaming heads."""
        return self.start + self.state.shift

    @property
    def logical_total(self) -> int:
        return self.total + self.state.shift

    @property
    def recent_keys(self) -> torch.Tensor | None:
        """[B, Hf, n, D] own keys of follower heads for slots [recent_start, total). A one-token update copies
        them out of the ring only if asked: the Triton decode kernel reads the ring in place."""
        if self.chunk_recent is None and self.layer.follower_heads:
            self.chunk_recent = ring_read(self.layer.ring_keys, self.state.window, self.recent_start, self.total)
        return self.chunk_recent

    def streaming_recent(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(recent_start, keys, values [B, n, slots, D]) of stream group `index` for the logical slots its queries
        see."""
        if index not in self.stream_recent:
            group = self.layer.stream_groups[index]
            if group.quantized:
                self.stream_recent[index] = group.stored_window()
                return self.stream_recent[index]
            total = self.logical_total
            lo = max(0, total - group.window)
            self.stream_recent[index] = (lo, ring_read(group.ring_k, group.window, lo, total),
                                         ring_read(group.ring_v, group.window, lo, total))
        return self.stream_recent[index]


@dataclass
class StreamGroup:
    """The STREAMING heads of one layer that share a window size and a precision: their sinks and one ring each
    of K and V, or, quantized, windowed `Slots` (`StaticSlots` in a static cache) each of K and V."""

    window: int
    heads: list[int]  # KV heads
    precision: HeadPrecision = FULL_PRECISION
    sink_k: torch.Tensor | None = None  # [B, n, S, D]: each row's first `sinks` real tokens
    sink_v: torch.Tensor | None = None
    ring_k: torch.Tensor | None = None  # [B, n, min(window, capacity), D], slot s at s % window
    ring_v: torch.Tensor | None = None
    key_slots: Slots | StaticSlots | None = None  # quantized: the window's keys (sinks apart, at 16 bits)
    value_slots: Slots | StaticSlots | None = None
    select: slice | torch.Tensor | None = None  # picks `heads` out of [B, Hkv, ...] (set at initialization)

    @property
    def quantized(self) -> bool:
        return self.precision.quantized

    def tensors(self) -> tuple:
        if self.quantized:
            slots = [] if self.key_slots is None else self.key_slots.tensors() + self.value_slots.tensors()
            return self.sink_k, self.sink_v, *slots
        return self.sink_k, self.sink_v, self.ring_k, self.ring_v

    def stored_window(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Quantized: (first slot, keys, values [B, n, slots, D]) of what the window's slots hold, dequantized."""
        (first, keys), (_, values) = self.key_slots.window_slots(), self.value_slots.window_slots()
        return first, keys, values

    def map_batch(self, fn) -> None:
        if self.sink_k is None:
            return
        self.sink_k, self.sink_v = fn(self.sink_k), fn(self.sink_v)
        if self.quantized:
            self.key_slots.map_batch(fn)
            self.value_slots.map_batch(fn)
        else:
            self.ring_k, self.ring_v = fn(self.ring_k), fn(self.ring_v)


class LogicalLength:
    """Cache-layer bookkeeping for layers that store fewer slots than they have seen: report the logical length
    (what masks, positions and `generate` must see), never the stored one."""

    seen: int

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1


class PoDLayer(LogicalLength, CacheLayerMixin):
    """One layer's storage under a plan: see the module docstring."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, layer_idx: int, specs: tuple[HeadSpec, ...], state: CacheState, cache: "PoDCache"):
        super().__init__()
        self.layer_idx = layer_idx
        self.state = state
        self.cache = cache
        self.specs = specs  # specs[kv_head]: kind, anchor layer, window
        self.anchors = [s.anchor for s in specs]  # anchors[kv_head] -> layer whose keys serve distant tokens
        self.anchor_heads = [h for h, s in enumerate(specs) if s.kind == HeadKind.FULL]
        self.follower_heads = [h for h, s in enumerate(specs) if s.kind == HeadKind.FOLLOWER]
        self.stream_heads = [h for h, s in enumerate(specs) if s.kind == HeadKind.STREAMING]
        self.value_heads = [h for h, s in enumerate(specs) if s.kind != HeadKind.STREAMING]
        self.value_pos = {h: i for i, h in enumerate(self.value_heads)}  # KV head -> index in `values`
        kind = lambda h: (specs[h].window, self._precision(h))  # noqa: E731  what a stream group shares
        kinds = sorted({kind(h) for h in self.stream_heads}, key=lambda k: (k[0], k[1].name))
        self.stream_groups = [StreamGroup(w, [h for h in self.stream_heads if kind(h) == (w, p)], p)
                              for w, p in kinds]
        self.seen = 0
        self.capacity = 0
        self.anchor_keys: torch.Tensor | None = None  # [B, Ha, cap, D]
        self.sink_keys: torch.Tensor | None = None  # [B, Hf, S, D]
        self.ring_keys: torch.Tensor | None = None  # [B, Hf, min(W, cap), D], slot s at s % W
        self.kernel_meta: dict = {}  # device -> head-index tensors for the Triton launches (built once)

    def _precision(self, kv_head: int) -> HeadPrecision:
        """The head's bits (16 in a layer without the plan's precision:)."""
        return FULL_PRECISION

    # ------------------------------------------------------------------------------------------------ storage
    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        b, _, _, d = key_states.shape
        self.batch, self.head_dim = b, d
        new = lambda heads, n: key_states.new_zeros(b, len(heads), n, d)  # noqa: E731
        self.values = new(self.value_heads, 0)
        self.anchor_keys = new(self.anchor_heads, 0)
        if self.follower_heads:
            self.sink_keys = new(self.follower_heads, self.state.sinks)
            self.ring_keys = new(self.follower_heads, 0)
        for group in self.stream_groups:
            group.sink_k, group.sink_v = new(group.heads, self.state.sinks), new(group.heads, self.state.sinks)
            if not group.quantized:
                group.ring_k, group.ring_v = new(group.heads, 0), new(group.heads, 0)
            group.select = _head_selector(group.heads, self.device)
        self._value_select = _head_selector(self.value_heads, self.device)
        self._anchor_select = _head_selector(self.anchor_heads, self.device)
        self._follower_select = _head_selector(self.follower_heads, self.device)
        self.is_initialized = True

    def _reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        cap = grown_capacity(total)
        stored = self.seen - self.state.shift  # slots in use (fewer than seen once selection has compacted)
        self.values = resized(self.values, cap, stored)
        self.anchor_keys = resized(self.anchor_keys, cap, stored)
        self._grow_rings(cap)
        self.capacity = cap

    def _grow_rings(self, cap: int) -> None:
        if self.follower_heads:
            self.ring_keys = _grow_ring(self.ring_keys, min(self.state.window, cap))
        for group in self.stream_groups:
            if not group.quantized:
                group.ring_k = _grow_ring(group.ring_k, min(group.window, cap))
                group.ring_v = _grow_ring(group.ring_v, min(group.window, cap))

    def _write(self, start: int, total: int, keys: torch.Tensor | None, values: torch.Tensor | None) -> None:
        """Store slots [start, total) of the FULL heads' keys [B, Ha, n, D] and the value heads' values."""
        if values is not None:
            self.values[:, :, start:total] = values
        if keys is not None:
            self.anchor_keys[:, :, start:total] = keys

    def stored_keys(self, total: int) -> torch.Tensor:
        """[B, Ha, total, D] keys of the FULL heads (anchors and dense heads), stored slots [0, total)."""
        return self.anchor_keys[:, :, :total]

    def stored_values(self, total: int) -> torch.Tensor:
        """[B, Hv, total, D] values of the FULL and FOLLOWER heads, stored slots [0, total)."""
        return self.values[:, :, :total]

    def _values_for_attention(self, total: int) -> torch.Tensor | None:
        """What `update` hands the attention function as values: a view of the stored values."""
        return self.stored_values(total)

    @property
    def keys(self):  # transformers' generic helpers read `.keys`; a PoD layer has no dense key tensor
        return self.anchor_keys

    @keys.setter
    def keys(self, value):
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        state = self.state
        if n == 1 and state.selection is not None and not state.selected and self.seen:
            self.cache.select()  # the first decode step: the prompt is complete
        logical = self.seen  # streaming heads' slots
        start = logical - state.shift  # slots of value heads and followers' own keys
        total = start + n
        self._reserve(total)
        self._write(start, total, key_states[:, self._anchor_select] if self.anchor_heads else None,
                    value_states[:, self._value_select] if self.value_heads else None)
        recent, recent_start = None, total
        window = state.window
        if self.follower_heads:
            own = key_states[:, self._follower_select]
            recent_start = max(0, start - window + 1)
            if n > 1:  # read what the chunk's queries need before the ring write drops it
                recent = _with_ring(self.ring_keys, window, recent_start, start, own)
            _store_sinks(self.sink_keys, own, start, state.row_start, state.row_start_max, state.sinks)
            ring_write(self.ring_keys, window, own, start)
        view = PoDKeys(self, start, total, recent_start, recent)
        for index, group in enumerate(self.stream_groups):
            k, v = key_states[:, group.select], value_states[:, group.select]
            for dest, new in ((group.sink_k, k), (group.sink_v, v)):
                _store_sinks(dest, new, logical, state.stream_row_start, state.stream_row_start_max, state.sinks)
            if group.quantized:
                if n > 1:  # the chunk attends to its own tokens at 16 bits, as in the quantized FULL heads
                    lo, old_k, old_v = group.stored_window()
                    view.stream_recent[index] = (lo, torch.cat([old_k, k], 2), torch.cat([old_v, v], 2))
                self._write_stream(group, logical, k, v)
                continue
            if n > 1:  # as for followers: the chunk's recent vectors, read before the ring write drops any
                lo = max(0, logical - group.window + 1)
                view.stream_recent[index] = (lo, _with_ring(group.ring_k, group.window, lo, logical, k),
                                             _with_ring(group.ring_v, group.window, lo, logical, v))
            ring_write(group.ring_k, group.window, k, logical)
            ring_write(group.ring_v, group.window, v, logical)
        self.seen = logical + n
        return view, self._values_for_attention(total)

    def compact(self, total: int, kept: int, index: dict[int, torch.Tensor]) -> None:
        """Keep, of the first `total` slots, the `kept` slots index[kv_head] [B, kept] of every value head (their
        keys too for FULL heads), in that order; followers' own recent keys move to the same stored slots.
        Streaming heads are untouched. Called once, by `PoDCache.select`."""
        cap = grown_capacity(kept + 1)
        gather = lambda t, idx: t.gather(2, idx[..., None].expand(-1, -1, -1, t.shape[-1]))  # noqa: E731
        values = keys = None
        if self.value_heads:
            values = gather(self.stored_values(total), torch.stack([index[h] for h in self.value_heads], 1))
        if self.anchor_heads:
            keys = gather(self.stored_keys(total), torch.stack([index[h] for h in self.anchor_heads], 1))
        self._replace(keys, values, cap)
        if self.follower_heads:
            w = self.state.window
            n = min(w, total)
            recent = ring_read(self.ring_keys, w, total - n, total)
            self.ring_keys = self.ring_keys.new_zeros(*recent.shape[:2], min(w, cap), recent.shape[-1])
            ring_write(self.ring_keys, w, recent, kept - n)
        self.capacity = cap
        self.kernel_meta = {}

    def _replace(self, keys: torch.Tensor | None, values: torch.Tensor | None, cap: int) -> None:
        """Storage holding only the compacted keys and values [B, H, kept, D], with room for `cap` slots."""
        if values is not None:
            self.values = resized(values, cap, values.shape[2])
        if keys is not None:
            self.anchor_keys = resized(keys, cap, keys.shape[2])

    # ------------------------------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        self.__init__(self.layer_idx, self.specs, self.state, self.cache)

    def _map_batch(self, fn) -> None:
        for name in ("values", "anchor_keys", "sink_keys", "ring_keys"):
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, fn(t))
        for group in self.stream_groups:
            group.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t[indices, ...])

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "ilc's PoD cache cannot be cropped: followers drop their own keys as tokens leave the window, so the "
            "state before those tokens cannot be restored. Assisted/speculative decoding is not supported."
        )

    def offload(self):
        raise NotImplementedError("ilc's PoD cache does not support offloading")

    # ---------------------------------------------------------------------------------------------- accounting
    def nbytes(self, float_bytes: int | None = None) -> int:
        """Bytes this layer holds (allocated storage, slack included); with `float_bytes`, floats counted at that
        size (`slots.tensor_bytes`)."""
        tensors = [self.values, self.anchor_keys, self.sink_keys, self.ring_keys]
        tensors += [t for group in self.stream_groups for t in group.tensors()]
        return sum(tensor_bytes(t, float_bytes) for t in tensors)

    def _vector_bytes(self) -> int:
        """Bytes of one head-token vector times the batch."""
        return self.batch * self.head_dim * self.dtype.itemsize

    def used_bytes(self) -> int:
        """Bytes of the head-token vectors this layer must keep for `seen` slots (no slack)."""
        if not self.is_initialized:
            return 0
        stored = self.seen - self.state.shift  # slots of value heads (fewer than seen after selection)
        vectors = sum(stored_vectors(spec, self.seen if spec.kind == HeadKind.STREAMING else stored, self.state.sinks)
                      for spec in self.specs)
        return vectors * self._vector_bytes()

    def dense_bytes(self) -> int:
        """What a dense cache would hold for the same slots."""
        if not self.is_initialized:
            return 0
        return 2 * len(self.specs) * self.seen * self._vector_bytes()



class QuantizedPoDLayer(PoDLayer):
    """A layer with quantized heads (the plan's ``precision:``): the FULL heads' keys and the value heads' values
    live in `HeadSlots` (each head at its own bits; packed integers beyond the sinks and the residual window) and
    `stored_keys` / `stored_values` dequantize them. Followers' own keys hold proximal tokens only and stay in the
    model's dtype; a quantized streaming head keeps its window in windowed `Slots` (its stream group's
    `key_slots` / `value_slots`, sinks apart at 16 bits). A decode step reads the packed slots in the Triton kernel
    (`ilc.kernels.quant_decode`, plans without followers) or dequantized by the PyTorch reference; the static cache
    preallocates the same layout (`static_cache.StaticQuantizedPoDLayer`). While a plan's token selection is due,
    nothing is quantized: selection compacts the prompt first, then it is quantized once. A prompt chunk attends to
    its own tokens unquantized, as KIVI's prefill does (`fresh` keeps them until the layer's next update; they are
    stored quantized), so every query sees exactly its sinks and residual at 16 bits, as calibration priced it."""

    def __init__(self, layer_idx: int, specs: tuple[HeadSpec, ...], state: CacheState, cache: "PoDCache",
                 precisions: tuple[HeadPrecision, ...]):
        self.precisions = precisions  # precisions[kv_head] (the stream groups read them)
        super().__init__(layer_idx, specs, state, cache)
        self.key_slots: HeadSlots | None = None
        self.value_slots: HeadSlots | None = None
        self.fresh: tuple[int, torch.Tensor | None, torch.Tensor | None] | None = None  # (start, keys, values)

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.specs, self.state, self.cache, self.precisions)

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)  # `values` / `anchor_keys` stay empty
        new = lambda heads: key_states.new_zeros(self.batch, len(heads), 0, self.head_dim)  # noqa: E731
        if self.anchor_heads:
            self.key_slots = self._new_slots([self.precisions[h].key_spec() for h in self.anchor_heads],
                                             new(self.anchor_heads))
        if self.value_heads:
            self.value_slots = self._new_slots([self.precisions[h].value_spec() for h in self.value_heads],
                                               new(self.value_heads))
        for group in self.stream_groups:
            if group.quantized:
                like = new(group.heads)
                group.key_slots = self._new_stream_slots(group.precision.key_spec(), group.window, like)
                group.value_slots = self._new_stream_slots(group.precision.value_spec(), group.window, like)

    def _precision(self, kv_head: int) -> HeadPrecision:
        return self.precisions[kv_head]

    def _new_slots(self, specs, like: torch.Tensor) -> HeadSlots:
        """Storage of some heads, head i at specs[i]; `like` [B, n, 0, D] gives dtype and device."""
        return HeadSlots(specs, self.state.residual, self._exact_prefix(), like)

    def _new_stream_slots(self, spec, window: int, like: torch.Tensor) -> Slots:
        """A quantized stream group's keys (or values): its window's slots from 0, packed groups dropped as they
        leave the window (its sinks are kept apart, at 16 bits)."""
        return Slots(spec, self.state.residual, 0, like, window=window)

    def _write_stream(self, group: StreamGroup, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a quantized stream group's keys and values [B, n, m, D] of logical slots start.."""
        group.key_slots.append(keys)
        group.value_slots.append(values)

    def _exact_prefix(self) -> int:
        """Slots every row keeps in the model's dtype at the start: its sinks, after the longest left padding."""
        return self.state.sinks + self.state.row_start_max

    def _reserve(self, total: int) -> None:  # `HeadSlots` grow on their own; the rings as in `PoDLayer`
        if total > self.capacity:
            self.capacity = grown_capacity(total)
            self._grow_rings(self.capacity)

    def _write(self, start, total, keys, values) -> None:
        flush = self.state.selection is None or self.state.selected
        for slots, new in ((self.key_slots, keys), (self.value_slots, values)):
            if new is not None:
                slots.append(new, flush)
        self.fresh = (start, keys, values) if total - start > 1 else None

    def stored_keys(self, total: int) -> torch.Tensor:
        return self._with_fresh(self.key_slots.read(), 1)[:, :, :total]

    def stored_values(self, total: int) -> torch.Tensor:
        return self._with_fresh(self.value_slots.read(), 2)[:, :, :total]

    def _with_fresh(self, stored: torch.Tensor, which: int) -> torch.Tensor:
        """`stored` (a fresh read) with the last prompt chunk's slots at 16 bits (`fresh[which]`)."""
        if self.fresh is not None and self.fresh[which] is not None:
            start, new = self.fresh[0], self.fresh[which]
            stored[:, :, start:start + new.shape[2]] = new
        return stored

    def _values_for_attention(self, total: int) -> None:
        """None: dequantizing every value is left to the path that reads them (`stored_values`); the quantized
        decode kernel reads the packed slots instead."""
        return None

    def release_prompt(self) -> None:
        """Drop the 16-bit copy of the last prompt chunk (the next update drops it too)."""
        self.fresh = None

    def _replace(self, keys, values, cap) -> None:
        self.fresh = None
        if keys is not None:
            self.key_slots = self.key_slots.rebuilt(keys, self._exact_prefix())
        if values is not None:
            self.value_slots = self.value_slots.rebuilt(values, self._exact_prefix())

    def _map_batch(self, fn) -> None:
        super()._map_batch(fn)
        self.fresh = None  # read only by the update that wrote it
        for slots in (self.key_slots, self.value_slots):
            if slots is not None:
                slots.map_batch(fn)

    def _slots(self) -> list[HeadSlots]:
        return [s for s in (self.key_slots, self.value_slots) if s is not None]

    def nbytes(self, float_bytes: int | None = None) -> int:
        fresh = sum(tensor_bytes(t, float_bytes) for t in (self.fresh or (None,))[1:])
        return super().nbytes(float_bytes) + sum(s.nbytes(float_bytes) for s in self._slots()) + fresh

    def used_bytes(self) -> int:
        """As `PoDLayer.used_bytes`, with the FULL heads' keys and all values counted as `HeadSlots` hold them."""
        if not self.is_initialized:
            return 0
        stored = self.seen - self.state.shift
        own = sum(stored_vectors(spec, stored, self.state.sinks) - stored for spec in self.specs
                  if spec.kind == HeadKind.FOLLOWER)  # followers' own keys
        own += sum(stored_vectors(spec, self.seen, self.state.sinks) for h, spec in enumerate(self.specs)
                   if spec.kind == HeadKind.STREAMING and not self.precisions[h].quantized)
        streams = [g for g in self.stream_groups if g.quantized]
        own += sum(len(g.heads) for g in streams) * 2 * min(self.seen, self.state.sinks)  # their sinks
        slots = self._slots() + [s for g in streams for s in (g.key_slots, g.value_slots)]
        return own * self._vector_bytes() + sum(s.used_bytes() for s in slots)

def _store_sinks(dest: torch.Tensor, own: torch.Tensor, start: int, row_start: torch.Tensor | None,
                 row_start_max: int, sinks: int) -> None:
    """Copy into `dest` [B, H, S, D] the vectors of each row's first `sinks` real tokens in an update of `own`
    [B, H, n, D] at slots start.. (row_start: each row's first real slot in the same coordinates)."""
    if sinks == 0 or start >= row_start_max + sinks:  # every row's sinks are stored (no device read needed)
        return
    if row_start is None:
        if start < sinks:
            m = min(sinks, start + own.shape[2]) - start
            dest[:, :, start:start + m] = own[:, :, :m]
        return
    for b, rs in enumerate(row_start.tolist()):
        lo, hi = max(rs, start), min(rs + sinks, start + own.shape[2])
        if hi > lo:
            dest[b, :, lo - rs:hi - rs] = own[b, :, lo - start:hi - start]


def _head_selector(heads: list[int], device) -> slice | torch.Tensor:
    """Index for picking `heads` out of [B, H, ...]: a slice (a view, no copy) when they are consecutive, else a
    device index tensor built once (not a host list turned into a tensor on every update)."""
    if heads and heads == list(range(heads[0], heads[-1] + 1)):
        return slice(heads[0], heads[-1] + 1)
    return torch.tensor(heads, dtype=torch.long, device=device)


def _with_ring(ring: torch.Tensor, window: int, lo: int, start: int, new: torch.Tensor) -> torch.Tensor:
    """Slots [lo, start) from the ring followed by the update's `new` vectors (read before the ring write)."""
    old = ring_read(ring, window, lo, start)
    return torch.cat([old, new], dim=2) if old.shape[2] else new


def _grow_ring(ring: torch.Tensor, size: int) -> torch.Tensor:
    """The ring with room for `size` slots (its window, or the capacity while that is smaller)."""
    if ring.shape[2] >= size:
        return ring
    grown = ring.new_zeros(*ring.shape[:2], size, ring.shape[-1])
    grown[:, :, :ring.shape[2]] = ring  # while ring < window, no slot has wrapped yet
    return grown


def _reference_only(plan: Plan) -> bool:
    """Whether only the PyTorch reference serves the plan: quantized heads beside followers (the Triton kernels do
    not read followers of quantized anchors yet)."""
    return plan.quantized and plan.kind_counts()["follower"] > 0


class PoDCache(Cache):
    """The compressed KV cache for one `Plan`; one instance per generation (what `generate` owns)."""

    def __init__(self, plan: Plan, mode: str | None = None, skip_threshold: float | None = None,
                 kernels: bool | None = None):
        if kernels and plan.selection is not None:
            raise PlanError("kernels=True: the Triton kernels do not run token selection (the plan's selection:) "
                            "yet; pass kernels=None or False")
        if kernels and _reference_only(plan):
            raise PlanError("kernels=True: the Triton kernels do not run followers of quantized anchors (the "
                            "plan's precision: with followers) yet; pass kernels=None or False")
        self.plan = plan
        self.state = CacheState(
            sinks=plan.sinks,
            window=plan.window,
            mode=Mode(mode or plan.mode),
            skip_threshold=plan.skip_threshold if skip_threshold is None else skip_threshold,
            kernels=kernels,
            selection=plan.selection,
            residual=plan.precision.residual if plan.precision else 0,
            reference_only=_reference_only(plan),
        )
        table = plan.head_table()
        super().__init__(layers=[self._new_layer(i, specs) for i, specs in enumerate(table)])
        # Scores mode: which layers must leave their query for followers, and who reads it last.
        self.last_reader: dict[int, int] = {}
        for i, specs in enumerate(table):
            for spec in specs:
                if spec.kind == HeadKind.FOLLOWER:
                    self.last_reader[spec.anchor] = max(self.last_reader.get(spec.anchor, -1), i)

    def _new_layer(self, layer_idx: int, specs: tuple[HeadSpec, ...]) -> PoDLayer:
        precisions = self.plan.layer_precisions(layer_idx)
        if any(p.quantized for p in precisions):
            return QuantizedPoDLayer(layer_idx, specs, self.state, self, precisions)
        return PoDLayer(layer_idx, specs, self.state, self)

    def set_row_start(self, row_start: torch.Tensor | None) -> None:
        """Record each row's first real slot (left padding); sinks are each row's first real tokens."""
        self.state.set_stored_row_start(row_start)
        self.state.set_stream_row_start(row_start)

    @torch.no_grad()
    def select(self) -> None:
        """Run the plan's token selection now on what the cache holds; the first decode step does it on its own.
        Runs once; a plan without selection does nothing. `ilc.runtime.selection` chooses, per layer with FULL
        heads, the slots to keep; every layer then compacts (a FOLLOWER keeps its anchor's choice)."""
        state = self.state
        first = self.layers[0]
        if state.selection is None or state.selected or not first.is_initialized or first.seen == 0:
            return  # nothing to select from yet: selection stays due
        state.selected = True
        rs = state.row_starts(first.batch, first.device)
        shape = selection_shape(first.seen, rs, state.row_start_min, state.sinks, state.selection)
        if shape is not None:
            chosen = {layer.layer_idx: self._choose(layer, shape, rs) for layer in self.layers if layer.anchor_heads}
            for layer in self.layers:
                layer.compact(shape.total, shape.kept, {h: self._kept_slots(layer, h, chosen)
                                                        for h in layer.value_heads})
            state.shift = shape.total - shape.kept
            state.set_stored_row_start(shape.stored_row_start)
        state.observed.clear()
        state.replay_scores.clear()

    def _choose(self, layer: "PoDLayer", shape: SelectionShape, rs: torch.Tensor) -> torch.Tensor:
        """[B, Ha, K] slots kept by the FULL heads of `layer`, scored with its observed prompt queries."""
        if self.state.replay_scores:
            scores = self.state.replay_scores[layer.layer_idx]
            if scores.shape[-1] != shape.total:
                raise PlanError(f"the replay scorer scored {scores.shape[-1]} prompt tokens, the cache holds "
                                f"{shape.total}: give the prompt in one forward (as generate() does)")
            return choose_tokens(shape, layer.stored_keys(shape.total), None, 1.0, rs, self.state.selection,
                                 scores[:, layer.anchor_heads])
        q_heads, scaling = self.state.observed.get(layer.layer_idx, (None, 1.0))
        if q_heads is not None:  # [B, Hq, w, D] -> [B, Ha, g, w, D], the query heads of each FULL head
            group = q_heads.shape[1] // len(layer.specs)
            q_heads = q_heads.unflatten(1, (len(layer.specs), group))[:, layer.anchor_heads]
        return choose_tokens(shape, layer.stored_keys(shape.total), q_heads, scaling, rs, self.state.selection)

    def _kept_slots(self, layer: "PoDLayer", h: int, chosen: dict[int, torch.Tensor]) -> torch.Tensor:
        """[B, K] slots kept for KV head `h` of `layer`: its own choice (FULL) or its anchor's (FOLLOWER)."""
        source = layer if layer.specs[h].kind == HeadKind.FULL else self.layers[layer.specs[h].anchor]
        return chosen[source.layer_idx][:, source.anchor_heads.index(h)]

    def _map_rows(self, fn) -> None:
        state = self.state
        if state.row_start is not None:
            state.set_stored_row_start(fn(state.row_start))
        if state.stream_row_start is not None:
            state.set_stream_row_start(fn(state.stream_row_start))

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._map_rows(lambda rs: rs.index_select(0, beam_idx.to(rs.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._map_rows(lambda rs: rs.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._map_rows(lambda rs: rs[indices])

    def nbytes(self, float_bytes: int | None = None) -> int:
        return sum(layer.nbytes(float_bytes) for layer in self.layers)

    def release_prompt(self) -> None:
        """Quantized layers drop the 16-bit copy of the last prompt chunk now (`QuantizedPoDLayer.fresh`), as the
        first decode step would: the bytes held from then on."""
        for layer in self.layers:
            if isinstance(layer, QuantizedPoDLayer):
                layer.release_prompt()

    def used_bytes(self) -> int:
        return sum(layer.used_bytes() for layer in self.layers)

    def dense_bytes(self) -> int:
        return sum(layer.dense_bytes() for layer in self.layers)
