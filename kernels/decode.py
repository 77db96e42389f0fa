"""Decode attention (one new token per row) over the PoD cache layout: split-K, then a log-sum-exp merge.

One program handles all query heads of one KV head (GQA: the key/value tile is loaded once) for one split of
the context. Split 0 is the proximal segment (the row's sinks + the recent window, with the layer's own keys);
the other splits walk the distant range with either
- the anchor layer's keys and the distant query (`q_d`), or
- the anchor's logits of this step (scores mode): a follower then reads 4 bytes per query head and position
  instead of the anchor's keys, and only its own values.
An anchor layer runs the same kernel with no proximal split and its own keys over the whole context, and can
write its logits for its followers. Every program writes its partial output and log-sum-exp (-inf when empty);
stage 2 merges them into the output, so every output element is written.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def _sink_tile(SINK_K, V, b, own, kvh, rs, total, d, s_skb, s_skh, s_skn, s_vb, s_vh, s_vn,
               SINKS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Own keys and values of a row's first SINKS real tokens (slots rs .. rs+SINKS-1); `ok` masks missing ones."""
    idx = tl.arange(0, BLOCK_S)
    slot = rs + idx
    ok = (idx < SINKS) & (slot < total)
    k = tl.load(SINK_K + b * s_skb + own * s_skh + idx[:, None] * s_skn + d[None, :], mask=ok[:, None], other=0.0)
    v = tl.load(V + b * s_vb + kvh * s_vh + slot[:, None] * s_vn + d[None, :], mask=ok[:, None], other=0.0)
    return k, v, slot, ok


