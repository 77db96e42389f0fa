"""ilc.kernels: Triton kernels for attention over the PoD cache layout; the runtime uses them on CUDA.

`pod_attention_triton(query, view, values, scaling)` computes the same function as
`ilc.runtime.attention.reference_attention` for one layer, with
- decode (one new token): the split-K kernel of `decode.py`. In scores mode an anchor layer writes its logits
  for the step, and its followers read them instead of the anchor's keys;
- prefill: the flash kernel of `prefill.py` for follower heads; PyTorch SDPA (FlashAttention) for the heads the
  layer anchors (plain causal attention).
The compute skip (`skip_threshold`) runs on the reference path.
"""

from __future__ import annotations

import os

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


def decode_attention(out, query, q_dist, *, sink_keys, recent_keys, recent_start, dist_keys, values, row_start,
                     rs_min, heads, own_pos, dist_pos, total, sinks, window, scaling, proximal, logits_in=None,
                     logits_out=None):
    """Launch split-K decode for the KV heads `heads` of one layer; writes out[:, their query heads, 0]."""
    from .decode import _decode_merge, _decode_split

    b, hq, _, d = query.shape
    group = hq // values.shape[1]
    n = heads.numel()
    dev = query.device
    dist_len = max(0, total - window - sinks - rs_min) if proximal else total - rs_min
    block_n = 64 if dev.type == "cuda" else 16
    want = max(1, _programs_target(dev) // max(1, b * n))
    split_len = max(block_n, -(-dist_len // want))
    split_len = -(-split_len // block_n) * block_n
    nsplit = (1 if proximal else 0) + max(1, -(-dist_len // split_len))
    mid_o = torch.empty(b, hq, nsplit, d, dtype=torch.float32, device=dev)
    mid_lse = torch.empty(b, hq, nsplit, dtype=torch.float32, device=dev)
    dummy = values  # any tensor for pointer arguments a branch does not read
    sk = sink_keys if sink_keys is not None else dummy
    rk = recent_keys if recent_keys is not None else dummy
    li = logits_in if logits_in is not None else mid_o
    lo = logits_out if logits_out is not None else mid_o
    _decode_split[(b, n, nsplit)](
        query, q_dist, sk, rk, dist_keys, values, li, lo, row_start, mid_o, mid_lse, heads, own_pos, dist_pos,
        total, recent_start, rs_min, scaling,
        query.stride(0), query.stride(1), q_dist.stride(0), q_dist.stride(1),
        sk.stride(0), sk.stride(1), sk.stride(2), rk.stride(0), rk.stride(1), rk.stride(2),
        dist_keys.stride(0), dist_keys.stride(1), dist_keys.stride(2), values.stride(0), values.stride(1),
        values.stride(2), li.stride(0), li.stride(1), lo.stride(0), lo.stride(1),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        SINKS=sinks if proximal else 0, BLOCK_S=max(16, _next_pow2(sinks)), WINDOW=window if proximal else 0,
        GROUP=group, BLOCK_G=max(16, _next_pow2(group)), D=d, BLOCK_N=block_n, split_len=split_len,
        HAS_PROXIMAL=proximal, READ_LOGITS=logits_in is not None, WRITE_LOGITS=logits_out is not None,
        UPCAST=_upcast(values),
    )
    _decode_merge[(b, n, group)](
        mid_o, mid_lse, out, heads, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0),
        mid_lse.stride(1), out.stride(0), out.stride(1), nsplit, GROUP=group, D=d,
    )


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


def _layer_meta(layer, device):
    """Head-index tensors for one layer's launches, built once per device (no host copies per step)."""
    from ilc.runtime.attention import follower_groups

    meta = layer.kernel_meta.get(device)
    if meta is None:
        n = len(layer.anchor_heads)
        anchor = (_index(layer.anchor_heads, device), _index(list(range(n)), device)) if n else None
        followers = []
        for a, positions in follower_groups(layer).items():
            heads = [layer.follower_heads[p] for p in positions]
            dist_pos = [layer.cache.layers[a].anchor_heads.index(h) for h in heads]
            followers.append((a, _index(heads, device), _index(positions, device), _index(dist_pos, device)))
        meta = layer.kernel_meta[device] = (anchor, followers)
    return meta


def _row_start(state, b, device):
    if state.row_start is not None:
        return state.row_start.to(device=device, dtype=torch.int32)
    return torch.zeros(b, dtype=torch.int32, device=device)


def pod_attention_triton(query, view, values, scaling):
    """One layer of PoD attention with the Triton kernels; same contract as `reference_attention`."""
    from ilc.runtime.attention import _dense_part, query_heads, reference_attention

    layer, state = view.layer, view.state
    if state.skip_threshold is not None:
        return reference_attention(query, view, values, scaling)
    b, hq, q, d = query.shape
    group = hq // values.shape[1]
    dev = query.device
    row_start = _row_start(state, b, dev)
    rs_min = state.row_start_min
    anchor_meta, follower_meta = _layer_meta(layer, dev)
    out = torch.empty_like(query)
    decode = q == 1
    scores = state.mode == "scores"
    if anchor_meta is not None:
        heads = layer.anchor_heads
        if decode:
            writes = scores and layer.layer_idx in layer.cache.last_reader
            logits = torch.empty(b, hq, view.total, dtype=torch.float32, device=dev) if writes else None
            heads_t, local_t = anchor_meta
            decode_attention(out, query, query, sink_keys=None, recent_keys=None, recent_start=0,
                             dist_keys=layer.anchor_keys, values=values, row_start=row_start, rs_min=rs_min,
                             heads=heads_t, own_pos=local_t, dist_pos=local_t, total=view.total,
                             sinks=0, window=0, scaling=scaling, proximal=False, logits_out=logits)
            if writes:
                state.logits[layer.layer_idx] = logits
        else:
            qi = query_heads(heads, group)
            out[:, qi] = _dense_part(query[:, qi], layer.anchor_keys[:, :, :view.total], values[:, heads], view,
                                     scaling)
    for anchor, heads_t, own_t, dist_t in follower_meta:
        q_dist = query if state.mode == "keys" else state.queries[anchor]
        common = dict(sink_keys=layer.sink_keys, recent_keys=view.recent_keys, recent_start=view.recent_start,
                      dist_keys=layer.cache.layers[anchor].anchor_keys, values=values, row_start=row_start,
                      rs_min=rs_min, heads=heads_t, own_pos=own_t, dist_pos=dist_t, sinks=state.sinks,
                      window=state.window, scaling=scaling)
        if decode:
            decode_attention(out, query, q_dist, total=view.total, proximal=True,
                             logits_in=state.logits.get(anchor) if scores else None, **common)
        else:
            prefill_attention(out, query, q_dist, start=view.start, total=view.total, **common)
    return out
