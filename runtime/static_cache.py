"""A preallocated PoD cache whose decode step a compiler can capture (`torch.compile`, CUDA graphs).

`StaticPoDCache` holds the same layout as `PoDCache` (`ilc.runtime.cache`), allocated once for `max_length`
tokens at the first update: values and anchor keys [B, H, max_length, D], followers' sinks and a ring of exactly
`window` own keys, streaming heads' sinks and rings. Its tensors never move or change shape, and the number of
tokens seen lives in a device tensor (`length`), so a decode step has fixed shapes and reads no Python int that
changes from step to step:
- a decode step (one new token) writes with `index_copy_` at the device position and hands the attention
  dispatcher a `StaticStep`: the Triton decode kernel with the slot count read on the device
  (`kernel_dispatch.static_decode_triton`; on CUDA, or with kernels=True) or `ilc.runtime.reference.static_decode`,
  which masks by position instead of slicing. No `.item()`,
  `.tolist()`, `.cpu()` or `bool(tensor)` runs in it (tested), and `torch.compile(model.forward, fullgraph=True)`
  traces it with no graph break (tested on CPU);
- a prompt (several tokens) runs eagerly through `PoDLayer.update` and the ordinary attention paths (prefill is
  not captured; it reads the length on the host once per layer).
Quantized heads (the plan's precision:) keep `QuantizedPoDLayer`'s layout in `StaticSlots`: packed slots for
the whole length (a quantized streaming head: for its window, in a ring of groups), the recent ones in a ring, the
group leaving the residual quantized on the device in the step.
Token selection (it reallocates) and the compute skip (data-dependent) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bits import head_bytes
from .cache import CacheState, PoDCache, PoDLayer, QuantizedPoDLayer
from .plan import Plan, PlanError
from .slots import HeadSlots, StaticSlots


@dataclass
class StaticStep:
    """What a static layer's one-token update hands to the attention function: the layer and the new token's slot
    as a 0-d device tensor (not a Python int, so a captured graph serves every step)."""

    layer: "StaticPoDLayer"
    position: torch.Tensor

    @property
    def state(self) -> CacheState:
        return self.layer.state


class StaticPoDLayer(PoDLayer):
    """One layer of a `StaticPoDCache`: `PoDLayer`'s storage, preallocated, plus a device-side token count."""

    is_compileable = True

    def __init__(self, layer_idx, specs, state, cache, max_length: int):
        self.max_length = max_length
        self.length: torch.Tensor | None = None  # 0-d long on the cache's device, once initialized
        super().__init__(layer_idx, specs, state, cache)

    # `seen` is the device counter; reading it on the host is for prefill and bookkeeping only
    @property
    def seen(self) -> int:
        return 0 if self.length is None else int(self.length)

    @seen.setter
    def seen(self, value: int) -> None:
        if self.length is not None:
            self.length.fill_(value)

    def lazy_initialization(self, key_states, value_states):
        self.length = torch.zeros((), dtype=torch.long, device=key_states.device)
        super().lazy_initialization(key_states, value_states)
        b, _, _, d = key_states.shape
        new = lambda heads, n: key_states.new_zeros(b, len(heads), n, d)  # noqa: E731
        n = self.max_length
        self._allocate_full_heads(new)
        if self.follower_heads:
            self.ring_keys = new(self.follower_heads, min(self.state.window, n))
        for group in self.stream_groups:
            if not group.quantized:
                group.ring_k, group.ring_v = (new(group.heads, min(group.window, n)) for _ in range(2))
        self.capacity = n
        if not torch.compiler.is_compiling():  # fixed addresses: CUDA graphs replay over the same buffers
            for t in self._buffers():
                torch._dynamo.mark_static_address(t)

    def _allocate_full_heads(self, new) -> None:
        """Values and FULL heads' keys for every slot (`new(heads, slots)` makes a zero tensor)."""
        self.values, self.anchor_keys = new(self.value_heads, self.max_length), new(self.anchor_heads, self.max_length)

    def decode_keys(self, position: torch.Tensor) -> torch.Tensor:
        """[B, Ha, max_length, D] the FULL heads' keys after the token at slot `position` (for the reference)."""
        return self.anchor_keys

    def decode_values(self, position: torch.Tensor) -> torch.Tensor:
        """[B, Hv, max_length, D] the value heads' values after the token at slot `position`."""
        return self.values

    def uses_kernels(self, t: torch.Tensor) -> bool:
        """Whether decode steps run the Triton kernels (`kernels=True`, or None on CUDA tensors)."""
        return bool(self.state.kernels) or (self.state.kernels is None and t.is_cuda)

    def _buffers(self) -> list[torch.Tensor]:
        out = [self.values, self.anchor_keys, self.sink_keys, self.ring_keys, self.length] + self._packed_buffers()
        out += [t for group in self.stream_groups for t in group.tensors()]
        return [t for t in out if t is not None]

    def _reserve(self, total: int) -> None:
        if total > self.max_length:
            raise PlanError(f"the static PoD cache holds {self.max_length} tokens (max_length) and this update needs "
                            f"{total}; build it with a larger max_length")

    def get_seq_length(self):
        """The device counter itself, as transformers' `StaticLayer` does (no host read)."""
        return self.length if self.length is not None else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_length, 0

    def get_max_length(self) -> int:
        return self.max_length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[2] != 1:
            return super().update(key_states, value_states, *args, **kwargs)
        pos = self.length.clone()  # this token's slot, on the device
        at = pos.view(1)
        rs = self.state.row_starts(key_states.shape[0], key_states.device)
        self._write_step(pos, key_states[:, self._anchor_select] if self.anchor_heads else None,
                         value_states[:, self._value_select] if self.value_heads else None)
        if self.follower_heads:
            own = key_states[:, self._follower_select]
            self.ring_keys.index_copy_(2, at % self.ring_keys.shape[2], own)
            _write_sink(self.sink_keys, own, pos, rs)
        for group in self.stream_groups:
            k, v = key_states[:, group.select], value_states[:, group.select]
            if group.quantized:
                group.key_slots.write_step(k, pos)
                group.value_slots.write_step(v, pos)
            else:
                group.ring_k.index_copy_(2, at % group.ring_k.shape[2], k)
                group.ring_v.index_copy_(2, at % group.ring_v.shape[2], v)
            _write_sink(group.sink_k, k, pos, rs)
            _write_sink(group.sink_v, v, pos, rs)
        self.length.add_(1)
        return StaticStep(self, pos), self._values_for_attention(self.max_length)

    def _write_step(self, position: torch.Tensor, keys: torch.Tensor | None, values: torch.Tensor | None) -> None:
        """Store one token's FULL-head keys [B, Ha, 1, D] and values [B, Hv, 1, D] at the device slot `position`."""
        at = position.view(1)
        if values is not None:
            self.values.index_copy_(2, at, values)
        if keys is not None:
            self.anchor_keys.index_copy_(2, at, keys)

    def _packed_buffers(self) -> list[torch.Tensor]:
        return []


