"""Price KV precision per head: the output error of storing a head's keys and values as integers
(`ilc.runtime.quant`), measured like every other option (`similarity.streaming_error`).

For each sampled row at position i, the sinks [0, sinks) and a recent residual [i - residual + 1, i] stay in the
model's dtype (as KIVI and KVQuant keep them); every other token's key and value is quantized and dequantized
exactly as the stored layout does, and the head's attention over its recorded query rows is recomputed. The error
is ||o' - o|| / ||o|| averaged over rows, query heads and samples, per (KV head, layer), clipped to [0, 1].
Tokens past the last whole group of a per-channel key layout stay unquantized, as a cache keeps them until the
group fills. `streaming_precision_error` prices a STREAMING head the same way: its sinks and last `window` tokens
kept, those older than the residual quantized, against the head's full attention (the whole error of the option,
not an added one, as `similarity.streaming_error` measures the 16-bit window).
"""

from __future__ import annotations

import numpy as np
import torch

from ilc.runtime.bits import Axis, HeadPrecision, QuantSpec, stream_layout_error
from ilc.runtime.quant import dequantize, quantize

from .attention_stats import SampleRecord


def _round_trip(x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """x [H, T, D] as stored under `spec` (per-channel: whole groups only, the tail kept)."""
    if spec is None:
        return x
    n = x.shape[1] if spec.axis == Axis.TOKEN else x.shape[1] // spec.group * spec.group
    out = x.clone()
    out[:, :n] = dequantize(quantize(x[:, :n], spec))
    return out


def precision_error(records: list[SampleRecord], sinks: int, residual: int,
                    options: list[HeadPrecision]) -> dict[str, np.ndarray]:
    """{option name: err [Hkv, L]} (see the module docstring); the records must carry keys (`with_keys`)."""
    if any(r.keys is None for r in records):
        raise ValueError("precision pricing needs records with keys (record_sample(..., with_keys=True))")
    num_layers, hkv = records[0].values.shape[:2]
    hq = records[0].queries.shape[1]
    group = hq // hkv
    err = {o.name: np.zeros((hkv, num_layers)) for o in options}
    for r in records:
        t = r.keys.shape[2]
        pos = torch.arange(t)[None, :]
        causal = pos <= r.rows[:, None]
        exact = causal & ((pos < sinks) | (pos > r.rows[:, None] - residual))  # [R, T]: kept in the model dtype
        for layer in range(num_layers):
            q = r.queries[layer]  # [Hq, R, D]
            k, v = r.keys[layer].float(), r.values[layer].float()  # [Hkv, T, D]
            reference = _attend(q, k, k, v, v, exact, causal, r.scaling, group)
            norm = reference.norm(dim=-1).clamp_min(1e-6)
            for o in options:
                out = _attend(q, k, _round_trip(k, o.key_spec()), v, _round_trip(v, o.value_spec()), exact, causal,
                              r.scaling, group)
                rel = ((out - reference).norm(dim=-1) / norm).mean(-1)  # [Hq]
                err[o.name][:, layer] += rel.reshape(hkv, group).mean(-1).clamp(0, 1).numpy()
    return {name: e / len(records) for name, e in err.items()}


def streaming_precision_error(records: list[SampleRecord], sinks: int, residual: int, windows: tuple[int, ...],
                              options: list[HeadPrecision]) -> dict[tuple[str, int], np.ndarray]:
    """{(option name, window): err [Hkv, L]} for each quantized option a streaming head with that window can store
    (`bits.stream_layout_error`); the records must carry keys."""
    pairs = [(o, w) for w in windows for o in options if stream_layout_error(o, w, residual) is None]
    if any(r.keys is None for r in records):
        raise ValueError("precision pricing needs records with keys (record_sample(..., with_keys=True))")
    num_layers, hkv = records[0].values.shape[:2]
    group = records[0].queries.shape[1] // hkv
    err = {(o.name, w): np.zeros((hkv, num_layers)) for o, w in pairs}
    for r in records:
        pos = torch.arange(r.keys.shape[2])[None, :]
        causal = pos <= r.rows[:, None]
        exact = (pos < sinks) | (pos > r.rows[:, None] - residual)  # [R, T]
        kept = {w: causal & ((pos < sinks) | (pos > r.rows[:, None] - w)) for w in windows}
        for layer in range(num_layers):
            q = r.queries[layer]
            k, v = r.keys[layer].float(), r.values[layer].float()
            reference = _attend(q, k, k, v, v, causal, causal, r.scaling, group)
            norm = reference.norm(dim=-1).clamp_min(1e-6)
            stored = {o.name: (_round_trip(k, o.key_spec()), _round_trip(v, o.value_spec())) for o in options}
            for o, w in pairs:
                out = _attend(q, k, stored[o.name][0], v, stored[o.name][1], exact & kept[w], kept[w], r.scaling,
                              group)
                rel = ((out - reference).norm(dim=-1) / norm).mean(-1)  # [Hq]
                err[o.name, w][:, layer] += rel.reshape(hkv, group).mean(-1).clamp(0, 1).numpy()
    return {key: e / len(records) for key, e in err.items()}


def _attend(q, k, k_stored, v, v_stored, exact, causal, scaling, group) -> torch.Tensor:
    """Attention of rows q [Hq, R, D]: exact positions read k / v, the others k_stored / v_stored."""
    k_rep = lambda x: x.repeat_interleave(group, dim=0)  # noqa: E731  [Hq, T, D]
    logits = torch.where(exact, q @ k_rep(k).transpose(-1, -2), q @ k_rep(k_stored).transpose(-1, -2)) * scaling
    p = logits.masked_fill(~causal, float("-inf")).softmax(-1)  # [Hq, R, T]
    return (p * exact) @ k_rep(v) + (p * ~exact) @ k_rep(v_stored)
