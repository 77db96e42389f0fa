"""The KV cache spec and block manager of a streaming head group: keep the sink blocks and the window, free the
blocks in between (vLLM's `SlidingWindowSpec` keeps no sinks; its `RSWAManager` frees a middle range the same way).

Token positions a streaming head attends from position p: [0, sinks) and [p - window + 1, p] (ilc's rule; vLLM's
windows count the current token the same way). After `computed` tokens, the next query is at p = computed, so every
block wholly before `computed - window + 1` and wholly after the sink blocks is never read again.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import KVCacheSpec, SlidingWindowSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry


@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(SlidingWindowSpec):
    """A sliding window (`sliding_window`, counting the current token) plus the first `sinks` tokens.

    `layer_name` makes every streaming layer's spec distinct, so each is a KV cache group of one layer. vLLM sizes
    all groups to the smallest group's layer count and pads the others with unused layers; one layer per group
    wastes nothing (all pages are one KV head, so every block fits every group)."""

    sinks: int = 0
    layer_name: str = ""

    @property
    def sink_blocks(self) -> int:
        return cdiv(self.sinks, self.block_size)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        """The sliding window's bound plus the sink blocks, never more than the whole sequence (+1, as vLLM)."""
        window = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(window + self.sink_blocks, cdiv(max_model_len, self.block_size) + 1)

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(isinstance(s, SinkWindowSpec) and (s.sliding_window, s.sinks) == (self.sliding_window, self.sinks)
                   for s in kv_cache_specs.values())


class SinkWindowManager(SlidingWindowManager):
    """Frees the blocks between the sink blocks and the window as the window moves. Prefix caching is not
    supported (the plugin refuses it): a cached prefix would need its middle blocks."""

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink_blocks = kv_cache_spec.sink_blocks

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        window_start = max(0, processed_computed_tokens - self.sliding_window + 1)
        self._remove_blocks_in_range(request_id, self.sink_blocks, window_start // self.block_size)

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        return 0  # what is freed is a middle range, never a prefix (vLLM reads this as "a prefix is gone")


def register_spec() -> None:
    """Register the spec with its manager (vLLM's built-in specs first: registering ours into an empty registry
    would stop vLLM from registering its own)."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=SinkWindowSpec)
