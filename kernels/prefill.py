"""Prefill attention (many new tokens) over the PoD cache layout: flash attention with an online softmax.

A program owns BLOCK_M queries of one query head. It first attends to the row's sink tokens (own keys), then
walks key tiles from the end of the sinks to its last query. For a tile, every (query, key) pair is proximal
(i - j < window: own query x own key) or distant (distant query x the anchor's key); a tile that holds only
one kind computes one product, a mixed tile (about window / BLOCK_N of them per query tile) computes both and
selects per element. Values are always the layer's own. Heads come from rows of the head table (columns:
`ilc.kernels.table`). With STREAMING (a separate launch per window), the heads attend only to their
sinks and their last WINDOW tokens, with keys and values from the sink buffers and the chunk's recent vectors.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode import COL_DIST, COL_KV_HEAD, COL_OWN, COL_VALUE, NCOL, _dot, _sink_tile, _softmax_step


@triton.jit
def _prefill(
    Q, QD, SINK_K, RECENT_K, DIST_K, V, SINK_V, RECENT_V, ROW_START, OUT, TABLE,
    start, total, recent_start, rs_min, n_query, scaling,
    s_qb, s_qh, s_qn, s_qdb, s_qdh, s_qdn,
    s_skb, s_skh, s_skn, s_rkb, s_rkh, s_rkn, s_dkb, s_dkh, s_dkn, s_vb, s_vh, s_vn,
    s_svb, s_svh, s_svn, s_rvb, s_rvh, s_rvn, s_ob, s_oh, s_on,
    SINKS: tl.constexpr, BLOCK_S: tl.constexpr, WINDOW, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, STREAMING: tl.constexpr,
):
    mblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = tl.program_id(2)
    p = bh // GROUP
    g = bh % GROUP
    kvh = tl.load(TABLE + p * NCOL + COL_KV_HEAD)
    own = tl.load(TABLE + p * NCOL + COL_OWN)
    dpos = tl.load(TABLE + p * NCOL + COL_DIST)
    vh = tl.load(TABLE + p * NCOL + COL_VALUE)
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
        if STREAMING:  # own sink buffers for keys and values
            k_sink, v_sink, slot_sink, ok_sink = _sink_tile(SINK_K, SINK_V - rs * s_svn, b, own, own, rs, total, d,
                                                            s_skb, s_skh, s_skn, s_svb, s_svh, s_svn, SINKS, BLOCK_S)
        else:
            k_sink, v_sink, slot_sink, ok_sink = _sink_tile(SINK_K, V, b, own, vh, rs, total, d, s_skb, s_skh, s_skn,
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
    if STREAMING:  # nothing distant: start at the first key inside the tile's windows
        near_lo = tl.maximum(j_lo, i_lo - WINDOW + 1)
    else:
        near_lo = far_end
        for j0 in range(j_lo, far_end, BLOCK_N):
            slot = j0 + tl.arange(0, BLOCK_N)
            kd = tl.load(DIST_K + b * s_dkb + dpos * s_dkh + slot[:, None] * s_dkn + d[None, :])
            v = tl.load(V + b * s_vb + vh * s_vh + slot[:, None] * s_vn + d[None, :])
            s = _dot(qd, tl.trans(kd), UPCAST) * scaling
            keep = tl.where(real[:, None], slot[None, :] >= rs + SINKS, slot[None, :] < rs)
            s = tl.where(keep, s, float("-inf"))
            m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST)
    # 2) the tiles near the diagonal: proximal, distant or mixed per element (streaming: proximal only)
    for j0 in range(near_lo, i_hi, BLOCK_N):
        slot = j0 + tl.arange(0, BLOCK_N)
        kmask = slot < i_hi
        near = (i[:, None] - slot[None, :]) < WINDOW
        s = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
        if i_lo - (j0 + BLOCK_N - 1) < WINDOW:  # some pair in this tile is proximal
            own_ok = kmask & (slot >= recent_start)
            kp = tl.load(RECENT_K + b * s_rkb + own * s_rkh + (slot - recent_start)[:, None] * s_rkn + d[None, :],
                         mask=own_ok[:, None], other=0.0)
            s = tl.where(near, _dot(q, tl.trans(kp), UPCAST) * scaling, s)
        if not STREAMING:
            if (i_hi - 1) - j0 >= WINDOW:  # some pair in this tile is distant
                kd = tl.load(DIST_K + b * s_dkb + dpos * s_dkh + slot[:, None] * s_dkn + d[None, :],
                             mask=kmask[:, None], other=0.0)
                s = tl.where(near, s, _dot(qd, tl.trans(kd), UPCAST) * scaling)
        causal = (slot[None, :] <= i[:, None]) & kmask[None, :]
        keep = tl.where(real[:, None], slot[None, :] >= rs + SINKS, slot[None, :] < rs)
        s = tl.where(causal & keep, s, float("-inf"))
        if STREAMING:
            own_ok = kmask & (slot >= recent_start)
            v = tl.load(RECENT_V + b * s_rvb + own * s_rvh + (slot - recent_start)[:, None] * s_rvn + d[None, :],
                        mask=own_ok[:, None], other=0.0)
        else:
            v = tl.load(V + b * s_vb + vh * s_vh + slot[:, None] * s_vn + d[None, :], mask=kmask[:, None], other=0.0)
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + b * s_ob + qh * s_oh + rows[:, None] * s_on + d[None, :], out.to(OUT.dtype.element_ty),
             mask=rmask[:, None])
