"""Price KV precision per head: the output error of storing a head's keys and values as integers
(`ilc.runtime.quant`), measured like every other option (`similarity.streaming_error`).

For each sampled row at position i, the sinks [0, sinks) and a recent residual [i - residual + 1, i] stay in the
model's dtype (as KIVI and KVQuant keep them); every other token's key and value is quantized and dequantized
exactly as the stored layout does, and the head's attention over its recorded query rows is recomputed. The error
is ||o' - o|| / ||o|| averaged over rows, query heads and samples, per (KV head, layer), clipped to [0, 1].
Tokens past the last whole group of a per-channel key layout stay unquantized, as a cache keeps them until the
group fills. Given windows, a STREAMING head is priced the same way: its sinks and last `window` tokens kept, those
older than the residual quantized, against the head's full attention (the whole error of the option, not an added
one, as `similarity.streaming_error` measures the 16-bit window).
"""

from __future__ import annotations

import numpy as np
import torch

from ilc.runtime.bits import Axis, HeadPrecision, QuantSpec, stream_layout_error
from ilc.runtime.quant import dequantize, quantize

from .attention_stats import SampleRecord
from .similarity import output_error


def _round_trip(x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """x [H, T, D] as stored under `spec` (per-channel: whole groups only, the tail kept)."""
    if spec is None:
        return x
    n = x.shape[1] if spec.axis == Axis.TOKEN else x.shape[1] // spec.group * spec.group
    out = x.clone()
    out[:, :n] = dequantize(quantize(x[:, :n], spec))
    return out


def precision_error(records: list[SampleRecord], sinks: int, residual: int, options: list[HeadPrecision],
                    windows: tuple[int, ...] = ()) -> dict:
    """{option name: err [Hkv, L]} of a head keeping every token, and {(option name, window): err [Hkv, L]} of a
    STREAMING head keeping its sinks and last `window` tokens, for each window in `windows` that the option can store
    (`bits.stream_layout_error`). See the module docstring; the records must carry keys (`with_keys`)."""
    if any(r.keys is None for r in records):
        raise ValueError("precision pricing needs records with keys (record_sample(..., with_keys=True))")
    num_layers, hkv = records[0].values.shape[:2]
    hq = records[0].queries.shape[1]
    group = hq // hkv
    priced = [(o.name, o, None) for o in options] + [((o.name, w), o, w) for w in windows for o in options
                                                     if stream_layout_error(o, w, residual) is None]
    err = {key: np.zeros((hkv, num_layers)) for key, _, _ in priced}
    for r in records:
        t = r.keys.shape[2]
        pos = torch.arange(t)[None, :]
        causal = pos <= r.rows[:, None]
        exact = causal & ((pos < sinks) | (pos > r.rows[:, None] - residual))  # [R, T]: kept in the model dtype
        kept = {None: causal} | {w: causal & ((pos < sinks) | (pos > r.rows[:, None] - w)) for w in windows}
        for layer in range(num_layers):
            q = r.queries[layer]  # [Hq, R, D]
            k, v = r.keys[layer].float(), r.values[layer].float()  # [Hkv, T, D]
            reference = _attend(q, k, k, v, v, exact, causal, r.scaling, group)
            stored = {o.name: (_round_trip(k, o.key_spec()), _round_trip(v, o.value_spec())) for o in options}
            for key, o, w in priced:
                k_stored, v_stored = stored[o.name]
                out = _attend(q, k, k_stored, v, v_stored, exact & kept[w], kept[w], r.scaling, group)
                err[key][:, layer] += output_error(out, reference, hkv).clamp(0, 1).numpy()
    return {key: e / len(records) for key, e in err.items()}


def _attend(q, k, k_stored, v, v_stored, exact, causal, scaling, group) -> torch.Tensor:
    """Attention of rows q [Hq, R, D]: exact positions read k / v, the others k_stored / v_stored."""
    k_rep = lambda x: x.repeat_interleave(group, dim=0)  # noqa: E731  [Hq, T, D]
    logits = torch.where(exact, q @ k_rep(k).transpose(-1, -2), q @ k_rep(k_stored).transpose(-1, -2)) * scaling
    p = logits.masked_fill(~causal, float("-inf")).softmax(-1)  # [Hq, R, T]
    return (p * exact) @ k_rep(v) + (p * ~exact) @ k_rep(v_stored)