@triton.jit
def _decode_split(
    Q, QD, SINK_K, RECENT_K, DIST_K, V, LOGITS_IN, LOGITS_OUT, ROW_START, MID_O, MID_LSE,
    HEADS, OWN_POS, DIST_POS,
    total, recent_start, rs_min, scaling,
    s_qb, s_qh, s_qdb, s_qdh,
    s_skb, s_skh, s_skn, s_rkb, s_rkh, s_rkn, s_dkb, s_dkh, s_dkn, s_vb, s_vh, s_vn,
    s_lib, s_lih, s_lob, s_loh,
    s_mb, s_mh, s_ms, s_lb, s_lh,
    SINKS: tl.constexpr, BLOCK_S: tl.constexpr, WINDOW: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    D: tl.constexpr, BLOCK_N: tl.constexpr, split_len,
    HAS_PROXIMAL: tl.constexpr, READ_LOGITS: tl.constexpr, WRITE_LOGITS: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    p = tl.program_id(1)  # index into HEADS (the KV heads this launch serves)
    split = tl.program_id(2)
    kvh = tl.load(HEADS + p)
    own = tl.load(OWN_POS + p)  # this head's index in the sink / recent key tensors
    dpos = tl.load(DIST_POS + p)  # this head's index in the distant key tensor
    rs = tl.load(ROW_START + b)
    g = tl.arange(0, BLOCK_G)
    gmask = g < GROUP
    qh = kvh * GROUP + g
    d = tl.arange(0, D)
    i = total - 1  # the query's slot

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)

    # loop bounds use rs_min (the batch's smallest row start, a host scalar); each row's start is a mask
    dist_lo = rs_min + SINKS if HAS_PROXIMAL else rs_min
    row_lo = rs + SINKS if HAS_PROXIMAL else rs
    dist_hi = total - WINDOW if HAS_PROXIMAL else total
    first_split = 1 if HAS_PROXIMAL else 0
    if HAS_PROXIMAL and split == 0:
        q = tl.load(Q + b * s_qb + qh[:, None] * s_qh + d[None, :], mask=gmask[:, None], other=0.0)
        # sinks: the row's first SINKS real slots (own keys in the sink buffer)
        if SINKS > 0:
            k_sink, v_sink, slot_sink, ok_sink = _sink_tile(SINK_K, V, b, own, kvh, rs, total, d, s_skb, s_skh, s_skn,
                                                            s_vb, s_vh, s_vn, SINKS, BLOCK_S)
            s_sink = _dot(q, tl.trans(k_sink), UPCAST) * scaling
            s_sink = tl.where(ok_sink[None, :], s_sink, float("-inf"))
            m_i, l_i, acc = _softmax_step(s_sink, v_sink, m_i, l_i, acc, UPCAST)
        # recent window: slots [max(rs + SINKS, total - WINDOW), total), own keys from RECENT_K
        lo = tl.maximum(rs_min + SINKS, total - WINDOW)
        for start in range(lo, total, BLOCK_N):
            slot = start + tl.arange(0, BLOCK_N)
            ok = (slot < total) & (slot >= row_lo)
            k = tl.load(RECENT_K + b * s_rkb + own * s_rkh + (slot - recent_start)[:, None] * s_rkn + d[None, :],
                        mask=ok[:, None], other=0.0)
            v = tl.load(V + b * s_vb + kvh * s_vh + slot[:, None] * s_vn + d[None, :], mask=ok[:, None], other=0.0)
            s = _dot(q, tl.trans(k), UPCAST) * scaling
            s = tl.where(ok[None, :], s, float("-inf"))
            m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST)
    else:
        lo = dist_lo + (split - first_split) * split_len
        hi = tl.minimum(lo + split_len, dist_hi)
        if not READ_LOGITS:
            qd = tl.load(QD + b * s_qdb + qh[:, None] * s_qdh + d[None, :], mask=gmask[:, None], other=0.0)
        for start in range(lo, hi, BLOCK_N):
            slot = start + tl.arange(0, BLOCK_N)
            ok = (slot < hi) & (slot >= row_lo)
            if READ_LOGITS:
                s = tl.load(LOGITS_IN + b * s_lib + qh[:, None] * s_lih + slot[None, :],
                            mask=gmask[:, None] & ok[None, :], other=float("-inf"))
            else:
                k = tl.load(DIST_K + b * s_dkb + dpos * s_dkh + slot[:, None] * s_dkn + d[None, :], mask=ok[:, None],
                            other=0.0)
                s = _dot(qd, tl.trans(k), UPCAST) * scaling
                if WRITE_LOGITS:
                    tl.store(LOGITS_OUT + b * s_lob + qh[:, None] * s_loh + slot[None, :], s,
                             mask=gmask[:, None] & ok[None, :])
            s = tl.where(ok[None, :], s, float("-inf"))
            v = tl.load(V + b * s_vb + kvh * s_vh + slot[:, None] * s_vn + d[None, :], mask=ok[:, None], other=0.0)
            m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST)

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(MID_O + b * s_mb + qh[:, None] * s_mh + split * s_ms + d[None, :], out, mask=gmask[:, None])
    tl.store(MID_LSE + b * s_lb + qh * s_lh + split, lse, mask=gmask)


@triton.jit
def _decode_merge(MID_O, MID_LSE, OUT, HEADS, s_mb, s_mh, s_ms, s_lb, s_lh, s_ob, s_oh,
                  NSPLIT, GROUP: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0)
    p = tl.program_id(1)
    g = tl.program_id(2)
    qh = tl.load(HEADS + p) * GROUP + g
    d = tl.arange(0, D)
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([D], tl.float32)
    for s in range(0, NSPLIT):
        lse = tl.load(MID_LSE + b * s_lb + qh * s_lh + s)
        o = tl.load(MID_O + b * s_mb + qh * s_mh + s * s_ms + d)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale_old = tl.exp(m - m_safe)
        w = tl.exp(lse - m_safe)
        acc = acc * scale_old + w * o
        l = l * scale_old + w
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)
    tl.store(OUT + b * s_ob + qh * s_oh + d, out.to(OUT.dtype.element_ty))
