"""Run one layer of ilc attention with the Triton kernels (`ilc.kernels`): read the cache, build head tables, launch.

Same contract as `ilc.runtime.attention.reference_attention`. Head tables (int32 rows, columns `LaunchColumn`)
are built once per layer and device. Buffers the launches need (split partials, step logits, row starts) live in
the cache state and are reused across layers and steps, so a decode step allocates only its outputs. The compute
skip (`skip_threshold`) runs on the reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ilc.kernels import decode_splits, ops
from ilc.kernels.table import LaunchColumn, LaunchKind

from .attention_common import dense_attention, follower_groups, query_heads
from .cache import CacheState, PoDKeys, PoDLayer, QuantizedPoDLayer
from .slots import grown_capacity, spec_groups
from .heads import HeadKind, Mode
from .reference import reference_attention


def launch_kind(kind: HeadKind, mode: Mode) -> LaunchKind:
    """The kernels' kind for a head of `kind` under `mode` (a follower reads logits in scores mode, keys in keys)."""
    if kind == HeadKind.FOLLOWER:
        return LaunchKind.FOLLOWER_LOGITS if mode == Mode.SCORES else LaunchKind.FOLLOWER_KEYS
    return {HeadKind.FULL: LaunchKind.ANCHOR, HeadKind.STREAMING: LaunchKind.STREAMING}[kind]


def _table(rows: list[dict], device) -> torch.Tensor:
    """int32 [len(rows), len(LaunchColumn)] from rows given as {LaunchColumn: value} (missing columns are 0)."""
    table = torch.zeros(len(rows), len(LaunchColumn), dtype=torch.int32)
    for i, row in enumerate(rows):
        for col, value in row.items():
            table[i, col] = int(value)
    return table.to(device)


@dataclass
class DecodeLaunch:
    table: torch.Tensor
    dist_layer: int | None = None  # keys mode: the anchor layer whose keys the followers read
    stream: int | None = None  # index of the layer's StreamGroup (a STREAMING launch)


@dataclass
class LayerLaunches:
    """What one layer's launches need that never changes: head tables on the device, built once."""

    decode: list  # DecodeLaunch
    reads_logits: list  # (KV head, anchor layer) pairs whose distant logits this layer reads (scores mode)
    writes_logits: list  # KV heads whose logits this (anchor) layer leaves for its followers
    prefill_followers: list  # (anchor layer, head table)
    prefill_streams: list  # (StreamGroup index, head table)


def layer_launches(layer: PoDLayer, device) -> LayerLaunches:
    meta = layer.kernel_meta.get(device)
    if meta is not None:
        return meta
    cache, i = layer.cache, layer.layer_idx
    scores = layer.state.mode == Mode.SCORES
    later = [other.anchors for other in cache.layers[i + 1:]]
    # scores mode: an anchor head with followers leaves its logits of the step for them (keys mode: nobody reads them)
    writes = [h for h in layer.anchor_heads if scores and any(anchors[h] == i for anchors in later)]
    col = LaunchColumn
    anchor_rows = [{col.KV_HEAD: h, col.KIND: launch_kind(HeadKind.FULL, layer.state.mode), col.OWN: pos, col.VALUE: layer.value_pos[h],
                    col.WRITES_LOGITS: h in writes} for pos, h in enumerate(layer.anchor_heads)]
    groups = follower_groups(layer)
    # decode launches by the anchor keys they read: scores-mode followers read logits, so one launch (None) serves
    # every head; keys mode needs one per anchor. The layer's own anchor heads ride in the first launch.
    first = None if scores or not groups else next(iter(groups))
    by_source = {first: anchor_rows}
    prefill, reads = [], []
    for a, positions in groups.items():
        heads = [layer.follower_heads[p] for p in positions]
        kind = launch_kind(HeadKind.FOLLOWER, layer.state.mode)
        rows = [{col.KV_HEAD: h, col.KIND: kind, col.OWN: p, col.DIST: cache.layers[a].anchor_heads.index(h),
                 col.VALUE: layer.value_pos[h]} for h, p in zip(heads, positions)]
        prefill.append((a, _table(rows, device)))
        by_source.setdefault(None if scores else a, []).extend(rows)
        if scores:
            reads += [(h, a) for h in heads]
    decode = [DecodeLaunch(_table(rows, device), src) for src, rows in by_source.items() if rows]
    streams = []
    for index, group in enumerate(layer.stream_groups):
        if group.quantized:  # the quantized kernel reads it (`quantized_stream_launches`)
            continue
        table = _table([{col.KV_HEAD: h, col.KIND: launch_kind(HeadKind.STREAMING, layer.state.mode), col.OWN: pos}
                        for pos, h in enumerate(group.heads)], device)
        decode.append(DecodeLaunch(table, stream=index))
        streams.append((index, table))
    meta = layer.kernel_meta[device] = LayerLaunches(decode, reads, writes, prefill, streams)
    return meta


