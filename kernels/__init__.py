"""ilc.kernels: Triton kernels for attention over the ilc cache layout; the runtime uses them on CUDA.

The launchers take plain tensors and one head table (int32 [heads, len(LaunchColumn)], columns and kinds defined
once in `ilc.kernels.table`), like vLLM's `decode_attention_fwd`; they know nothing of the cache classes. Triton
itself is imported at the first launch (`decode.py`, `prefill.py`): it is optional off Linux, and importing the
runtime must not need it.
`ilc.runtime.kernel_dispatch` reads a layer's cache and calls them:
- decode (one new token): `decode_attention`, the split-K kernel of `decode.py`, one launch for the FULL and
  FOLLOWER heads of a layer (keys mode: one per anchor whose keys the followers read), one per group of
  STREAMING heads with one window, then one `decode_merge`. In scores mode an anchor writes its logits of the
  step, and its followers read them instead of the anchor's keys;
- decode over quantized heads: `quantized_decode_attention` (`quant_decode.py`), packed int8/int4/int2 keys and
  values dequantized in registers, the same split-K partials and merge;
- prefill: `prefill_attention`, the flash kernel of `prefill.py`, for follower heads and (with
  `streaming=True`) for streaming heads; the runtime runs PyTorch SDPA (FlashAttention) for FULL heads.
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


def decode_block(device: torch.device) -> int:
    """Key slots per decode tile."""
    return 64 if device.type == "cuda" else 16


def decode_splits(device: torch.device, batch: int, kv_heads: int, span: int) -> tuple[int, int, int]:
    """(split capacity, splits, slots per split) for a decode step over `span` slots after the sinks."""
    block_n = decode_block(device)
    cap = max(1, _programs_target(device) // max(1, batch * kv_heads))
    split_len = -(-max(block_n, -(-span // cap)) // block_n) * block_n
    return cap, max(1, -(-span // split_len)), split_len


def decode_attention(query, table, *, group, values, anchor_keys, sink_keys, ring_keys, dist_keys, sink_values,
                     ring_values, logits, row_start, mid_o, mid_lse, total, rs_min, sinks, window, scaling,
                     nsplit, split_len, total_at=None):
    """One split-K launch over the heads in `table` for one decode step; partials go to mid_o / mid_lse.

    query [B, Hq, 1, D] (group = query heads per KV head); values / anchor_keys / dist_keys [B, H, >= total, D] (slot-indexed); sink_keys /
    sink_values [B, H, S, D]; ring_keys / ring_values [B, H, <= window, D] (slot s at s % window); logits
    [B, Hq, >= total] fp32 (anchors write, scores-mode followers read); row_start int32 [B]; mid_o
    [B, Hq, cap, D] and mid_lse [B, Hq, cap] fp32. Tensors a launch does not read may be any tensor.
    total_at: a 0-d int64 device tensor holding the slot count (a static cache; `total` then only bounds the
    splits: the preallocated length)."""
    from .decode import _decode_split

    b, hq, _, d = query.shape
    cap = mid_o.shape[2]
    _decode_split[(b, table.shape[0], nsplit)](
        query, anchor_keys, sink_keys, ring_keys, dist_keys, values, sink_values, ring_values, logits, row_start,
        mid_o, mid_lse, table, query if total_at is None else total_at, total, rs_min, scaling, split_len, hq,
        query.stride(0), query.stride(1), anchor_keys.stride(0), anchor_keys.stride(1), anchor_keys.stride(2),
        sink_keys.stride(0), sink_keys.stride(1), sink_keys.stride(2), ring_keys.stride(0), ring_keys.stride(1),
        ring_keys.stride(2), dist_keys.stride(0), dist_keys.stride(1), dist_keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), sink_values.stride(0), sink_values.stride(1),
        sink_values.stride(2), ring_values.stride(0), ring_values.stride(1), ring_values.stride(2),
        logits.stride(0), logits.stride(1),
        SINKS=sinks, BLOCK_S=max(16, _next_pow2(sinks)), WINDOW=window, GROUP=group,
        BLOCK_G=max(16, _next_pow2(group)), D=d, BLOCK_N=decode_block(query.device), NSPLIT_CAP=cap,
        UPCAST=_upcast(query), DEVICE_TOTAL=total_at is not None,
    )


def quantized_decode_attention(query, table, *, group, head_k, head_v, k_data, k_scale, k_min, v_data, v_scale,
                               v_min, tail_k, tail_v, row_start, mid_o, mid_lse, k_prefix, k_packed, v_prefix,
                               v_packed, total, scaling, key_bits, value_bits, key_channel, quant_group, nsplit,
                               split_len, k_ring=0, v_ring=0, residual=0, total_at=None, sink_k=None, sink_v=None,
                               sinks=0, window=0, k_first=0, v_first=0, groups=0):
    """One split-K launch over quantized heads (`quant_decode.py`); partials go to mid_o / mid_lse as for
    `decode_attention`, then `decode_merge`.

    query [B, Hq, 1, D]; table rows: KV_HEAD, OWN (the head's index in the key tensors) and VALUE (in the value
    tensors). Keys: head_k [B, H, >= k_prefix, D] 16-bit slots [0, k_prefix); k_data uint8 [B, H, >= k_packed,
    D * key_bits / 8] slots [k_prefix, k_prefix + k_packed), k_scale / k_min [B, H, k_packed (or k_packed /
    quant_group with key_channel), D / quant_group (or D)]; tail_k [B, H, >= total - k_prefix - k_packed, D] the
    slots after them. Values the same with v_*, grouped per token. A side stored at 16 bits: prefix and packed 0,
    any tensors for its data. row_start int32 [B].
    A static cache (`slots.StaticSlots`): tails are rings (k_ring / v_ring slots, slot s at s % ring; 0 = linear),
    total_at is a 0-d int64 device tensor holding the slot count (`total` then only bounds the splits), k_packed /
    v_packed are the packed capacities and the counts follow on the device from `residual`.
    Quantized streaming heads (window > 0): sink_k / sink_v [B, H, S, D] each row's `sinks` first real tokens; the
    slots after them in the last `window` count; packed rows shifted by k_first / v_first (growing), or a ring of
    `groups` groups (static; the counts are then not capped by the capacities)."""
    from .quant_decode import _quant_decode_split

    b, hq, _, d = query.shape
    stream = window > 0
    sink_k = sink_k if stream and sink_k is not None and sink_k.numel() else query  # any tensor: never read
    sink_v = sink_v if stream and sink_v is not None and sink_v.numel() else query
    _quant_decode_split[(b, table.shape[0], nsplit)](
        query, head_k, head_v, k_data, k_scale, k_min, v_data, v_scale, v_min, tail_k, tail_v, sink_k, sink_v,
        row_start, mid_o, mid_lse, table, query if total_at is None else total_at, k_prefix, k_packed, k_ring,
        v_prefix, v_packed, v_ring, residual, total, scaling, split_len, hq, sinks, window, k_first, v_first, groups,
        query.stride(0), query.stride(1), head_k.stride(0), head_k.stride(1), head_k.stride(2),
        head_v.stride(0), head_v.stride(1), head_v.stride(2),
        k_data.stride(0), k_data.stride(1), k_data.stride(2), k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        v_data.stride(0), v_data.stride(1), v_data.stride(2), v_scale.stride(0), v_scale.stride(1), v_scale.stride(2),
        tail_k.stride(0), tail_k.stride(1), tail_k.stride(2), tail_v.stride(0), tail_v.stride(1), tail_v.stride(2),
        sink_k.stride(0), sink_k.stride(1), sink_k.stride(2),
        GROUP=group, BLOCK_G=max(16, _next_pow2(group)), D=d, BLOCK_N=decode_block(query.device),
        NSPLIT_CAP=mid_o.shape[2], KEY_BITS=key_bits, VALUE_BITS=value_bits, KEY_CHANNEL=key_channel,
        QGROUP=quant_group, UPCAST=_upcast(query), DEVICE_TOTAL=total_at is not None, STREAM=stream,
    )


def decode_merge(out, mid_o, mid_lse, nsplit):
    """Merge the split partials of every query head into out [B, Hq, 1, D] (log-sum-exp weights)."""
    from .decode import _decode_merge

    b, hq = out.shape[:2]
    _decode_merge[(b, hq)](mid_o, mid_lse, out, out.stride(0), out.stride(1), nsplit, NSPLIT_CAP=mid_o.shape[2],
                           D=out.shape[-1])


def prefill_attention(out, query, q_dist, table, *, group, sink_keys, recent_keys, recent_start, dist_keys, values,
                      sink_values, recent_values, row_start, rs_min, start, total, sinks, window, scaling,
                      streaming=False):
    """Flash prefill for the heads in `table`; writes out[:, their query heads] ([B, Hq, q, D]).

    query / q_dist [B, Hq, q, D] at slots [start, total); recent_keys (and, streaming, recent_values)
    [B, H, total - recent_start, D]; dist_keys / values [B, H, >= total, D]; sink_* [B, H, S, D]."""
    from .prefill import _prefill

    b, hq, q, d = query.shape
    cuda = query.device.type == "cuda"
    block_m, block_n = (128, 64) if cuda else (16, 16)
    grid = (-(-q // block_m), table.shape[0] * group, b)
    _prefill[grid](
        query, q_dist, sink_keys, recent_keys, dist_keys, values, sink_values, recent_values, row_start, out, table,
        start, total, recent_start, rs_min, q, scaling,
        query.stride(0), query.stride(1), query.stride(2), q_dist.stride(0), q_dist.stride(1), q_dist.stride(2),
        sink_keys.stride(0), sink_keys.stride(1), sink_keys.stride(2),
        recent_keys.stride(0), recent_keys.stride(1), recent_keys.stride(2),
        dist_keys.stride(0), dist_keys.stride(1), dist_keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        sink_values.stride(0), sink_values.stride(1), sink_values.stride(2),
        recent_values.stride(0), recent_values.stride(1), recent_values.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        SINKS=sinks, BLOCK_S=max(16, _next_pow2(sinks)), WINDOW=window, GROUP=group, D=d,
        BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=_upcast(query), STREAMING=streaming, num_warps=8,
        num_stages=3 if cuda else 1,
    )