class StaticQuantizedPoDLayer(StaticPoDLayer, QuantizedPoDLayer):
    """A static layer with quantized heads: `QuantizedPoDLayer`'s storage in `StaticSlots` preallocated for
    `max_length` (sinks, every packed slot the length can need, a ring of residual + group recent slots). A decode
    step writes its token and quantizes the group leaving the residual on the device; a prompt runs eagerly (its
    chunk attends to itself at 16 bits, as in the growing cache)."""

    def __init__(self, layer_idx, specs, state, cache, max_length: int, precisions):
        self.max_length = max_length
        self.length = None
        QuantizedPoDLayer.__init__(self, layer_idx, specs, state, cache, precisions)

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.specs, self.state, self.cache, self.max_length, self.precisions)

    def _new_slots(self, specs, like) -> HeadSlots:
        return HeadSlots(specs, self.state.residual, self._exact_prefix(), like, length=self.max_length)

    def _new_stream_slots(self, spec, window: int, like) -> StaticSlots:
        return StaticSlots(spec, self.state.residual, 0, like, self.max_length, window=window)

    def _write_stream(self, group, start: int, keys, values) -> None:
        group.key_slots.write(start, keys)
        group.value_slots.write(start, values)

    def _allocate_full_heads(self, new) -> None:  # `key_slots` / `value_slots` hold them
        pass

    def _packed_buffers(self) -> list[torch.Tensor]:
        return [t for slots in self._slots() for t in slots.tensors()]

    def _write(self, start, total, keys, values) -> None:
        for slots, new in ((self.key_slots, keys), (self.value_slots, values)):
            if new is not None:
                slots.write(start, new)
        self.fresh = (start, keys, values) if total - start > 1 else None

    def _write_step(self, position, keys, values) -> None:
        self.fresh = None
        for slots, new in ((self.key_slots, keys), (self.value_slots, values)):
            if new is not None:
                slots.write_step(new, position)

    def used_bytes(self) -> int:
        """Bytes the layout must keep for the tokens seen (the savings formula, `bits.head_bytes`); `nbytes` counts
        what is preallocated for `max_length`."""
        if not self.is_initialized:
            return 0
        return self.batch * sum(head_bytes(spec, precision, self.seen, self.state.sinks, self.head_dim,
                                           self.state.residual, None, self.dtype.itemsize)
                                for spec, precision in zip(self.specs, self.precisions))

    def decode_keys(self, position: torch.Tensor) -> torch.Tensor:
        return self.key_slots.read_static(position)

    def decode_values(self, position: torch.Tensor) -> torch.Tensor:
        return self.value_slots.read_static(position)


