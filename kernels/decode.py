"""Decode attention (one new token per row) over the PoD cache layout: split-K, then a log-sum-exp merge.

One launch serves the FULL and FOLLOWER KV heads of a layer (in keys mode, one per anchor whose keys followers
read), and one more serves each group of STREAMING heads with the same window. A program handles all query heads
of one KV head (GQA: each key/value tile is loaded once) for one split of the slots after the sinks; split 0
also takes the row's sinks. What a head reads depends on its kind, a row of the head table (columns:
`ilc.kernels.table`):
- ANCHOR (a FULL head): its own full keys and values everywhere; if the head has followers, it writes its
  logits of this step into the step-logits buffer (one row per query head, reused by every block in turn);
- FOLLOWER_LOGITS (scores mode): own keys for the sinks and the recent window (read in place from the ring
  buffer, slot % window), and for distant slots the anchor's logits: 4 bytes per query head and position
  instead of the anchor's keys. Values are always the layer's own;
- FOLLOWER_KEYS (keys mode): the same proximal part; distant slots use its own query and the anchor's keys;
- STREAMING: its sinks and its ring of the last WINDOW slots, keys and values; nothing else.
Every program writes its partial output and log-sum-exp (-inf when empty); the merge writes every output element.
With DEVICE_TOTAL (a static cache) the number of slots is read from a device scalar instead of an argument, and
the splits cover the whole preallocated length: splits past the end find nothing, so one CUDA graph serves every
step.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .table import LaunchColumn, LaunchKind

# head kinds and head-table columns (defined once in ilc.kernels.table); constexpr so that the kernels read them
ANCHOR = tl.constexpr(int(LaunchKind.ANCHOR))
FOLLOWER_LOGITS = tl.constexpr(int(LaunchKind.FOLLOWER_LOGITS))
STREAMING = tl.constexpr(int(LaunchKind.STREAMING))
FOLLOWER_KEYS = tl.constexpr(int(LaunchKind.FOLLOWER_KEYS))
NCOL = tl.constexpr(len(LaunchColumn))
COL_KV_HEAD = tl.constexpr(int(LaunchColumn.KV_HEAD))
COL_KIND = tl.constexpr(int(LaunchColumn.KIND))
COL_OWN = tl.constexpr(int(LaunchColumn.OWN))
COL_DIST = tl.constexpr(int(LaunchColumn.DIST))
COL_VALUE = tl.constexpr(int(LaunchColumn.VALUE))
COL_WRITES = tl.constexpr(int(LaunchColumn.WRITES_LOGITS))


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST (interpreter only): triton's interpreter mis-multiplies bf16."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), out_dtype=tl.float32)
    if a.dtype == tl.float32:  # fp32 inputs: exact products, not TF32
        return tl.dot(a, b, out_dtype=tl.float32, input_precision="ieee")
    return tl.dot(a, b, out_dtype=tl.float32)


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, UPCAST: tl.constexpr):
    """One online-softmax update with logits `s` [rows, keys] (-inf = masked) and values `v` [keys, D]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet stays empty
    pr = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    acc = acc * alpha[:, None] + _dot(pr.to(v.dtype), v, UPCAST)
    return m_new, l_i * alpha + tl.sum(pr, 1), acc


