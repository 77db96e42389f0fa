"""What both attention paths (the PyTorch reference and the Triton dispatch) read from a layer: which query heads
serve which KV heads, which followers read which anchor, the distant query of a follower, and dense attention for
the FULL heads of a layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import PoDKeys, PoDLayer
from .heads import Mode
from .static_cache import StaticStep

QUERY_CHUNK_ELEMENTS = 1 << 25  # logits per SDPA call (B * heads * queries * keys): ~128 MB in fp32


def query_heads(kv_heads: list[int], group: int) -> list[int]:
    """Query-head indices served by `kv_heads` under grouped-query attention."""
    return [h * group + g for h in kv_heads for g in range(group)]


def follower_groups(layer: PoDLayer) -> dict[int, list[int]]:
    """anchor layer -> positions (within `layer.follower_heads`) of the heads that read its keys."""
    groups: dict[int, list[int]] = {}
    for pos, h in enumerate(layer.follower_heads):
        groups.setdefault(layer.anchors[h], []).append(pos)
    return groups


def distant_query(view: PoDKeys | StaticStep, anchor: int, query: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """q_d for `heads` of this layer: its own query ("keys") or the anchor's query of this forward ("scores")."""
    group = query.shape[1] // len(view.layer.specs)
    if view.state.mode == Mode.KEYS:
        return query[:, query_heads(heads, group)]
    anchor_query = view.state.queries.get(anchor)
    if anchor_query is None or anchor_query.shape != query.shape:
        raise RuntimeError(f"scores mode: layer {view.layer.layer_idx} found no query from its anchor layer {anchor} "
                           "for this forward (layers must run in order within one forward)")
    return anchor_query[:, query_heads(heads, group)]


def query_chunks(q: int, keys: int, heads: int, b: int):
    """(chunk starts, chunk size) of `q` queries so that one SDPA call holds at most QUERY_CHUNK_ELEMENTS logits."""
    step = max(1, min(q, QUERY_CHUNK_ELEMENTS // max(1, keys * heads * b)))
    return range(0, q, step), step


def dense_attention(query, keys, values, view: PoDKeys, scaling):
    """Own-key causal attention for the KV heads this layer anchors (a dense layer for those heads)."""
    b, _, q, _ = query.shape
    t = keys.shape[2]
    if view.state.row_start is None and (view.start == 0 or q == 1):  # plain causal, or one query sees all keys
        return F.scaled_dot_product_attention(query, keys, values, is_causal=q > 1, scale=scaling, enable_gqa=True)
    rs = view.state.row_starts(b, query.device)[:, None, None]
    j = torch.arange(t, device=query.device)
    out = torch.empty_like(query)
    starts, step = query_chunks(q, t, query.shape[1], b)
    for c0 in starts:
        i = torch.arange(view.start + c0, view.start + min(q, c0 + step), device=query.device)[:, None]
        real = i >= rs
        mask = (j <= i) & ((real & (j >= rs)) | (~real & (j < rs)))
        out[:, :, c0:c0 + step] = F.scaled_dot_product_attention(
            query[:, :, c0:c0 + step], keys, values, attn_mask=mask[:, None], scale=scaling, enable_gqa=True)
    return out
