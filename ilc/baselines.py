"""Baselines that `ilc eval` compares a plan against, all measured on the same prompts.

- StreamingLLM: keep only the sink tokens and a recent window of K and V in every layer; distant tokens are
  dropped (the token-loss baseline PoD argues against). `StreamingCache` really holds only those bytes, and an
  attention function registered as ``ilc_streaming`` attends to them with the original positions.
- StreamingLLM at equal memory: the window enlarged until the cache holds as many bytes as the plan's.
- Uniform blocks: every KV head grouped into fixed blocks of 2, 3 or 4 consecutive layers (is calibration
  worth it?).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

from ilc.runtime.attention import pod_mask, proximal_attention
from ilc.runtime.cache import LogicalLength
from ilc.runtime.plan import Plan, blocks_from_layers

STREAMING_ATTENTION = "ilc_streaming"


@dataclass
class StreamingView:
    """What a streaming layer's `update` hands the attention function."""

    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    recent_keys: torch.Tensor
    recent_values: torch.Tensor
    start: int
    recent_start: int
    sinks: int
    window: int


class StreamingLayer(LogicalLength, CacheLayerMixin):
    """Sinks + a ring of the last `window` slots, for both K and V."""

    is_compileable = False
    is_sliding = True

    def __init__(self, sinks: int, window: int):
        super().__init__()
        self.sinks, self.window, self.seen = sinks, window, 0

    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        new = lambda n: key_states.new_zeros(b, h, n, d)  # noqa: E731
        self.sink_k, self.sink_v, self.ring_k, self.ring_v = new(self.sinks), new(self.sinks), new(0), new(0)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, n = self.seen, key_states.shape[2]
        total = start + n
        recent_start = max(0, start - self.window + 1)
        slots = torch.arange(recent_start, start, device=key_states.device) % self.window
        old_k, old_v = self.ring_k.index_select(2, slots), self.ring_v.index_select(2, slots)
        recent_k, recent_v = torch.cat([old_k, key_states], 2), torch.cat([old_v, value_states], 2)
        if start < self.sinks:
            m = min(self.sinks, total) - start
            self.sink_k[:, :, start:start + m] = key_states[:, :, :m]
            self.sink_v[:, :, start:start + m] = value_states[:, :, :m]
        if self.ring_k.shape[2] < min(self.window, total):
            grow = min(self.window, max(total, 2 * self.ring_k.shape[2]))
            self.ring_k, self.ring_v = _grow(self.ring_k, grow), _grow(self.ring_v, grow)
        keep = min(n, self.window)
        dest = torch.arange(total - keep, total, device=key_states.device) % self.window
        self.ring_k.index_copy_(2, dest, key_states[:, :, n - keep:])
        self.ring_v.index_copy_(2, dest, value_states[:, :, n - keep:])
        self.seen = total
        n_sink = min(self.sinks, total)
        view = StreamingView(self.sink_k[:, :, :n_sink], self.sink_v[:, :, :n_sink], recent_k, recent_v, start,
                             recent_start, self.sinks, self.window)
        return view, None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.ring_k, self.ring_v))


def _grow(t: torch.Tensor, n: int) -> torch.Tensor:
    out = t.new_zeros(*t.shape[:2], n, t.shape[-1])
    out[:, :, :t.shape[2]] = t
    return out


class StreamingCache(Cache):
    def __init__(self, num_layers: int, sinks: int, window: int):
        super().__init__(layers=[StreamingLayer(sinks, window) for _ in range(num_layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def streaming_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    if not isinstance(key, StreamingView):
        raise RuntimeError("the StreamingLLM baseline needs its StreamingCache")
    v = key
    out, _ = proximal_attention(query, v.sink_keys, v.sink_values, v.recent_keys, v.recent_values, start=v.start,
                                recent_start=v.recent_start, sinks=v.sinks, window=v.window,
                                scaling=scaling if scaling is not None else query.shape[-1] ** -0.5)
    return out.transpose(1, 2).contiguous(), None


def apply_streaming(model, sinks: int, window: int):
    """Run `model` as StreamingLLM (sinks + window, distant tokens dropped); returns the hook handle."""
    AttentionInterface.register(STREAMING_ATTENTION, streaming_attention)
    AttentionMaskInterface.register(STREAMING_ATTENTION, pod_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(STREAMING_ATTENTION)
    layers = model.config.get_text_config().num_hidden_layers

    def before_forward(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0):
            kwargs["past_key_values"] = StreamingCache(layers, sinks, window)
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError("the StreamingLLM baseline supports unpadded inputs only")
        return args, kwargs

    handle = model.register_forward_pre_hook(before_forward, with_kwargs=True)

    def remove():
        handle.remove()
        model.set_attn_implementation(previous)

    return remove


def uniform_plan(plan: Plan, size: int) -> Plan:
    """The plan's windows and model, with every KV head grouped into blocks of `size` consecutive layers."""
    groups = [list(range(a, min(plan.num_layers, a + size))) for a in range(0, plan.num_layers, size)]
    return replace(plan, blocks=tuple(blocks_from_layers(groups) for _ in range(plan.num_kv_heads)),
                   criterion={"method": f"uniform-{size}"}, similarity={})


def equal_memory_window(plan: Plan, context: int) -> int:
    """The StreamingLLM window whose cache holds the plan's bytes at `context` tokens."""
    _, planned = plan.kv_tokens(context)
    per_token = 2 * plan.num_layers * plan.num_kv_heads
    return max(1, min(context, math.floor(planned / per_token) - plan.sinks))
