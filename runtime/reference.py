"""PoD attention in PyTorch: the reference paths, what runs wherever the Triton kernels do not (CPU, token
selection, the compute skip).

Rule, for a query at slot i and a key at slot j <= i of the same row (rs = the row's first real slot), per
KV head by its kind (`ilc.runtime.heads`):
- FULL: ordinary causal attention over own keys and values;
- FOLLOWER: proximal if j - rs < sinks or i - j < window: logit = own query . own key; distant otherwise:
  logit = q_d . anchor key, where q_d is the anchor layer's query ("scores" mode, training-free: a follower
  reproduces its anchor's distant logits) or the layer's own query ("keys" mode); one softmax over all
  logits, then the layer's own values;
- STREAMING: proximal keys only (sinks and the head's own window); distant tokens are not attended.

`reference_attention` runs a growing cache's update (PyTorch SDPA over query chunks, so that an 8k prefill stays
within a few GB); `static_decode` a decode step over a `StaticPoDCache` (every segment at its fixed length,
masked by the device position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention_common import dense_attention, distant_query, follower_groups, query_chunks, query_heads
from .cache import PoDKeys
from .heads import Mode
from .slots import ring_slots
from .static_cache import StaticStep


def reference_attention(query: torch.Tensor, view: PoDKeys, values: torch.Tensor | None,
                        scaling: float) -> torch.Tensor:
    """PoD attention in PyTorch. query [B, Hq, q, D] at slots [view.start, view.total); returns [B, Hq, q, D]."""
    layer = view.layer
    if values is None and layer.value_heads:  # a quantized layer hands none
        values = layer.stored_values(view.total)
    b, hq, q, d = query.shape
    group = hq // len(layer.specs)
    out = query.new_empty(b, hq, q, d)
    if layer.anchor_heads:
        qi = query_heads(layer.anchor_heads, group)
        out[:, qi] = dense_attention(query[:, qi], layer.stored_keys(view.total),
                                 values[:, [layer.value_pos[h] for h in layer.anchor_heads]], view, scaling)
    for anchor, positions in follower_groups(layer).items():
        heads = [layer.follower_heads[p] for p in positions]
        qi = query_heads(heads, group)
        anchor_layer = layer.cache.layers[anchor]
        idx = [anchor_layer.anchor_heads.index(h) for h in heads]
        out[:, qi] = _split_part(
            query[:, qi], distant_query(view, anchor, query, heads),
            sink_keys=layer.sink_keys[:, positions], recent_keys=view.recent_keys[:, positions],
            anchor_keys=anchor_layer.stored_keys(view.total)[:, idx],
            values=values[:, [layer.value_pos[h] for h in heads]], view=view, scaling=scaling,
        )
    for index, stream in enumerate(layer.stream_groups):
        qi = query_heads(stream.heads, group)
        recent_start, recent_k, recent_v = view.streaming_recent(index)
        out[:, qi] = streaming_part(query[:, qi], stream.sink_k, stream.sink_v, recent_k, recent_v, view=view,
                                    recent_start=recent_start, window=stream.window, scaling=scaling)
    return out


def streaming_part(query, sink_keys, sink_values, recent_keys, recent_values, *, view: PoDKeys, recent_start: int,
                   window: int, scaling: float) -> torch.Tensor:
    """STREAMING heads: attention over each row's sinks and the head's last `window` slots, own K and V.

    sink_* [B, H, S, D] hold each row's first real tokens; recent_* hold logical slots [recent_start, total).
    Streaming heads keep logical slots (`view.logical_start`), also after a plan's selection has run."""
    state = view.state
    start, total = view.logical_start, view.logical_total
    if state.stream_row_start is None:
        n_sink = min(state.sinks, total)
        out, _ = proximal_attention(query, sink_keys[:, :, :n_sink], sink_values[:, :, :n_sink], recent_keys,
                                    recent_values, start=start, recent_start=recent_start, sinks=state.sinks,
                                    window=window, scaling=scaling)
        return out
    b, nq, q, d = query.shape
    s, dev = state.sinks, query.device
    rs = state.row_starts(b, dev, streaming=True)[:, None, None]  # [B, 1, 1]
    js = (rs[:, 0] + torch.arange(s, device=dev)[None, :])[:, None, :]  # [B, 1, S] slots of each row's sinks
    out = torch.empty_like(query)
    for c0 in range(0, q, 256):
        c1 = min(q, c0 + 256)
        i = torch.arange(start + c0, start + c1, device=dev)[:, None]
        w_lo = max(recent_start, start + c0 - window + 1)
        jw = torch.arange(w_lo, start + c1, device=dev)[None, None, :]
        real, m_sink, m_win = _proximal_masks(i, rs, js, jw, total, s, window)
        keys = torch.cat([sink_keys, recent_keys[:, :, w_lo - recent_start:c1 + start - recent_start]], 2)
        vals = torch.cat([sink_values, recent_values[:, :, w_lo - recent_start:c1 + start - recent_start]], 2)
        mask = torch.cat([m_sink, m_win], dim=-1)[:, None]
        out[:, :, c0:c1] = F.scaled_dot_product_attention(query[:, :, c0:c1], keys, vals, attn_mask=mask,
                                                          scale=scaling, enable_gqa=True)
    return out