def _row_start(state: CacheState, b, device) -> torch.Tensor:
    """`state.row_starts` as int32 on `device`, converted once per change of the row starts (or batch size, for
    the no-padding zeros) rather than on every layer call."""
    scratch = state.kernel_scratch
    source, rows = state.row_start, scratch.get("row_start")
    if rows is None or scratch["row_start_of"] is not source or rows.shape[0] != b or rows.device != device:
        rows = state.row_starts(b, device).to(torch.int32)
        scratch.update(row_start_of=source, row_start=rows)
    return rows


def _decode_scratch(state, b, hq, d, cap, total, device):
    """Reused decode buffers: split partials [B, Hq, cap, D] + LSE, and step logits [B, Hq, >= total] (fp32)."""
    scratch = state.kernel_scratch
    mid_o = scratch.get("mid_o")
    if mid_o is None or mid_o.shape != (b, hq, cap, d) or mid_o.device != device:
        scratch["mid_o"] = torch.empty(b, hq, cap, d, dtype=torch.float32, device=device)
        scratch["mid_lse"] = torch.empty(b, hq, cap, dtype=torch.float32, device=device)
    logits = scratch.get("logits")
    if logits is None or logits.shape[:2] != (b, hq) or logits.shape[2] < total or logits.device != device:
        scratch["logits"] = torch.empty(b, hq, grown_capacity(total), dtype=torch.float32, device=device)
        scratch["logits_from"] = {}  # KV head -> (anchor layer, step length) whose logits the buffer holds
    return scratch["mid_o"], scratch["mid_lse"], scratch["logits"]


def _decode(out, query, layer: PoDLayer, total: int, values, row_start, scaling, total_at=None):
    """One decode step of one layer: split-K launches over all its KV heads, then one merge into `out`.
    total: the layer's slot count; with a static cache, its preallocated length, and `total_at` the device
    scalar holding the slot count."""
    state = layer.state
    b, hq, _, d = query.shape
    group = hq // len(layer.specs)
    dev = query.device
    cap, nsplit, split_len = decode_splits(dev, b, len(layer.specs), max(1, total - state.row_start_min - state.sinks))
    mid_o, mid_lse, logits = _decode_scratch(state, b, hq, d, cap, total, dev)
    meta = layer_launches(layer, dev)
    # Growing cache: check that every anchor whose step logits this layer reads has written them in this step.
    # A static cache skips the bookkeeping (a captured graph replays one fixed layer order, and a host-side record
    # that changes every step would force recompiles).
    track = total_at is None
    logits_from = state.kernel_scratch["logits_from"]
    for h, a in meta.reads_logits if track else ():
        if logits_from.get(h) != (a, total):
            raise RuntimeError(f"layer {layer.layer_idx}, KV head {h}: the step logits of anchor layer {a} are "
                               "missing (layers must run in order within one decode step)")
    dummy = query  # any tensor for pointer arguments a launch does not read
    pick = lambda t, ok: t if ok and t is not None and t.numel() else dummy  # noqa: E731
    common = dict(group=group, logits=logits, row_start=row_start, mid_o=mid_o, mid_lse=mid_lse, total=total,
                  rs_min=state.row_start_min, sinks=state.sinks, scaling=scaling, nsplit=nsplit, split_len=split_len,
                  total_at=total_at)
    _decode_streams(query, layer, meta.decode, common)
    for launch in meta.decode:
        if launch.stream is not None:
            continue
        dist = layer.cache.layers[launch.dist_layer].anchor_keys if launch.dist_layer is not None else dummy
        ops.decode_attention(query, launch.table, values=pick(values, True),
                             anchor_keys=pick(layer.anchor_keys, bool(layer.anchor_heads)),
                             sink_keys=pick(layer.sink_keys, bool(layer.follower_heads)),
                             ring_keys=pick(layer.ring_keys, bool(layer.follower_heads)), dist_keys=dist,
                             sink_values=dummy, ring_values=dummy, window=state.window, **common)
    for h in meta.writes_logits if track else ():
        logits_from[h] = (layer.layer_idx, total)
    ops.decode_merge(out, mid_o, mid_lse, nsplit)