@triton.jit
def _sink_tile(SINK_K, V, b, own, vh, rs, total, d, s_skb, s_skh, s_skn, s_vb, s_vh, s_vn,
               SINKS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Own keys and values of a row's first SINKS real tokens (slots rs .. rs+SINKS-1); `ok` masks missing ones.
    SINK_K holds the i-th sink key at row i: a follower's sink buffer, or an anchor's full keys offset by rs.
    V holds the sink at slot rs + i: full-length values, or a streaming sink buffer offset by -rs."""
    idx = tl.arange(0, BLOCK_S)
    slot = rs + idx
    ok = (idx < SINKS) & (slot < total)
    k = tl.load(SINK_K + b * s_skb + own * s_skh + idx[:, None] * s_skn + d[None, :], mask=ok[:, None], other=0.0)
    v = tl.load(V + b * s_vb + vh * s_vh + slot[:, None] * s_vn + d[None, :], mask=ok[:, None], other=0.0)
    return k, v, slot, ok


@triton.jit
def _decode_split(
    Q, ANCHOR_K, SINK_K, RING_K, DIST_K, V, SINK_V, RING_V, LOGITS, ROW_START, MID_O, MID_LSE, TABLE, TOTAL_AT,
    total, rs_min, scaling, split_len, n_qheads,
    s_qb, s_qh, s_akb, s_akh, s_akn, s_skb, s_skh, s_skn, s_rkb, s_rkh, s_rkn, s_dkb, s_dkh, s_dkn,
    s_vb, s_vh, s_vn, s_svb, s_svh, s_svn, s_rvb, s_rvh, s_rvn, s_lb, s_lh,
    SINKS: tl.constexpr, BLOCK_S: tl.constexpr, WINDOW: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    D: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT_CAP: tl.constexpr, UPCAST: tl.constexpr,
    DEVICE_TOTAL: tl.constexpr,
):
    if DEVICE_TOTAL:  # a static cache: the slot count lives on the device, so a captured graph serves every step
        total = tl.load(TOTAL_AT).to(tl.int32)
    b = tl.program_id(0)
    p = tl.program_id(1)  # row of TABLE (columns: LaunchColumn)
    split = tl.program_id(2)
    kvh = tl.load(TABLE + p * NCOL + COL_KV_HEAD)
    kind = tl.load(TABLE + p * NCOL + COL_KIND)
    own = tl.load(TABLE + p * NCOL + COL_OWN)  # index in ANCHOR_K, in SINK_K / RING_K, or in the streaming buffers
    dpos = tl.load(TABLE + p * NCOL + COL_DIST)
    vh = tl.load(TABLE + p * NCOL + COL_VALUE)  # index in V (full-length values)
    writes = tl.load(TABLE + p * NCOL + COL_WRITES) != 0
    rs = tl.load(ROW_START + b)
    g = tl.arange(0, BLOCK_G)
    gmask = g < GROUP
    qh = kvh * GROUP + g
    d = tl.arange(0, D)
    q = tl.load(Q + b * s_qb + qh[:, None] * s_qh + d[None, :], mask=gmask[:, None], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)

    if SINKS > 0:
        if split == 0:  # the row's first SINKS real slots, own keys
            if kind == ANCHOR:  # full keys: the sinks sit at the row's slots rs, rs + 1, ...
                k, v, slot, ok = _sink_tile(ANCHOR_K + rs * s_akn, V, b, own, vh, rs, total, d, s_akb, s_akh, s_akn,
                                            s_vb, s_vh, s_vn, SINKS, BLOCK_S)
            elif kind == STREAMING:  # own sink buffers for keys and values
                k, v, slot, ok = _sink_tile(SINK_K, SINK_V - rs * s_svn, b, own, own, rs, total, d, s_skb, s_skh,
                                            s_skn, s_svb, s_svh, s_svn, SINKS, BLOCK_S)
            else:
                k, v, slot, ok = _sink_tile(SINK_K, V, b, own, vh, rs, total, d, s_skb, s_skh, s_skn,
                                            s_vb, s_vh, s_vn, SINKS, BLOCK_S)
            s = tl.where(ok[None, :], _dot(q, tl.trans(k), UPCAST) * scaling, float("-inf"))
            m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST)

    # this split's slots after the sinks; loop bounds use rs_min (host scalar), each row's start is a mask
    row_lo = rs + SINKS
    lo = rs_min + SINKS + split * split_len
    hi = tl.minimum(lo + split_len, total)
    if kind == ANCHOR:
        for start in range(lo, hi, BLOCK_N):
            slot = start + tl.arange(0, BLOCK_N)
            ok = (slot < hi) & (slot >= row_lo)
            k = tl.load(ANCHOR_K + b * s_akb + own * s_akh + slot[:, None] * s_akn + d[None, :], mask=ok[:, None],
                        other=0.0)
            s = _dot(q, tl.trans(k), UPCAST) * scaling
            tl.store(LOGITS + b * s_lb + qh[:, None] * s_lh + slot[None, :], s,
                     mask=gmask[:, None] & ok[None, :] & writes)
            s = tl.where(ok[None, :], s, float("-inf"))
            v = tl.load(V + b * s_vb + vh * s_vh + slot[:, None] * s_vn + d[None, :], mask=ok[:, None], other=0.0)
            m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST)
    elif kind == STREAMING:
        for start in range(tl.maximum(lo, total - WINDOW), hi, BLOCK_N):  # its window only, keys and values in rings
            slot = start + tl.arange(0, BLOCK_N)
            ok = (slot < hi) & (slot >= row_lo)
            ring = (slot % WINDOW)[:, None]
            k = tl.load(RING_K + b * s_rkb + own * s_rkh + ring * s_rkn + d[None, :], mask=ok[:, None], other=0.0)
            s = tl.where(ok[None, :], _dot(q, tl.trans(k), UPCAST) * scaling, float("-inf"))
            v = tl.load(RING_V + b * s_rvb + own * s_rvh + ring * s_rvn + d[None, :], mask=ok[:, None], other=0.0)
            m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST)
    else:
        dist_hi = tl.minimum(hi, total - WINDOW)
        for start in range(lo, dist_hi, BLOCK_N):  # distant slots: the anchor's logits or keys
            slot = start + tl.arange(0, BLOCK_N)
            ok = (slot < dist_hi) & (slot >= row_lo)
            if kind == FOLLOWER_LOGITS:
                s = tl.load(LOGITS + b * s_lb + qh[:, None] * s_lh + slot[None, :],
                            mask=gmask[:, None] & ok[None, :], other=float("-inf"))
            else:
                k = tl.load(DIST_K + b * s_dkb + dpos * s_dkh + slot[:, None] * s_dkn + d[None, :],
                            mask=ok[:, None], other=0.0)
                s = _dot(q, tl.trans(k), UPCAST) * scaling
            s = tl.where(ok[None, :], s, float("-inf"))
            v = tl.load(V + b * s_vb + vh * s_vh + slot[:, None] * s_vn + d[None, :], mask=ok[:, None], other=0.0)
            m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST)
        for start in range(tl.maximum(lo, total - WINDOW), hi, BLOCK_N):  # recent window: own keys, in the ring
            slot = start + tl.arange(0, BLOCK_N)
            ok = (slot < hi) & (slot >= row_lo)
            k = tl.load(RING_K + b * s_rkb + own * s_rkh + (slot % WINDOW)[:, None] * s_rkn + d[None, :],
                        mask=ok[:, None], other=0.0)
            s = tl.where(ok[None, :], _dot(q, tl.trans(k), UPCAST) * scaling, float("-inf"))
            v = tl.load(V + b * s_vb + vh * s_vh + slot[:, None] * s_vn + d[None, :], mask=ok[:, None], other=0.0)
            m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST)

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    mid = (b * n_qheads + qh) * NSPLIT_CAP + split  # MID_O [B, Hq, NSPLIT_CAP, D] and MID_LSE contiguous
    tl.store(MID_O + mid[:, None] * D + d[None, :], out, mask=gmask[:, None])
    tl.store(MID_LSE + mid, lse, mask=gmask)


@triton.jit
def _decode_merge(MID_O, MID_LSE, OUT, s_ob, s_oh, nsplit, NSPLIT_CAP: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0)
    qh = tl.program_id(1)
    d = tl.arange(0, D)
    row = (b * tl.num_programs(1) + qh) * NSPLIT_CAP
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([D], tl.float32)
    for s in range(0, nsplit):
        lse = tl.load(MID_LSE + row + s)
        o = tl.load(MID_O + (row + s) * D + d)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale_old = tl.exp(m - m_safe)
        w = tl.exp(lse - m_safe)
        acc = acc * scale_old + w * o
        l = l * scale_old + w
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)
    tl.store(OUT + b * s_ob + qh * s_oh + d, out.to(OUT.dtype.element_ty))