def _split_part(q_own, q_dist, *, sink_keys, recent_keys, anchor_keys, values, view: PoDKeys, scaling):
    """Follower heads: own sinks + own recent window, anchor's keys for distant slots, one softmax, own values."""
    state = view.state
    if state.row_start is None and state.skip_threshold is None and (view.start == 0 or q_own.shape[2] == 1):
        return _split_fast(q_own, q_dist, sink_keys, recent_keys, anchor_keys, values, view, scaling)
    return _split_masked(q_own, q_dist, sink_keys=sink_keys, recent_keys=recent_keys, anchor_keys=anchor_keys,
                         values=values, view=view, scaling=scaling)


def _attend(q, k, v, causal: bool, scaling: float):
    """Attention that also returns the log-sum-exp of each row's logits: (out [B,H,q,D], lse [B,H,q])."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if q.device.type == "cpu" and q.dtype == torch.float32:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scaling)
    logits = (q.float() @ k.float().transpose(-1, -2)) * scaling
    if causal:
        logits = logits.masked_fill(torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).triu(1),
                                    float("-inf"))
    lse = logits.logsumexp(-1)
    return ((logits - lse[..., None]).exp() @ v.float()).to(q.dtype), lse


def _split_fast(q_own, q_dist, sink_keys, recent_keys, anchor_keys, values, view: PoDKeys, scaling):
    """No padding, prefill from slot 0 or a single query: proximal and distant parts separately, merged by LSE.

    The distant part is then an exact causal square (queries from slot sinks + window, keys from slot sinks),
    which runs on PyTorch's flash kernel instead of a masked softmax over every key.
    """
    s, w = view.state.sinks, view.state.window
    b, nq, q, d = q_own.shape
    start, total = view.start, view.total
    n_sink = min(view.state.sinks, view.total)
    out, lse_p = proximal_attention(q_own, sink_keys[:, :, :n_sink], values[:, :, :n_sink], recent_keys,
                                    values[:, :, view.recent_start:view.total], start=view.start,
                                    recent_start=view.recent_start, sinks=view.state.sinks,
                                    window=view.state.window, scaling=scaling)
    first = max(start, s + w)  # first query slot that has distant keys
    if first >= total:
        return out
    qd = q_dist[:, :, first - start:]
    keys, vals = anchor_keys[:, :, s:total - w], values[:, :, s:total - w]
    o_d, lse_d = _attend(qd, keys, vals, causal=q > 1, scaling=scaling)
    lp = lse_p[:, :, first - start:]
    m = torch.maximum(lp, lse_d)
    wp, wd = (lp - m).exp()[..., None], (lse_d - m).exp()[..., None]
    out[:, :, first - start:] = ((out[:, :, first - start:].float() * wp + o_d.float() * wd) / (wp + wd)).to(out.dtype)
    return out


def proximal_attention(q, sink_keys, sink_values, recent_keys, recent_values, *, start, recent_start, sinks, window,
                       scaling):
    """Attention over the sinks and the recent window only (no padding); returns (out, lse).

    q [B, Hq, q, D] at slots [start, start + q); sink_* [B, H, n_sink, D] hold slots [0, n_sink); recent_* hold
    slots [recent_start, start + q). Used by PoD followers (their proximal part) and by streaming heads.
    """
    b, nq, n_q, d = q.shape
    group = nq // sink_values.shape[1] if sink_values.shape[1] else nq // recent_values.shape[1]
    dev = q.device
    out = torch.empty_like(q)
    lse = q.new_empty(b, nq, n_q, dtype=torch.float32)
    n_sink = sink_keys.shape[2]
    sink_k = sink_keys.repeat_interleave(group, dim=1).float()
    sink_v = sink_values.repeat_interleave(group, dim=1).float()
    chunk = 256
    for c0 in range(0, n_q, chunk):
        c1 = min(n_q, c0 + chunk)
        i_lo, i_hi = start + c0, start + c1
        w_lo = max(recent_start, i_lo - window + 1)
        win_k = recent_keys[:, :, w_lo - recent_start:i_hi - recent_start].repeat_interleave(group, 1)
        win_v = recent_values[:, :, w_lo - recent_start:i_hi - recent_start].repeat_interleave(group, dim=1)
        i = torch.arange(i_lo, i_hi, device=dev)[:, None]
        j = torch.arange(w_lo, i_hi, device=dev)[None, :]
        mask = torch.cat([torch.arange(n_sink, device=dev)[None, :] <= i,
                          (j <= i) & (j > i - window) & (j >= sinks)], -1)
        qc = q[:, :, c0:c1].float()
        logits = torch.cat([qc @ sink_k.transpose(-1, -2), qc @ win_k.float().transpose(-1, -2)], -1) * scaling
        logits = logits.masked_fill(~mask, float("-inf"))
        l = logits.logsumexp(-1)
        p = (logits - l[..., None]).exp()
        out[:, :, c0:c1] = (p[..., :n_sink] @ sink_v + p[..., n_sink:] @ win_v.float()).to(out.dtype)
        lse[:, :, c0:c1] = l
    return out, lse


def _proximal_masks(i, rs, js, jw, total: int, sinks: int, window: int):
    """Masks of the proximal keys under left padding, for query slots i [qc, 1] and rows starting at rs [B, 1, 1]:
    (real [B, qc, 1]: the query is a real token; sink mask over each row's sink slots js [B, 1, S]; window mask
    over slots jw [1, 1, n]). A real query sees its row's stored sinks and its window after them; a pad query sees
    only pad slots in its window (so no row is empty)."""
    real = i >= rs
    m_sink = real & (js <= i) & (js < total)
    m_win = (jw <= i) & (jw > i - window) & (~real | (jw >= rs + sinks))
    return real, m_sink, m_win


def _split_masked(q_own, q_dist, *, sink_keys, recent_keys, anchor_keys, values, view: PoDKeys, scaling):
    """General path (left padding, chunked prefill, compute skip): one masked SDPA over all key segments."""
    state = view.state
    b, nq, q, d = q_own.shape
    s, w = state.sinks, state.window
    dev = q_own.device
    rs = state.row_starts(b, dev)[:, None, None]  # [B, 1, 1]
    min_rs = state.row_start_min
    # Sink values are each row's first real slots; gather them (clamped; unstored ones are masked below).
    sink_slots = rs[:, 0] + torch.arange(s, device=dev)[None, :]  # [B, S]
    gather = sink_slots.clamp(max=view.total - 1)[:, None, :, None].expand(-1, values.shape[1], -1, d)
    sink_values = values.gather(2, gather)
    scores_mode = state.mode == Mode.SCORES
    if scores_mode:  # one SDPA over [own | anchor] logits: widen the head dim so each segment meets its query
        zeros = lambda t: torch.zeros_like(t)  # noqa: E731
        q_cat = torch.cat([q_own, q_dist], dim=-1)
    out = torch.empty_like(q_own)
    approx_keys = s + min(view.total, w + q) + max(0, view.total - w)
    starts, step = query_chunks(q, approx_keys, nq, b)
    for c0 in starts:
        c1 = min(q, c0 + step)
        i_lo, i_hi = view.start + c0, view.start + c1
        i = torch.arange(i_lo, i_hi, device=dev)[:, None]
        # own keys: window slots [w_lo, i_hi) come from the recent keys (which start at view.recent_start)
        w_lo = max(view.recent_start, i_lo - w + 1)
        win_k = recent_keys[:, :, w_lo - view.recent_start:i_hi - view.recent_start]
        win_v = values[:, :, w_lo:i_hi]
        # distant slots [d_lo, d_hi): anchor keys
        d_lo = min_rs + s
        d_hi = max(d_lo, i_hi - w)
        dist_k = anchor_keys[:, :, d_lo:d_hi]
        dist_v = values[:, :, d_lo:d_hi]
        js = sink_slots[:, None, :]  # [B, 1, S]
        jw = torch.arange(w_lo, i_hi, device=dev)[None, None, :]
        jd = torch.arange(d_lo, d_hi, device=dev)[None, None, :]
        real, m_sink, m_win = _proximal_masks(i, rs, js, jw, view.total, s, w)
        m_dist = real & (jd >= rs + s) & (jd <= i - w)
        if scores_mode:
            keys = torch.cat([torch.cat([sink_keys, zeros(sink_keys)], -1), torch.cat([win_k, zeros(win_k)], -1),
                              torch.cat([zeros(dist_k), dist_k], -1)], dim=2)
            qc = q_cat[:, :, c0:c1]
        else:
            keys = torch.cat([sink_keys, win_k, dist_k], dim=2)
            qc = q_own[:, :, c0:c1]
        vals = torch.cat([sink_values, win_v, dist_v], dim=2)
        mask = torch.cat([m_sink, m_win, m_dist], dim=-1)[:, None]  # [B, 1, qc, K]
        if state.skip_threshold is not None and d_hi > d_lo:
            mask = _skip_distant(q_own[:, :, c0:c1], q_dist[:, :, c0:c1], sink_keys, win_k, dist_k,
                                 mask, m_dist.shape[-1], state, scaling)
        out[:, :, c0:c1] = F.scaled_dot_product_attention(qc, keys, vals, attn_mask=mask, scale=scaling,
                                                          enable_gqa=True)
    return out


def _skip_distant(q_own, q_dist, sink_keys, win_k, dist_k, mask, n_dist, state, scaling):
    """The paper's compute skip: drop a row's distant logits where proximal tokens hold >= tau of the mass."""
    group = q_own.shape[1] // sink_keys.shape[1]
    rep = lambda t: t.repeat_interleave(group, dim=1)  # noqa: E731
    prox = torch.cat([sink_keys, win_k], dim=2)
    lp = (q_own.float() @ rep(prox).float().transpose(-1, -2)) * scaling
    ld = (q_dist.float() @ rep(dist_k).float().transpose(-1, -2)) * scaling
    n_prox = prox.shape[2]
    lse_p = lp.masked_fill(~mask[..., :n_prox], float("-inf")).logsumexp(-1)
    lse_d = ld.masked_fill(~mask[..., n_prox:], float("-inf")).logsumexp(-1)
    skip = torch.sigmoid(lse_p - lse_d) >= state.skip_threshold  # [B, Hq', qc]; no distant mass -> sigmoid = 1
    has_distant = mask[..., n_prox:].any(-1)
    state.skipped_rows += int((skip & has_distant).sum())
    state.follower_rows += int(has_distant.expand_as(skip).sum())
    mask = mask.expand(-1, q_own.shape[1], -1, -1).clone()
    mask[..., n_prox:] &= ~skip[..., None]
    return mask


def static_decode(query, step: StaticStep, values, scaling: float) -> torch.Tensor:
    """One decode step over a `StaticPoDCache`, query [B, Hq, 1, D] -> [B, Hq, 1, D]: every key segment at its
    full, fixed length, masked by position (the new token's slot `step.position` is a device tensor)."""
    layer, state = step.layer, step.state
    b, hq, _, d = query.shape
    group = hq // len(layer.specs)
    i, dev = step.position, query.device
    if values is None and layer.value_heads:  # a quantized layer hands none
        values = layer.decode_values(i)
    rs = state.row_starts(b, dev)
    s, w = state.sinks, state.window
    slots = torch.arange(layer.max_length, device=dev)
    out = query.new_empty(b, hq, 1, d)
    if layer.anchor_heads:
        qi = query_heads(layer.anchor_heads, group)
        mask = (slots[None] <= i) & (slots[None] >= rs[:, None])  # [B, L]
        out[:, qi] = F.scaled_dot_product_attention(
            query[:, qi], layer.decode_keys(i), values[:, [layer.value_pos[h] for h in layer.anchor_heads]],
            attn_mask=mask[:, None, None], scale=scaling, enable_gqa=True)
    for anchor, positions in follower_groups(layer).items():
        heads = [layer.follower_heads[p] for p in positions]
        qi = query_heads(heads, group)
        anchor_layer = layer.cache.layers[anchor]
        vals = values[:, [layer.value_pos[h] for h in heads]]
        ring = layer.ring_keys[:, positions]
        ring_pos = ring_slots(i, ring.shape[2])
        m_ring = (ring_pos >= (rs + s)[:, None]) & (ring_pos > i - w)  # [B, W]; no pads, no sinks, in the window
        dist_k = anchor_layer.decode_keys(i)[:, [anchor_layer.anchor_heads.index(h) for h in heads]]
        m_dist = (slots[None] >= (rs + s)[:, None]) & (slots[None] <= i - w)  # [B, L]
        out[:, qi] = _static_softmax(
            query[:, qi], distant_query(step, anchor, query, heads), rs, i, scaling,
            own=[(layer.sink_keys[:, positions], _sink_values(vals, rs, s)), (ring, vals.index_select(2, ring_pos.clamp(min=0)))],
            own_masks=[_sink_mask(rs, s, i), m_ring], dist=(dist_k, vals, m_dist))
    for stream in layer.stream_groups:
        qi = query_heads(stream.heads, group)
        if stream.quantized:  # the window's packed groups and recent slots, each with the slot it holds
            (keys, held), (vals, _) = stream.key_slots.window_read(i), stream.value_slots.window_read(i)
            m_win = (held[None] >= (rs + s)[:, None]) & (held[None] > i - stream.window)
            out[:, qi] = _static_softmax(query[:, qi], None, rs, i, scaling, own=[(stream.sink_k, stream.sink_v),
                                                                                   (keys, vals)],
                                         own_masks=[_sink_mask(rs, s, i), m_win], dist=None)
            continue
        ring_pos = ring_slots(i, stream.ring_k.shape[2])
        m_ring = (ring_pos >= (rs + s)[:, None]) & (ring_pos > i - stream.window)
        out[:, qi] = _static_softmax(query[:, qi], None, rs, i, scaling,
                                     own=[(stream.sink_k, stream.sink_v), (stream.ring_k, stream.ring_v)],
                                     own_masks=[_sink_mask(rs, s, i), m_ring], dist=None)
    return out


def _sink_mask(rs: torch.Tensor, sinks: int, i: torch.Tensor) -> torch.Tensor:
    """[B, S]: sink k of each row is stored (its slot rs + k is at most i)."""
    return (rs[:, None] + torch.arange(sinks, device=rs.device)[None]) <= i


def _sink_values(values: torch.Tensor, rs: torch.Tensor, sinks: int) -> torch.Tensor:
    """[B, H, S, D] values of each row's sink slots (clamped: unstored ones are masked)."""
    slots = (rs[:, None] + torch.arange(sinks, device=rs.device)[None]).clamp(max=values.shape[2] - 1)
    return values.gather(2, slots[:, None, :, None].expand(-1, values.shape[1], -1, values.shape[3]))


def _static_softmax(q_own, q_dist, rs, i, scaling, *, own, own_masks, dist):
    """One softmax over own-key segments (keys, values) and an optional distant segment (anchor keys scored by
    q_dist, own values); masks [B, n] per segment. q [B, Hq', 1, D]; returns [B, Hq', 1, D]."""
    b, nq, _, d = q_own.shape
    n_kv = own[0][0].shape[1]
    g = nq // n_kv
    qo = q_own.reshape(b, n_kv, g, d).float()
    logits, vals, masks = [], [], []
    for (k, v), m in zip(own, own_masks):
        logits.append(torch.einsum("bhgd,bhnd->bhgn", qo, k.float()))
        vals.append(v)
        masks.append(m)
    if dist is not None:
        k, v, m = dist
        qd = q_dist.reshape(b, n_kv, g, d).float()
        logits.append(torch.einsum("bhgd,bhnd->bhgn", qd, k.float()))
        vals.append(v)
        masks.append(m)
    lg = torch.cat(logits, -1) * scaling
    lg = lg.masked_fill(~torch.cat(masks, -1)[:, None, None], float("-inf"))
    p = torch.softmax(lg, -1)
    o = torch.einsum("bhgn,bhnd->bhgd", p, torch.cat(vals, 2).float())
    return o.reshape(b, nq, 1, d).to(q_own.dtype)