def quantized_launches(layer: QuantizedPoDLayer, device) -> list[tuple[int, int, torch.Tensor]]:
    """(key group, value group, head table) per pair of `HeadSlots` groups that the layer's FULL heads read: rows
    KV_HEAD, OWN (the head's index in its key `Slots`) and VALUE (in its value `Slots`). Built once per device,
    from the plan's precisions (a static cache builds them before its later layers are initialized)."""
    meta = layer.kernel_meta.get(("quantized", device))
    if meta is not None:
        return meta
    key_groups = spec_groups([layer.precisions[h].key_spec() for h in layer.anchor_heads])
    value_groups = spec_groups([layer.precisions[h].value_spec() for h in layer.value_heads])
    where = lambda groups, i: next((g, positions.index(i)) for g, positions in enumerate(groups)  # noqa: E731
                                   if i in positions)
    rows: dict[tuple[int, int], list[dict]] = {}
    for i, h in enumerate(layer.anchor_heads):
        (gk, own), (gv, own_v) = where(key_groups, i), where(value_groups, layer.value_pos[h])
        rows.setdefault((gk, gv), []).append({LaunchColumn.KV_HEAD: h, LaunchColumn.OWN: own,
                                              LaunchColumn.VALUE: own_v})
    meta = layer.kernel_meta[("quantized", device)] = [(gk, gv, _table(r, device)) for (gk, gv), r in rows.items()]
    return meta


def quantized_stream_launches(layer: QuantizedPoDLayer, device) -> list[tuple[int, torch.Tensor]]:
    """(StreamGroup index, head table) of each quantized stream group of the layer: rows KV_HEAD, OWN and VALUE (the
    head's index in the group's key and value `Slots`). Built once per device."""
    meta = layer.kernel_meta.get(("quantized streams", device))
    if meta is None:
        col = LaunchColumn
        meta = layer.kernel_meta[("quantized streams", device)] = [
            (index, _table([{col.KV_HEAD: h, col.OWN: pos, col.VALUE: pos} for pos, h in enumerate(g.heads)], device))
            for index, g in enumerate(layer.stream_groups) if g.quantized]
    return meta


def _decode_streams(query, layer: PoDLayer, launches: list, common: dict) -> None:
    """The 16-bit STREAMING launches of a decode step (one per window size): sinks and ring, own K and V."""
    for launch in launches:
        if launch.stream is None:
            continue
        g = layer.stream_groups[launch.stream]
        sink_k, sink_v = (t if t.numel() else query for t in (g.sink_k, g.sink_v))  # no sinks: any tensor
        ops.decode_attention(query, launch.table, values=query, anchor_keys=query, sink_keys=sink_k,
                             ring_keys=g.ring_k, dist_keys=query, sink_values=sink_v, ring_values=g.ring_v,
                             window=g.window, **common)


