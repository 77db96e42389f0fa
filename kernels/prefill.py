"""Prefill attention (many new tokens) over the PoD cache layout: flash attention with an online softmax.

A program owns BLOCK_M queries of one query head. It first attends to the row's sink tokens (own keys), then
walks key tiles from the end of the sinks to its last query. For a tile, every (query, key) pair is proximal
(i - j < window: own query x own key) or distant (distant query x the anchor's key); a tile that holds only
one kind computes one product, a mixed tile (about window / BLOCK_N of them per query tile) computes both and
selects per element. Values are always the layer's own. Anchor heads use `window = context` (all proximal).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode import _dot, _sink_tile, _softmax_step


@triton.jit
def _prefill(
    Q, QD, SINK_K, RECENT_K, DIST_K, V, ROW_START, OUT,
    HEADS, OWN_POS, DIST_POS,
    start, total, recent_start, rs_min, n_query, scaling,
    s_qb, s_qh, s_qn, s_qdb, s_qdh, s_qdn,
    s_skb, s_skh, s_skn, s_rkb, s_rkh, s_rkn, s_dkb, s_dkh, s_dkn, s_vb, s_vh, s_vn,
    s_ob, s_oh, s_on,
    SINKS: tl.constexpr, BLOCK_S: tl.constexpr, WINDOW, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    mblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = tl.program_id(2)
    p = bh // GROUP
    g = bh % GROUP
    kvh = tl.load(HEADS + p)
    own = tl.load(OWN_POS + p)
    dpos = tl.load(DIST_POS + p)
    qh = kvh * GROUP + g
    rs = tl.load(ROW_START + b)
    d = tl.arange(0, D)
    rows = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_query
    i = start + rows  # query slots
    q = tl.load(Q + b * s_qb + qh * s_qh + rows[:, None] * s_qn + d[None, :], mask=rmask[:, None], other=0.0)
    qd = tl.load(QD + b * s_qdb + qh * s_qdh + rows[:, None] * s_qdn + d[None, :], mask=rmask[:, None], other=0.0)
    real = i >= rs

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    if SINKS > 0:
        k_sink, v_sink, slot_sink, ok_sink = _sink_tile(SINK_K, V, b, own, kvh, rs, total, d, s_skb, s_skh, s_skn,
                                                        s_vb, s_vh, s_vn, SINKS, BLOCK_S)
        s_sink = _dot(q, tl.trans(k_sink), UPCAST) * scaling
        valid_sink = ok_sink[None, :] & (slot_sink[None, :] <= i[:, None]) & real[:, None]
        s_sink = tl.where(valid_sink, s_sink, float("-inf"))
        m_i, l_i, acc = _softmax_step(s_sink, v_sink, m_i, l_i, acc, UPCAST)

    i_lo = start + mblock * BLOCK_M
    i_hi = tl.minimum(i_lo + BLOCK_M, start + n_query)  # exclusive
    # loop bounds use rs_min (host scalar); each row's own start is applied by masks.
    # Pad queries (i < rs) attend to pad keys j <= i, so no row is ever empty.
    j_lo = tl.minimum(rs_min + SINKS, i_lo)
    # 1) key tiles that are distant for every query of this tile (j <= i_lo - WINDOW): one product, no causal mask
    n_far = tl.maximum(i_lo - WINDOW + 1 - j_lo, 0) // BLOCK_N
    far_end = j_lo + n_far * BLOCK_N
    for j0 in range(j_lo, far_end, BLOCK_N):
        slot = j0 + tl.arange(0, BLOCK_N)
        kd = tl.load(DIST_K + b * s_dkb + dpos * s_dkh + slot[:, None] * s_dkn + d[None, :])
        v = tl.load(V + b * s_vb + kvh * s_vh + slot[:, None] * s_vn + d[None, :])
        s = _dot(qd, tl.trans(kd), UPCAST) * scaling
        keep = tl.where(real[:, None], slot[None, :] >= rs + SINKS, slot[None, :] < rs)
        s = tl.where(keep, s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST)
    # 2) the tiles near the diagonal: proximal, distant or mixed per element
    for j0 in range(far_end, i_hi, BLOCK_N):
        slot = j0 + tl.arange(0, BLOCK_N)
        kmask = slot < i_hi
        near = (i[:, None] - slot[None, :]) < WINDOW
        s = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
        if i_lo - (j0 + BLOCK_N - 1) < WINDOW:  # some pair in this tile is proximal
            own_ok = kmask & (slot >= recent_start)
            kp = tl.load(RECENT_K + b * s_rkb + own * s_rkh + (slot - recent_start)[:, None] * s_rkn + d[None, :],
                         mask=own_ok[:, None], other=0.0)
            s = tl.where(near, _dot(q, tl.trans(kp), UPCAST) * scaling, s)
        if (i_hi - 1) - j0 >= WINDOW:  # some pair in this tile is distant
            kd = tl.load(DIST_K + b * s_dkb + dpos * s_dkh + slot[:, None] * s_dkn + d[None, :],
                         mask=kmask[:, None], other=0.0)
            s = tl.where(near, s, _dot(qd, tl.trans(kd), UPCAST) * scaling)
        causal = (slot[None, :] <= i[:, None]) & kmask[None, :]
        keep = tl.where(real[:, None], slot[None, :] >= rs + SINKS, slot[None, :] < rs)
        s = tl.where(causal & keep, s, float("-inf"))
        v = tl.load(V + b * s_vb + kvh * s_vh + slot[:, None] * s_vn + d[None, :], mask=kmask[:, None], other=0.0)
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + b * s_ob + qh * s_oh + rows[:, None] * s_on + d[None, :], out.to(OUT.dtype.element_ty),
             mask=rmask[:, None])
