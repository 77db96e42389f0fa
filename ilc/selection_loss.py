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

from collections.abc import Sequence

import numpy as np
import torch

from ilc.runtime.heads import SCORERS, Selection
from ilc.runtime.selection import choose_tokens, selection_shape, token_scores

from .attention_stats import SampleRecord
from .similarity import output_error


def can_price(scorer: str) -> bool:
    """Whether calibration's records can price selection by `scorer` (its scores come from the last prompt queries)."""
    return not SCORERS[scorer].replay


def selection_error(records: list[SampleRecord], sinks: int, selections: Sequence[Selection]) -> dict:
    """{selection: err [Hkv, L]} of a head that keeps what each selection keeps (see the module docstring). The
    selections differ only in their share (`keep`): the scores and the attention are computed once for all of them.
    The records must carry keys and at least `observation` observed queries per row (`record_sample(...,
    with_keys=True, observe=w)`)."""
    first = selections[0]
    if any((s.scorer, s.window, s.pool) != (first.scorer, first.window, first.pool) for s in selections):
        raise ValueError("selection pricing compares shares of one rule: the selections must differ only in keep")
    if not can_price(first.scorer):
        raise ValueError(f"the {first.scorer} scorer re-reads the prompt with the planned model; calibration "
                         "cannot price it")
    w = first.observation
    if any(r.keys is None or r.observed is None or r.observed.shape[3] < w for r in records):
        raise ValueError(f"selection pricing needs records with keys and {w} observed queries per row "
                         f"(record_sample(..., with_keys=True, observe={w}))")
    num_layers, hkv = records[0].values.shape[:2]
    group = records[0].queries.shape[1] // hkv
    err = {s: np.zeros((hkv, num_layers)) for s in selections}
    start = torch.zeros(1, dtype=torch.long)
    for r in records:
        t = r.keys.shape[2]
        rows = r.rows.tolist()
        shapes = {s: [selection_shape(row, start, 0, sinks, s) for row in rows] for s in selections}  # None: no drop
        causal = torch.arange(t)[None, :] <= r.rows[:, None]  # [R, T]
        for layer in range(num_layers):
            k, v = r.keys[layer].float(), r.values[layer].float()  # [Hkv, T, D]
            observed = r.observed[layer, :, :, -w:].float().unflatten(0, (hkv, group))  # [Hkv, g, R, w, D]
            scores = [token_scores(observed[None, :, :, i], k[None, :, :row], start, r.scaling, first)
                      for i, row in enumerate(rows)]  # [1, Hkv, row] each, as the runtime scores that prompt
            logits = (r.queries[layer] @ k.repeat_interleave(group, 0).transpose(-1, -2)) * r.scaling  # [Hq, R, T]
            values = v.repeat_interleave(group, 0)
            reference = logits.masked_fill(~causal, float("-inf")).softmax(-1) @ values
            for s in selections:
                kept = torch.zeros(len(rows), hkv, t, dtype=torch.bool)  # [R, Hkv, T]
                for i, (row, shape) in enumerate(zip(rows, shapes[s])):
                    if shape is None:  # nothing to drop: the whole prompt and the row
                        kept[i, :, :row + 1] = True
                        continue
                    kept[i].scatter_(1, choose_tokens(shape, k[None, :, :row], None, r.scaling, start, s,
                                                      scores[i])[0], True)
                    kept[i, :, row] = True  # the decoded token itself
                mask = kept.transpose(0, 1).repeat_interleave(group, 0)  # [Hq, R, T]
                out = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ values
                err[s][:, layer] += output_error(out, reference, hkv).clamp(0, 1).numpy()
    return {s: e / len(records) for s, e in err.items()}