def _no_ints(state: CacheState, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8, fp16) tensors to pass as the data and scales of a side stored at 16 bits (never read)."""
    return state.kernel_scratch.setdefault("no_ints", (torch.zeros(1, 1, 1, 1, dtype=torch.uint8, device=device),
                                                       torch.zeros(1, 1, 1, 1, dtype=torch.float16, device=device)))


def _decode_quantized(out, query, layer: QuantizedPoDLayer, total: int, row_start, scaling, total_at=None):
    """One decode step of a layer with quantized heads (plans without followers): its FULL heads and its quantized
    streaming heads through the quantized kernel (packed slots dequantized in registers), its 16-bit streaming
    heads through the decode kernel, one merge. total / total_at as for `_decode` (a static cache: its length, and
    the slot count on the device)."""
    state = layer.state
    b, hq, _, d = query.shape
    group = hq // len(layer.specs)
    dev = query.device
    cap, nsplit, split_len = decode_splits(dev, b, len(layer.specs), max(1, total))  # splits cover [0, total)
    mid_o, mid_lse, logits = _decode_scratch(state, b, hq, d, cap, total, dev)
    common = dict(group=group, row_start=row_start, mid_o=mid_o, mid_lse=mid_lse, total=total, scaling=scaling,
                  nsplit=nsplit, split_len=split_len, total_at=total_at)
    _decode_streams(query, layer, layer_launches(layer, dev).decode,
                    dict(common, logits=logits, rs_min=state.row_start_min, sinks=state.sinks))
    no_ints = _no_ints(state, dev)
    for gk, gv, table in quantized_launches(layer, dev):
        _quantized_launch(query, table, layer.key_slots.groups[gk][1], layer.value_slots.groups[gv][1], common,
                          no_ints)
    for index, table in quantized_stream_launches(layer, dev):
        g = layer.stream_groups[index]
        _quantized_launch(query, table, g.key_slots, g.value_slots, common, no_ints, sink_k=g.sink_k,
                          sink_v=g.sink_v, sinks=state.sinks, window=g.window)
    ops.decode_merge(out, mid_o, mid_lse, nsplit)


def _quantized_launch(query, table, ks, vs, common: dict, no_ints, **stream) -> None:
    """One quantized-kernel launch over the heads of `table`: keys in `ks`, values in `vs` (one `Slots` or
    `StaticSlots` each; a 16-bit side hands placeholder integers); `stream`: a quantized stream group's sinks and
    window."""
    data = lambda s: (s.data, s.scale, s.minimum) if s.spec else (no_ints[0], no_ints[1], no_ints[1])  # noqa: E731
    (k_data, k_scale, k_min), (v_data, v_scale, v_min) = data(ks), data(vs)
    (head_k, tail_k, k_prefix, k_packed, k_ring), (head_v, tail_v, v_prefix, v_packed, v_ring) = (
        ks.kernel_layout(), vs.kernel_layout())
    (k_first, groups), (v_first, _) = ks.packed_rows(), vs.packed_rows()
    specs = [s.spec for s in (ks, vs) if s.spec]
    ops.quantized_decode_attention(
        query, table, head_k=head_k, head_v=head_v, k_data=k_data, k_scale=k_scale, k_min=k_min,
        v_data=v_data, v_scale=v_scale, v_min=v_min, tail_k=tail_k, tail_v=tail_v, k_prefix=k_prefix,
        k_packed=k_packed, k_ring=k_ring, v_prefix=v_prefix, v_packed=v_packed, v_ring=v_ring,
        residual=ks.residual, key_bits=ks.spec.bits if ks.spec else 8,
        value_bits=vs.spec.bits if vs.spec else 8, key_channel=bool(ks.spec) and ks.spec.axis == "channel",
        quant_group=specs[0].group if specs else 32, k_first=k_first, v_first=v_first, groups=groups, **stream,
        **common)


def static_decode_triton(query, step, values, scaling):
    """A decode step over a `StaticPoDCache` with the Triton kernels: splits over the preallocated length, the slot
    count read on the device (`step.position + 1`), every buffer preallocated (`prepare_static`)."""
    layer, state = step.layer, step.state
    out = torch.empty_like(query)
    row_start = _row_start(state, query.shape[0], query.device)
    if isinstance(layer, QuantizedPoDLayer):
        _decode_quantized(out, query, layer, layer.max_length, row_start, scaling, total_at=step.position + 1)
    else:
        _decode(out, query, layer, layer.max_length, values, row_start, scaling, total_at=step.position + 1)
    return out


def prepare_static(cache, batch: int, device) -> None:
    """Allocate, before any decode step is captured, the buffers `static_decode_triton` reuses: row starts, split
    partials and step logits for the cache's full length, and every layer's head tables."""
    state = cache.state
    plan = cache.plan
    hq, d = plan.model.num_attention_heads, plan.model.head_dim
    span = max(1, cache.max_length - state.row_start_min - state.sinks)
    cap, _, _ = decode_splits(device, batch, plan.num_kv_heads, span)
    _decode_scratch(state, batch, hq, d, cap, cache.max_length, device)
    _row_start(state, batch, device)
    _no_ints(state, device)
    for layer in cache.layers:
        layer_launches(layer, device)
        if isinstance(layer, QuantizedPoDLayer):
            quantized_launches(layer, device)
            quantized_stream_launches(layer, device)


def pod_attention_triton(query, view: PoDKeys, values, scaling):
    """One layer of ilc attention with the Triton kernels; same contract as `reference_attention`."""
    layer, state = view.layer, view.state
    if state.skip_threshold is not None:
        return reference_attention(query, view, values, scaling)
    b, hq, q, d = query.shape
    dev = query.device
    row_start = _row_start(state, b, dev)
    out = torch.empty_like(query)
    if isinstance(layer, QuantizedPoDLayer):  # decode reads packed slots in the kernel; a prompt attends at 16 bits
        if q > 1:
            return reference_attention(query, view, values, scaling)
        _decode_quantized(out, query, layer, view.total, row_start, scaling)
        return out
    if q == 1:
        _decode(out, query, layer, view.total, values, row_start, scaling)
        return out
    group = hq // len(layer.specs)
    if layer.anchor_heads:
        heads = layer.anchor_heads
        qi = query_heads(heads, group)
        out[:, qi] = dense_attention(query[:, qi], layer.anchor_keys[:, :, :view.total],
                                     values[:, [layer.value_pos[h] for h in heads]], view, scaling)
    meta = layer_launches(layer, dev)
    common = dict(group=group, row_start=row_start, rs_min=state.row_start_min, start=view.start, total=view.total,
                  sinks=state.sinks, scaling=scaling)
    sinks_or = lambda t: t if t is not None and t.shape[2] else query  # noqa: E731 (no sinks: any tensor)
    for anchor, table in meta.prefill_followers:
        q_dist = query if state.mode == Mode.KEYS else state.queries[anchor]
        ops.prefill_attention(out, query, q_dist, table, sink_keys=sinks_or(layer.sink_keys),
                          recent_keys=view.recent_keys, recent_start=view.recent_start,
                          dist_keys=layer.cache.layers[anchor].anchor_keys, values=values, sink_values=query,
                          recent_values=query, window=state.window, **common)
    for index, table in meta.prefill_streams:
        g = layer.stream_groups[index]
        recent_start, recent_k, recent_v = view.streaming_recent(index)
        ops.prefill_attention(out, query, query, table, sink_keys=sinks_or(g.sink_k), recent_keys=recent_k,
                          recent_start=recent_start, dist_keys=query, values=query, sink_values=sinks_or(g.sink_v),
                          recent_values=recent_v, window=g.window, streaming=True, **common)
    return out
