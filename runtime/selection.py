"""Token selection at the end of prefill (a plan's ``selection:`` section, `heads.Selection`), composed with sharing.

When the first decode step arrives (or `PoDCache.select()` is called), the cache asks this module which slots to
keep (`selection_shape`, then `choose_tokens` per layer) and compacts itself: every FULL head scores the distant tokens
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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .heads import SCORERS, Selection


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
    if scorer.pooling == "avg" and selection.pool > 1:
        scores = F.avg_pool1d(scores, selection.pool, stride=1, padding=selection.pool // 2)
    elif scorer.pooling == "max" and selection.pool > 1:
        scores = F.max_pool1d(scores, selection.pool, stride=1, padding=selection.pool // 2) + 1e-3 * scores
    return scores


@dataclass(frozen=True)
class SelectionShape:
    """What one run of selection keeps, the same for every layer: `kept` slots of `total` per row."""

    total: int  # slots held before selection
    sinks: int
    budget: int  # distant tokens kept per head
    kept: int  # sinks + budget + window: slots a selecting row holds after
    selecting: torch.Tensor  # [B] bool: rows that drop tokens (the others keep all theirs, right-aligned)
    candidate: torch.Tensor  # [B, T] bool: distant real slots (selection's candidates)
    stored_row_start: torch.Tensor  # [B] each row's first real slot after compaction


def selection_shape(total: int, row_start: torch.Tensor, row_start_min: int, sinks: int,
                    selection: Selection) -> SelectionShape | None:
    """How many slots selection keeps of `total` (row_start [B]: first real slot per row), or None when the
    longest row has no more distant tokens than the budget (nothing to drop)."""
    w = selection.window
    candidates = total - row_start_min - sinks - w  # distant tokens of the longest row
    budget = selection.budget(max(0, candidates))
    if budget >= candidates:
        return None
    kept = sinks + budget + w
    real = total - row_start  # [B] real tokens per row
    selecting = real > kept
    slot = torch.arange(total, device=row_start.device)
    candidate = (slot[None, :] >= (row_start + sinks)[:, None]) & (slot[None, :] < total - w)
    return SelectionShape(total, sinks, budget, kept, selecting, candidate, torch.where(selecting, 0, kept - real))


def choose_tokens(shape: SelectionShape, keys: torch.Tensor, queries: torch.Tensor | None, scaling: float,
                  row_start: torch.Tensor, selection: Selection, scores: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, K] slots to keep, in order, for H KV heads with `keys` [B, H, T, D] scored by their observed prompt
    `queries` [B, H, g, w, D], or by given `scores` [B, H, T] (the replay scorer's); neither: no queries were
    seen, e.g. a byte count without a model; keep the most recent. Each selecting row keeps its sinks, its best
    `budget` distant slots and the last `window` slots; a row that keeps everything keeps its last K slots (the
    left-padded tail)."""
    b, h, total = keys.shape[0], keys.shape[1], shape.total
    device = keys.device
    if scores is not None:
        scores = scores.float()
    elif queries is None:
        scores = torch.arange(total, device=device, dtype=torch.float32).expand(b, h, -1)
    else:
        scores = token_scores(queries, keys, row_start, scaling, selection)
    scores = scores.masked_fill(~shape.candidate[:, None], float("-inf"))
    top = scores.topk(shape.budget, dim=-1).indices.sort(dim=-1).values  # [B, H, budget]
    sinks = (row_start[:, None] + torch.arange(shape.sinks, device=device)[None])
    recent = torch.arange(total - selection.window, total, device=device).expand(b, h, -1)
    index = torch.cat([sinks[:, None].expand(-1, h, -1), top, recent], dim=-1)  # [B, H, K]
    tail = torch.arange(total - shape.kept, total, device=device).clamp(min=0)  # [K] slots of a row keeping all
    return torch.where(shape.selecting[:, None, None], index, tail.expand_as(index))
