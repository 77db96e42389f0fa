"""Decode attention over quantized heads: packed integers dequantized in registers, split-K, then `_decode_merge`.

The keys (and the values) of a launch's heads share one stored layout (`ilc.runtime.slots.Slots`): for slots
[0, total) of a row, the first `prefix` in 16-bit buffers (HEAD_K / HEAD_V), the next `packed` as integers
(K_DATA / V_DATA, KEY_BITS / VALUE_BITS per element packed along head_dim: element d sits in byte d % (D / per_byte)
at bit offset BITS * (d // (D / per_byte))), then the tail in 16-bit buffers (TAIL_K / TAIL_V); keys and values
have their own prefix and packed count (a 16-bit side has neither: all its slots are its tail). A tail is linear
(slot s at s - prefix - packed) or, for a static cache, a ring (k_ring / v_ring > 0: slot s at s % ring). With
DEVICE_TOTAL (a static cache) the slot count is read from TOTAL_AT, the packed arguments are capacities, and each
side's packed count follows on the device: max(0, total - prefix - residual) // QGROUP * QGROUP, at most its
capacity (`bits.quantized_tokens`). Each group of QGROUP elements
has a 16-bit scale and minimum: x = q * scale + minimum; keys grouped per channel (KEY_CHANNEL: QGROUP tokens of
one channel) or per token (QGROUP channels of one token), values per token. A program handles all query heads
of one KV head (GQA) for one split of the slots; slots before the row's start (left padding) are masked.

STREAM (quantized STREAMING heads, `slots.Slots` / `StaticSlots` with a window; prefix 0): only the row's sinks
(SINK_K / SINK_V, [B, H, S, D], read by split 0) and slots in the last `window` after them count. Their packed rows
are either shifted (growing: packed slot s at row s - first, `first` the slots dropped) or a ring of `groups` groups
(static: packed slot s at row ((s // QGROUP) % groups) * QGROUP + s % QGROUP, and the packed count is not capped).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode import _dot, _softmax_step
from .table import LaunchColumn

NCOL = tl.constexpr(len(LaunchColumn))
COL_KV_HEAD = tl.constexpr(int(LaunchColumn.KV_HEAD))
COL_OWN = tl.constexpr(int(LaunchColumn.OWN))
COL_VALUE = tl.constexpr(int(LaunchColumn.VALUE))


@triton.jit
def _dequantized(DATA, SCALE, MIN, base_data, base_param, s_dn, s_pn, slot, ok, d,
                 BITS: tl.constexpr, CHANNEL: tl.constexpr, QGROUP: tl.constexpr, D: tl.constexpr):
    """[BLOCK_N, D] fp32 of the packed slots `slot` (rows of DATA), zeros where not `ok`."""
    PER: tl.constexpr = 8 // BITS
    byte = tl.load(DATA + base_data + slot[:, None] * s_dn + (d % (D // PER))[None, :], mask=ok[:, None], other=0)
    q = (byte.to(tl.int32) >> ((d // (D // PER)) * BITS)[None, :]) & ((1 << BITS) - 1)
    if CHANNEL:
        param = (slot // QGROUP)[:, None] * s_pn + d[None, :]
    else:
        param = slot[:, None] * s_pn + (d // QGROUP)[None, :]
    scale = tl.load(SCALE + base_param + param, mask=ok[:, None], other=0.0).to(tl.float32)
    minimum = tl.load(MIN + base_param + param, mask=ok[:, None], other=0.0).to(tl.float32)
    return q.to(tl.float32) * scale + minimum


@triton.jit
def _slots(HEAD, TAIL, DATA, SCALE, MIN, b, own, slot, live, d, prefix, packed, ring, first, groups, s_hb, s_hh,
           s_hn, s_tb, s_th, s_tn, s_db, s_dh, s_dn, s_pb, s_ph, s_pn, BITS: tl.constexpr, CHANNEL: tl.constexpr,
           QGROUP: tl.constexpr, D: tl.constexpr):
    """[BLOCK_N, D] fp32 of slots `slot` of head `own` (one `Slots`): 16-bit prefix, packed middle (rows shifted by
    `first`, or a ring of `groups` groups), 16-bit tail (linear, or a ring of `ring` slots)."""
    tail_start = prefix + packed
    rel = slot - prefix
    row = tl.where(groups > 0, ((rel // QGROUP) % tl.maximum(groups, 1)) * QGROUP + rel % QGROUP, rel - first)
    in_head = live & (slot < prefix)
    in_packed = live & (slot >= prefix) & (slot < tail_start)
    in_tail = live & (slot >= tail_start)
    tail_slot = tl.where(ring > 0, slot % tl.maximum(ring, 1), slot - tail_start)
    x = tl.load(HEAD + b * s_hb + own * s_hh + slot[:, None] * s_hn + d[None, :], mask=in_head[:, None],
                other=0.0).to(tl.float32)
    x += tl.load(TAIL + b * s_tb + own * s_th + tail_slot[:, None] * s_tn + d[None, :],
                 mask=in_tail[:, None], other=0.0).to(tl.float32)
    x += _dequantized(DATA, SCALE, MIN, b * s_db + own * s_dh, b * s_pb + own * s_ph, s_dn, s_pn, row,
                      in_packed, d, BITS, CHANNEL, QGROUP, D)
    return x


@triton.jit
def _quant_decode_split(
    Q, HEAD_K, HEAD_V, K_DATA, K_SCALE, K_MIN, V_DATA, V_SCALE, V_MIN, TAIL_K, TAIL_V, SINK_K, SINK_V, ROW_START,
    MID_O, MID_LSE, TABLE, TOTAL_AT, k_prefix, k_packed, k_ring, v_prefix, v_packed, v_ring, residual, total, scaling,
    split_len, n_qheads, sinks, window, k_first, v_first, groups,
    s_qb, s_qh, s_hkb, s_hkh, s_hkn, s_hvb, s_hvh, s_hvn, s_kdb, s_kdh, s_kdn, s_kpb, s_kph, s_kpn, s_vdb, s_vdh,
    s_vdn, s_vpb, s_vph, s_vpn, s_tkb, s_tkh, s_tkn, s_tvb, s_tvh, s_tvn, s_sb, s_sh, s_sn,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT_CAP: tl.constexpr,
    KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, KEY_CHANNEL: tl.constexpr, QGROUP: tl.constexpr,
    UPCAST: tl.constexpr, DEVICE_TOTAL: tl.constexpr, STREAM: tl.constexpr,
):
    if DEVICE_TOTAL:  # a static cache: the slot count lives on the device, so a captured graph serves every step
        total = tl.load(TOTAL_AT).to(tl.int32)
        k_count = tl.maximum(total - k_prefix - residual, 0) // QGROUP * QGROUP
        v_count = tl.maximum(total - v_prefix - residual, 0) // QGROUP * QGROUP
        k_packed = k_count if groups > 0 else tl.minimum(k_packed, k_count)  # a ring of groups is not a cap
        v_packed = v_count if groups > 0 else tl.minimum(v_packed, v_count)
    b = tl.program_id(0)
    row = tl.program_id(1)
    split = tl.program_id(2)
    kv_head = tl.load(TABLE + row * NCOL + COL_KV_HEAD)
    own = tl.load(TABLE + row * NCOL + COL_OWN)  # the head's index in the key tensors
    own_v = tl.load(TABLE + row * NCOL + COL_VALUE)  # and in the value tensors
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    qh = kv_head * GROUP + g
    q = tl.load(Q + b * s_qb + qh[:, None] * s_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    rs = tl.load(ROW_START + b)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, total)
    if STREAM:
        if split == 0:  # the row's sinks: its first `sinks` real tokens, stored apart at 16 bits
            for start in range(0, sinks, BLOCK_N):
                k_sink = start + tl.arange(0, BLOCK_N)
                stored = (k_sink < sinks) & (rs + k_sink < total)
                at = b * s_sb + own * s_sh + k_sink[:, None] * s_sn + d[None, :]
                k = tl.load(SINK_K + at, mask=stored[:, None], other=0.0).to(tl.float32)
                v = tl.load(SINK_V + at, mask=stored[:, None], other=0.0).to(tl.float32)
                s = _dot(q.to(tl.float32), tl.trans(k), UPCAST) * scaling
                s = tl.where(stored[None, :], s, float("-inf"))
                m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST)
        lo = tl.maximum(lo, total - window)  # the rest of the window: after the sinks, in the last `window` slots
    for start in range(lo, hi, BLOCK_N):
        slot = start + tl.arange(0, BLOCK_N)
        live = (slot < hi) & (slot >= rs)
        if STREAM:
            live = live & (slot >= rs + sinks)
        k = _slots(HEAD_K, TAIL_K, K_DATA, K_SCALE, K_MIN, b, own, slot, live, d, k_prefix, k_packed, k_ring, k_first,
                   groups, s_hkb, s_hkh, s_hkn, s_tkb, s_tkh, s_tkn, s_kdb, s_kdh, s_kdn, s_kpb, s_kph, s_kpn,
                   KEY_BITS, KEY_CHANNEL, QGROUP, D)
        v = _slots(HEAD_V, TAIL_V, V_DATA, V_SCALE, V_MIN, b, own_v, slot, live, d, v_prefix, v_packed, v_ring,
                   v_first, groups, s_hvb, s_hvh, s_hvn, s_tvb, s_tvh, s_tvn, s_vdb, s_vdh, s_vdn, s_vpb, s_vph, s_vpn,
                   VALUE_BITS, False, QGROUP, D)
        s = _dot(q.to(tl.float32), tl.trans(k), UPCAST) * scaling
        s = tl.where(live[None, :], s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    mid = (b * n_qheads + qh) * NSPLIT_CAP + split
    tl.store(MID_O + mid[:, None] * D + d[None, :], out, mask=(g < GROUP)[:, None])
    tl.store(MID_LSE + mid, lse, mask=g < GROUP)
