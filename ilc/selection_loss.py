"""Price token selection per head: the output error of a head that keeps only what selection keeps, measured like
every other option (`similarity.streaming_error`, `precision.precision_error`), so that the budget solver stops
treating selection as free.

Each sampled row r is read as the first token decoded after a prompt of r tokens: selection runs on that prompt
exactly as the runtime runs it (`ilc.runtime.selection`: the same scores from the recorded queries of the prompt's
last positions, the same sinks, budget and window), and the row attends to what is kept plus itself. On retrieval
samples the prompt then ends with the recall ("The pass key of <word> is"), as a NIAH prompt ends with its
question. The row's output is compared with its attention over every token: ||o' - o|| / ||o|| averaged over rows,
query heads and records, per (KV head, layer), clipped to [0, 1]. Scorers that re-read the prompt (`replay`) need
the planned model and are not priced here.
"""

from __future__ import annotations

import numpy as np
import torch

from ilc.runtime.heads import SCORERS, Selection
from ilc.runtime.selection import choose_tokens, selection_shape

from .attention_stats import SampleRecord


def can_price(selection: Selection) -> bool:
    """Whether calibration's records can price `selection` (its scores come from the last prompt queries)."""
    return not SCORERS[selection.scorer].replay


def selection_error(records: list[SampleRecord], sinks: int, selection: Selection) -> np.ndarray:
    """err [Hkv, L] of a head that keeps what `selection` keeps (see the module docstring); the records must carry
    keys and at least `selection.observation` observed queries per row (`record_sample(..., with_keys=True,
    observe=w)`)."""
    if not can_price(selection):
        raise ValueError(f"the {selection.scorer} scorer re-reads the prompt with the planned model; calibration "
                         "cannot price it")
    w = selection.observation
    if any(r.keys is None or r.observed is None or r.observed.shape[3] < w for r in records):
        raise ValueError(f"selection pricing needs records with keys and {w} observed queries per row "
                         f"(record_sample(..., with_keys=True, observe={w}))")
    num_layers, hkv = records[0].values.shape[:2]
    group = records[0].queries.shape[1] // hkv
    err = np.zeros((hkv, num_layers))
    start = torch.zeros(1, dtype=torch.long)
    for r in records:
        t = r.keys.shape[2]
        shapes = [selection_shape(int(row), start, 0, sinks, selection) for row in r.rows]  # None: nothing dropped
        for layer in range(num_layers):
            k, v = r.keys[layer].float(), r.values[layer].float()  # [Hkv, T, D]
            kept = torch.zeros(len(r.rows), hkv, t, dtype=torch.bool)  # [R, Hkv, T]
            for i, (row, shape) in enumerate(zip(r.rows.tolist(), shapes)):
                kept[i, :, :row + 1] = shape is None
                if shape is not None:
                    observed = r.observed[layer, :, i, -w:].float().unflatten(0, (hkv, group))[None]  # [1,Hkv,g,w,D]
                    chosen = choose_tokens(shape, k[None, :, :row], observed, r.scaling, start, selection)[0]
                    kept[i].scatter_(1, chosen, True)
                    kept[i, :, row] = True  # the decoded token itself
            kept = kept.transpose(0, 1).repeat_interleave(group, 0)  # [Hq, R, T]
            causal = torch.arange(t)[None, :] <= r.rows[:, None]  # [R, T]
            logits = (r.queries[layer] @ k.repeat_interleave(group, 0).transpose(-1, -2)) * r.scaling  # [Hq, R, T]
            values = v.repeat_interleave(group, 0)
            reference = logits.masked_fill(~causal, float("-inf")).softmax(-1) @ values
            out = logits.masked_fill(~kept, float("-inf")).softmax(-1) @ values
            rel = ((out - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-6)).mean(-1)  # [Hq]
            err[:, layer] += rel.reshape(hkv, group).mean(-1).clamp(0, 1).numpy()
    return err / len(records)
