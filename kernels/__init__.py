"""ilc.kernels: Triton kernels for attention over the PoD cache layout; the runtime uses them on CUDA.

`pod_attention_triton(query, view, values, scaling)` computes the same function as
`ilc.runtime.attention.reference_attention` for one layer, with
- decode (one new token): the split-K kernel of `decode.py`, one launch for all KV heads of the layer (keys mode:
  one per anchor whose keys the followers read) plus one merge. In scores mode an anchor writes its logits of the
  step, and its followers read them instead of the anchor's keys;
- prefill: the flash kernel of `prefill.py` for follower heads; PyTorch SDPA (FlashAttention) for the heads the
  layer anchors (plain causal attention).
Buffers the launches need (split partials, step logits, row starts) live in the cache state and are reused across
layers and steps, so a decode step allocates only its outputs. The compute skip (`skip_threshold`) runs on the
reference path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_SM_COUNT: dict = {}


def _programs_target(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: a few splits, to exercise the merge
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return 2 * _SM_COUNT[device]


def _upcast(t: torch.Tensor) -> bool:
    """Triton's CPU interpreter mis-multiplies bf16/fp16 in tl.dot: upcast the operands there only."""
    return os.environ.get("TRITON_INTERPRET") == "1" and t.dtype != torch.float32


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _index(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def _decode_scratch(state, b, hq, d, nsplit_cap, total, device):
    """Reused decode buffers: split partials [B, Hq, cap, D] + LSE, and step logits [B, Hq, >= total] (fp32)."""
    scratch = state.kernel_scratch
    mid_o = scratch.get("mid_o")
    if mid_o is None or mid_o.shape != (b, hq, nsplit_cap, d) or mid_o.device != device:
        scratch["mid_o"] = torch.empty(b, hq, nsplit_cap, d, dtype=torch.float32, device=device)
        scratch["mid_lse"] = torch.empty(b, hq, nsplit_cap, dtype=torch.float32, device=device)
    logits = scratch.get("logits")
    if logits is None or logits.shape[:2] != (b, hq) or logits.shape[2] < total or logits.device != device:
        from ilc.runtime.cache import _grown

        scratch["logits"] = torch.empty(b, hq, _grown(total), dtype=torch.float32, device=device)
        scratch["logits_from"] = {}  # KV head -> (anchor layer, step length) whose logits the buffer holds
    return scratch["mid_o"], scratch["mid_lse"], scratch["logits"]


def decode_attention(out, query, layer, view, values, row_start, scaling):
    """One decode step of one layer: split-K launches over all its KV heads, then one merge into `out`."""
    from .decode import _decode_merge, _decode_split

    state = layer.state
    b, hq, _, d = query.shape
    hkv = values.shape[1]
    group = hq // hkv
    dev = query.device
    total, rs_min = view.total, state.row_start_min
    block_n = 64 if dev.type == "cuda" else 16
    want = max(1, _programs_target(dev) // max(1, b * hkv))
    span = max(1, total - rs_min - state.sinks)  # slots after the sinks, split across programs
    split_len = -(-max(block_n, -(-span // want)) // block_n) * block_n
    nsplit = max(1, -(-span // split_len))
    mid_o, mid_lse, logits = _decode_scratch(state, b, hq, d, want, total, dev)
    meta = _layer_meta(layer, dev)
    logits_from = state.kernel_scratch["logits_from"]
    for h, a in meta.reads_logits:
        if logits_from.get(h) != (a, total):
            raise RuntimeError(f"layer {layer.layer_idx}, KV head {h}: the step logits of anchor layer {a} are "
                               "missing (layers must run in order within one decode step)")
    dummy = values  # any tensor for pointer arguments a launch does not read
    anchor_k = layer.anchor_keys if layer.anchor_heads else dummy
    sink_k = layer.sink_keys if layer.follower_heads and layer.sink_keys.shape[2] else dummy
    ring_k = layer.ring_keys if layer.follower_heads else dummy
    for dist_layer, table in meta.decode_launches:
        dist_k = layer.cache.layers[dist_layer].anchor_keys if dist_layer is not None else dummy
        _decode_split[(b, table.shape[0], nsplit)](
            query, anchor_k, sink_k, ring_k, dist_k, values, logits, row_start, mid_o, mid_lse, table,
            total, rs_min, scaling, split_len, hq,
            query.stride(0), query.stride(1), anchor_k.stride(0), anchor_k.stride(1), anchor_k.stride(2),
            sink_k.stride(0), sink_k.stride(1), sink_k.stride(2), ring_k.stride(0), ring_k.stride(1),
            ring_k.stride(2), dist_k.stride(0), dist_k.stride(1), dist_k.stride(2),
            values.stride(0), values.stride(1), values.stride(2), logits.stride(0), logits.stride(1),
            SINKS=state.sinks, BLOCK_S=max(16, _next_pow2(state.sinks)), WINDOW=state.window, GROUP=group,
            BLOCK_G=max(16, _next_pow2(group)), D=d, BLOCK_N=block_n, NSPLIT_CAP=want, UPCAST=_upcast(values),
        )
    for h in meta.writes_logits:
        logits_from[h] = (layer.layer_idx, total)
    _decode_merge[(b, hq)](mid_o, mid_lse, out, out.stride(0), out.stride(1), nsplit, NSPLIT_CAP=want, D=d)


def prefill_attention(out, query, q_dist, *, sink_keys, recent_keys, recent_start, dist_keys, values, row_start,
                      rs_min, heads, own_pos, dist_pos, start, total, sinks, window, scaling):
    """Launch the flash prefill kernel for follower KV heads `heads`; writes out[:, their query heads]."""
    from .prefill import _prefill

    b, hq, q, d = query.shape
    group = hq // values.shape[1]
    cuda = query.device.type == "cuda"
    block_m, block_n = (128, 64) if cuda else (16, 16)
    grid = (-(-q // block_m), heads.numel() * group, b)
    _prefill[grid](
        query, q_dist, sink_keys, recent_keys, dist_keys, values, row_start, out, heads, own_pos, dist_pos,
        start, total, recent_start, rs_min, q, scaling,
        query.stride(0), query.stride(1), query.stride(2), q_dist.stride(0), q_dist.stride(1), q_dist.stride(2),
        sink_keys.stride(0), sink_keys.stride(1), sink_keys.stride(2),
        recent_keys.stride(0), recent_keys.stride(1), recent_keys.stride(2),
        dist_keys.stride(0), dist_keys.stride(1), dist_keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), out.stride(0), out.stride(1), out.stride(2),
        SINKS=sinks, BLOCK_S=max(16, _next_pow2(sinks)), WINDOW=window, GROUP=group, D=d,
        BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=_upcast(values), num_warps=8, num_stages=3 if cuda else 1,
    )


@dataclass
class LayerLaunches:
    """What one layer's launches need that never changes: head tables on the device, built once."""

    decode_launches: list  # (anchor layer whose keys the launch reads, or None; head table int32 [n, 5])
    reads_logits: list  # (KV head, anchor layer) pairs whose distant logits this layer reads (scores mode)
    writes_logits: list  # KV heads whose logits this (anchor) layer leaves for its followers
    prefill_followers: list  # (anchor layer, heads, own positions, positions in the anchor's keys)


def _layer_meta(layer, device) -> LayerLaunches:
    from ilc.runtime.attention import follower_groups

    from .decode import ANCHOR, FOLLOWER_KEYS, FOLLOWER_LOGITS

    meta = layer.kernel_meta.get(device)
    if meta is not None:
        return meta
    cache, i = layer.cache, layer.layer_idx
    scores = layer.state.mode == "scores"
    later = [other.anchors for other in cache.layers[i + 1:]]
    # scores mode: an anchor head with followers leaves its logits of the step for them (keys mode: nobody reads them)
    writes = [h for h in layer.anchor_heads if scores and any(anchors[h] == i for anchors in later)]
    anchor_rows = [(h, ANCHOR.value, pos, 0, int(h in writes)) for pos, h in enumerate(layer.anchor_heads)]
    groups = follower_groups(layer)
    # decode launches by the anchor keys they read: scores-mode followers read logits, so one launch (None) serves
    # every head; keys mode needs one per anchor. The layer's own anchor heads ride in the first launch.
    first = None if scores or not groups else next(iter(groups))
    by_source = {first: anchor_rows}
    prefill, reads = [], []
    for a, positions in groups.items():
        heads = [layer.follower_heads[p] for p in positions]
        dist_pos = [cache.layers[a].anchor_heads.index(h) for h in heads]
        prefill.append((a, _index(heads, device), _index(positions, device), _index(dist_pos, device)))
        kind = FOLLOWER_LOGITS.value if scores else FOLLOWER_KEYS.value
        by_source.setdefault(None if scores else a, []).extend(
            (h, kind, p, dp, 0) for h, p, dp in zip(heads, positions, dist_pos))
        if scores:
            reads += [(h, a) for h in heads]
    launches = [(src, _index(rows, device)) for src, rows in by_source.items() if rows]
    meta = layer.kernel_meta[device] = LayerLaunches(launches, reads, writes, prefill)
    return meta


def _row_start(state, b, device) -> torch.Tensor:
    """Each row's first real slot as int32 on `device`, converted once per change of the row starts (or batch
    size, for the no-padding zeros) rather than on every layer call."""
    scratch = state.kernel_scratch
    source, rows = state.row_start, scratch.get("row_start")
    if rows is None or scratch["row_start_of"] is not source or rows.shape[0] != b or rows.device != device:
        rows = torch.zeros(b, dtype=torch.int32, device=device) if source is None else source.to(device, torch.int32)
        scratch.update(row_start_of=source, row_start=rows)
    return rows


def pod_attention_triton(query, view, values, scaling):
    """One layer of PoD attention with the Triton kernels; same contract as `reference_attention`."""
    from ilc.runtime.attention import _dense_part, query_heads, reference_attention

    layer, state = view.layer, view.state
    if state.skip_threshold is not None:
        return reference_attention(query, view, values, scaling)
    b, hq, q, d = query.shape
    dev = query.device
    row_start = _row_start(state, b, dev)
    out = torch.empty_like(query)
    if q == 1:
        decode_attention(out, query, layer, view, values, row_start, scaling)
        return out
    group = hq // values.shape[1]
    if layer.anchor_heads:
        heads = layer.anchor_heads
        qi = query_heads(heads, group)
        out[:, qi] = _dense_part(query[:, qi], layer.anchor_keys[:, :, :view.total], values[:, heads], view, scaling)
    for anchor, heads_t, own_t, dist_t in _layer_meta(layer, dev).prefill_followers:
        q_dist = query if state.mode == "keys" else state.queries[anchor]
        prefill_attention(out, query, q_dist, sink_keys=layer.sink_keys, recent_keys=view.recent_keys,
                          recent_start=view.recent_start, dist_keys=layer.cache.layers[anchor].anchor_keys,
                          values=values, row_start=row_start, rs_min=state.row_start_min, heads=heads_t,
                          own_pos=own_t, dist_pos=dist_t, start=view.start, total=view.total, sinks=state.sinks,
                          window=state.window, scaling=scaling)
    return out
