"""Attention for a streaming head group in vLLM: each query attends to the sinks and its own window, read from
vLLM's paged cache through the request's block table (freed middle blocks are never read).

CPU build: a PyTorch implementation (exact, fp32 softmax), on the CPU backend's metadata. The cache layout is the
CPU backend's [num_blocks, kv_heads, 2 * block_size, head_dim] view (keys in the first half of each block, values
in the second), written here with plain indexing so that it does not depend on the CPU kernels' ISA packing.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from vllm.model_executor.layers.attention.attention import Attention
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from .spec import SinkWindowSpec

QUERY_CHUNK = 512  # prefill queries per score matrix: [heads, 512, keys] floats at a time


def split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values), each [num_blocks, kv_heads, block_size, head_dim], of one layer's CPU-layout cache."""
    num_blocks, heads, block_size, _ = kv_cache.shape
    return kv_cache.view(num_blocks, heads, 2 * block_size, -1).chunk(2, dim=2)


def visible_positions(seq_len: int, first_query: int, sinks: int, window: int) -> torch.Tensor:
    """Key positions any query in [first_query, seq_len) may read: the sinks and the window of the first query on."""
    start = max(sinks, first_query - window + 1)
    return torch.cat([torch.arange(min(sinks, seq_len)), torch.arange(start, seq_len)])


def sink_window_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, query_pos: torch.Tensor,
                          key_pos: torch.Tensor, sinks: int, window: int, scale: float) -> torch.Tensor:
    """query [L, Hq, D] at positions query_pos [L]; keys/values [P, Hk, D] at key_pos [P] -> [L, Hq, D].
    Key j is visible to the query at i when j <= i and (j < sinks or j > i - window)."""
    length, hq, d = query.shape
    hk = keys.shape[1]
    q = query.float().reshape(length, hk, hq // hk, d).permute(1, 2, 0, 3)  # [Hk, G, L, D]
    k = keys.float().permute(1, 2, 0)  # [Hk, D, P]
    v = values.float().permute(1, 0, 2)  # [Hk, P, D]
    out = torch.empty(hk, hq // hk, length, d)
    for a in range(0, length, QUERY_CHUNK):
        i = query_pos[a:a + QUERY_CHUNK, None]
        visible = (key_pos[None] <= i) & ((key_pos[None] < sinks) | (key_pos[None] > i - window))
        scores = (q[:, :, a:a + QUERY_CHUNK] @ k[:, None]) * scale  # [Hk, G, l, P]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[:, :, a:a + QUERY_CHUNK] = torch.softmax(scores, dim=-1) @ v[:, None]
    return out.permute(2, 0, 1, 3).reshape(length, hq, d).to(query.dtype)


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, sinks: int, window: int, scale: float) -> torch.Tensor:
    """One new token per request, all requests at once: query [R, Hq, D] at position seq_len - 1; keys/values the
    paged cache [num_blocks, Hk, block_size, D]; block_table [R, max_blocks] -> [R, Hq, D]. Each request reads its
    sinks and its last `window` positions (a fixed [R, sinks + window] gather; positions a short request lacks are
    masked)."""
    r, hq, d = query.shape
    hk, block_size = keys.shape[1], keys.shape[2]
    lens = seq_lens.long()[:, None]
    sink = torch.arange(sinks).expand(r, sinks)
    recent = lens - window + torch.arange(window)  # [R, W]: the window of the query at lens - 1
    pos = torch.cat([sink, recent], dim=1)
    visible = torch.cat([sink < lens, recent >= sinks], dim=1)  # no pads, no sink counted twice
    pos = pos.clamp(min=0)
    blocks = block_table.long().gather(1, pos // block_size)
    k = keys[blocks, :, pos % block_size].float()  # [R, P, Hk, D]
    v = values[blocks, :, pos % block_size].float()
    q = query.float().reshape(r, hk, hq // hk, d)
    scores = torch.einsum("rkgd,rpkd->rkgp", q, k) * scale
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    out = torch.einsum("rkgp,rpkd->rkgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(r, hq, d).to(query.dtype)


class SinkWindowImpl(CPUAttentionBackendImpl):
    """The CPU backend's impl with sinks + window attention; `sinks` comes from the layer (SinkWindowAttention)."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if attn_metadata is None:  # profiling run
            return output
        keys, values = split_cache(kv_cache)
        starts = attn_metadata.query_start_loc
        lengths = (starts[1:] - starts[:-1]).tolist()
        decodes = [r for r, n in enumerate(lengths) if n == 1]
        if decodes:
            rows = torch.tensor(decodes)
            out = decode_attention(query[starts[rows]], keys, values, attn_metadata.block_table[rows],
                                   attn_metadata.seq_lens[rows], layer.sinks, self.sliding_window, self.scale)
            output[starts[rows]] = out.reshape(len(decodes), *output.shape[1:])
        block_size = keys.shape[2]
        starts, seq_lens = starts.tolist(), attn_metadata.seq_lens.tolist()
        for r, n in enumerate(lengths):
            if n <= 1:
                continue
            a, b, seq_len = starts[r], starts[r + 1], seq_lens[r]
            first = seq_len - n
            pos = visible_positions(seq_len, first, layer.sinks, self.sliding_window)
            blocks = attn_metadata.block_table[r, pos // block_size].long()
            offsets = pos % block_size
            out = sink_window_attention(query[a:b], keys[blocks, :, offsets], values[blocks, :, offsets],
                                        torch.arange(first, seq_len), pos, layer.sinks, self.sliding_window,
                                        self.scale)
            output[a:b] = out.reshape(output[a:b].shape)
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        keys, values = split_cache(kv_cache)
        block_size = keys.shape[2]
        n = slot_mapping.shape[0]
        slots = slot_mapping.long()
        blocks, offsets = slots // block_size, slots % block_size
        keys[blocks, :, offsets] = key[:n].to(keys.dtype)
        values[blocks, :, offsets] = value[:n].to(values.dtype)


class SinkWindowBackend(CPUAttentionBackend):
    """The CPU backend (its metadata and cache shape) with `SinkWindowImpl`."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # vLLM's checks key on the name; the cache layout and metadata are the CPU backend's

    @staticmethod
    def get_impl_cls() -> type[SinkWindowImpl]:
        return SinkWindowImpl


class SinkWindowAttention(Attention):
    """A vLLM attention layer for streaming KV heads: sinks + window attention, cache spec `SinkWindowSpec`."""

    def __init__(self, num_heads: int, head_size: int, scale: float, *, num_kv_heads: int, sinks: int, window: int,
                 cache_config=None, prefix: str = ""):
        super().__init__(num_heads, head_size, scale, num_kv_heads=num_kv_heads, cache_config=cache_config,
                         per_layer_sliding_window=window, prefix=prefix, attn_backend=SinkWindowBackend)
        self.sinks = sinks

    def get_kv_cache_spec(self, vllm_config) -> SinkWindowSpec:
        window_spec = super().get_kv_cache_spec(vllm_config)  # vLLM's SlidingWindowSpec for this window
        return SinkWindowSpec(**{f.name: getattr(window_spec, f.name) for f in fields(window_spec) if f.init},
                              sinks=self.sinks, layer_name=self.layer_name)
