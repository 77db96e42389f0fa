"""Token selection at the end of prefill (a plan's ``selection:`` section, `heads.Selection`), composed with sharing.

When the first decode step arrives (or `PoDCache.select()` is called), every FULL head scores the distant tokens
of the prompt with the queries of the last prompt tokens (`SCORERS`) and keeps the sinks, the last
`selection.window` tokens and the best `selection.budget(distant)` others. A FOLLOWER keeps its values for the
tokens its anchor chose, so a block keeps one set of distant tokens; STREAMING heads are left as they are.

The kept tokens are compacted to the front of each layer's storage, right-aligned per row: a row that selects
holds exactly ``K = sinks + budget + window`` slots, a shorter row keeps all its tokens behind left padding. After
that, value heads and followers' own keys live in *stored* slots (logical slot = stored slot + ``state.shift``,
row starts in stored slots), and every attention path works unchanged on the shorter sequence: the selected
tokens precede the recent window, so a stored slot is distant or proximal exactly as its token is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .heads import SCORERS, HeadKind, Selection

if TYPE_CHECKING:
    from .cache import PoDCache


def token_scores(queries: torch.Tensor, keys: torch.Tensor, row_start: torch.Tensor, scaling: float,
                 selection: Selection) -> torch.Tensor:
    """Scores [B, H, T] of the T prompt tokens per KV head.

    queries [B, H, g, w, D]: the KV head's g query heads at the last w prompt positions; keys [B, H, T, D];
    row_start [B] (left padding). The attention of each observing query (causal, real keys only), averaged
    over the queries and the group, then pooled."""
    scorer = SCORERS[selection.scorer]
    b, h, g, w, d = queries.shape
    t = keys.shape[2]
    logits = torch.einsum("bhgwd,bhtd->bhgwt", queries.float(), keys.float()) * scaling
    pos_q = torch.arange(t - w, t, device=keys.device)[:, None]
    pos_k = torch.arange(t, device=keys.device)[None, :]
    visible = (pos_k <= pos_q)[None] & (pos_k[None] >= row_start[:, None, None])  # [B, w, T]
    logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
    scores = logits.softmax(-1).nan_to_num(0.0).mean(dim=(2, 3))  # [B, H, T]
    if scorer.smooth and selection.pool > 1:
        scores = F.avg_pool1d(scores, selection.pool, stride=1, padding=selection.pool // 2)
    return scores


@torch.no_grad()
def select_tokens(cache: "PoDCache") -> None:
    """Run the plan's selection on everything the cache holds now (see the module docstring). Idempotent."""
    state = cache.state
    sel = state.selection
    if sel is None or state.selected:
        return
    state.selected = True
    first = cache.layers[0]
    total = first.seen
    if not first.is_initialized or total == 0:
        return
    s, w = state.sinks, sel.window
    b = first.values.shape[0]
    device = first.values.device
    rs = state.row_start if state.row_start is not None else torch.zeros(b, dtype=torch.long, device=device)
    candidates = total - state.row_start_min - s - w  # distant tokens of the longest row
    budget = sel.budget(max(0, candidates))
    if budget >= candidates:  # nothing to drop
        state.observed.clear()
        return
    kept = s + budget + w
    real = total - rs  # [B] real tokens per row
    selecting = real > kept  # rows that drop tokens; the others keep all of theirs (right-aligned)
    tail = torch.arange(total - kept, total, device=device).clamp(min=0)  # [K] slots of a row that keeps all
    slot = torch.arange(total, device=device)
    candidate = (slot[None, :] >= (rs + s)[:, None]) & (slot[None, :] < total - w)  # [B, T] distant real slots
    chosen: dict[int, torch.Tensor] = {}  # layer -> [B, Ha, K] slots kept by its FULL heads
    for layer in cache.layers:
        if not layer.anchor_heads:
            continue
        keys = layer.anchor_keys[:, :, :total]
        q_heads, scaling = state.observed.get(layer.layer_idx, (None, 1.0))
        if q_heads is None:  # no prompt queries seen (e.g. a byte count without a model): keep the most recent
            scores = torch.arange(total, device=device, dtype=torch.float32).expand(b, len(layer.anchor_heads), -1)
        else:
            group = q_heads.shape[1] // len(layer.specs)
            q = q_heads.unflatten(1, (len(layer.specs), group))[:, layer.anchor_heads]  # [B, Ha, g, w, D]
            scores = token_scores(q, keys, rs, scaling, sel)
        scores = scores.masked_fill(~candidate[:, None], float("-inf"))
        top = scores.topk(budget, dim=-1).indices.sort(dim=-1).values  # [B, Ha, budget]
        sinks = (rs[:, None] + torch.arange(s, device=device)[None]).expand(len(layer.anchor_heads), -1, -1)
        recent = torch.arange(total - w, total, device=device).expand(b, len(layer.anchor_heads), -1)
        index = torch.cat([sinks.transpose(0, 1), top, recent], dim=-1)  # [B, Ha, K]
        chosen[layer.layer_idx] = torch.where(selecting[:, None, None], index, tail.expand_as(index))
    for layer in cache.layers:
        layer.compact(total, kept, {h: _head_index(cache, layer, h, chosen) for h in layer.value_heads})
    state.shift = total - kept
    state.set_stored_row_start(torch.where(selecting, 0, kept - real))
    state.observed.clear()


def _head_index(cache: "PoDCache", layer, h: int, chosen: dict) -> torch.Tensor:
    """[B, K] slots kept for KV head `h` of `layer`: its own choice (FULL) or its anchor's (FOLLOWER)."""
    spec = layer.specs[h]
    source = layer if spec.kind == HeadKind.FULL else cache.layers[spec.anchor]
    return chosen[source.layer_idx][:, source.anchor_heads.index(h)]