def _write_sink(dest: torch.Tensor, new: torch.Tensor, pos: torch.Tensor, row_start: torch.Tensor) -> None:
    """Store `new` [B, H, 1, D] (the token at slot `pos`) as sink k = pos - row_start of each row where 0 <= k < S,
    without a host read: an out-of-range k writes the slot's old value back."""
    s = dest.shape[2]
    if s == 0:
        return
    k = pos - row_start  # [B]
    inside = (k >= 0) & (k < s)
    slot = k.clamp(0, s - 1)[:, None, None, None].expand(-1, dest.shape[1], 1, dest.shape[3])
    old = dest.gather(2, slot)
    dest.scatter_(2, slot, torch.where(inside[:, None, None, None], new, old))


class StaticPoDCache(PoDCache):
    """A `PoDCache` preallocated for `max_length` tokens, for captured decode (see the module docstring)."""

    def __init__(self, plan: Plan, max_length: int, mode: str | None = None, kernels: bool | None = None):
        if plan.selection is not None:
            raise PlanError("the static PoD cache does not run token selection (the plan's selection: reallocates "
                            "the cache); use plan.new_cache(model) without max_length")
        if plan.skip_threshold is not None:
            raise PlanError("the static PoD cache does not run the compute skip (skip_threshold): it decides per "
                            "row on the host; set skip_threshold=None")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise PlanError(f"max_length: expected a positive number of tokens, got {max_length!r}")
        if max_length > plan.model.max_context:
            raise PlanError(f"max_length {max_length} exceeds the model's context of {plan.model.max_context} tokens")
        self.max_length = max_length
        self.planned_tokens = 0  # tokens the model's forwards brought so far, counted on the host by the plan's hook
        super().__init__(plan, mode=mode, kernels=kernels)

    def check_room(self, new: int) -> None:
        """Refuse, before any work, a forward that would bring more tokens than `max_length` (counted on the host:
        the device counter is never read in a decode step)."""
        if self.planned_tokens + new > self.max_length:
            raise PlanError(f"the static PoD cache holds {self.max_length} tokens (max_length) and this forward "
                            f"needs {self.planned_tokens + new}; build it with a larger max_length")
        self.planned_tokens += new

    def _new_layer(self, layer_idx, specs) -> StaticPoDLayer:
        precisions = self.plan.layer_precisions(layer_idx)
        if any(p.quantized for p in precisions):
            return StaticQuantizedPoDLayer(layer_idx, specs, self.state, self, self.max_length, precisions)
        return StaticPoDLayer(layer_idx, specs, self.state, self, self.max_length)
