"""A differentiable PoD forward over whole sequences, without a cache: what `ilc adapt` trains through.

Inference builds a `PoDCache` and stores only what the plan keeps. Training needs gradients and gradient
checkpointing (which runs every layer twice), so it cannot append to a cache. Instead, one `SequenceForward`
travels with the forward as a keyword argument (``model(ids, ilc_sequence=forward)``, transformers hands it to
the attention function): anchor layers leave their keys (and, in scores mode, their queries) in it and the
follower layers read them. The rule is the one in `ilc.runtime.attention`, for slots 0..T-1 of unpadded rows:

- FULL: causal attention over own keys and values;
- FOLLOWER: proximal keys (slot j < sinks or i - j < window) scored by the own query on own keys, distant keys
  scored by q_d (the anchor's query in scores mode, the own query in keys mode) on the anchor's keys, one
  softmax, own values;
- STREAMING: proximal keys only, with the head's own window.

Every part is PyTorch SDPA with a boolean mask, so autograd and checkpointing work unchanged.
`tests/test_adapt.py` checks that its logits equal those of a prefill through the plan's cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .heads import HeadKind, HeadSpec, Mode

SEQUENCE_KWARG = "ilc_sequence"


@dataclass
class SequenceForward:
    """One forward's state: the plan's head table (None: dense attention, the teacher), and what anchor layers
    leave for their followers. Build a new one per forward (`for_plan` / `dense`)."""

    specs: tuple[tuple[HeadSpec, ...], ...] | None
    sinks: int = 0
    mode: Mode = Mode.SCORES
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # anchor layer -> keys [B, H, T, D]
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # anchor layer -> queries [B, Hq, T, D]
    anchors: frozenset[int] = field(init=False)  # layers whose keys (and queries) some follower reads
    _masks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self):
        self.anchors = frozenset(spec.anchor for row in self.specs or () for spec in row
                                 if spec.kind == HeadKind.FOLLOWER)

    @classmethod
    def for_plan(cls, plan, mode: str | None = None) -> "SequenceForward":
        return cls(plan.head_table(), plan.sinks, Mode(mode or plan.mode))

    @classmethod
    def dense(cls) -> "SequenceForward":
        return cls(None)

    def masks(self, t: int, window: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """([T, T] proximal, [T, T] distant) bool: key j is proximal to query i (causal, and a sink or within the
        window) or distant (causal, and neither)."""
        key = (t, window, str(device))
        if key not in self._masks:
            i = torch.arange(t, device=device)[:, None]
            j = torch.arange(t, device=device)[None, :]
            proximal = (j < self.sinks) | (i - j < window)
            self._masks[key] = ((j <= i) & proximal, (j <= i) & ~proximal)
        return self._masks[key]


def sequence_attention(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                       forward: SequenceForward) -> torch.Tensor:
    """query [B, Hq, T, D], key and value [B, H, T, D] of whole sequences (slots 0..T-1) -> [B, Hq, T, D]."""
    if forward.specs is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    hq, t = query.shape[1], query.shape[2]
    group = hq // key.shape[1]
    specs = forward.specs[layer]
    if layer in forward.anchors:  # read by followers further up (a checkpoint replay overwrites the entry)
        forward.keys[layer] = key
        if forward.mode == Mode.SCORES:
            forward.queries[layer] = query
    outs = []
    for h, spec in enumerate(specs):
        qh, kh, vh = query[:, h * group:(h + 1) * group], key[:, h:h + 1], value[:, h:h + 1]
        if spec.kind == HeadKind.FULL:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scaling, enable_gqa=True)
        elif spec.kind == HeadKind.STREAMING:
            proximal, _ = forward.masks(t, spec.window, query.device)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=proximal, scale=scaling, enable_gqa=True)
        else:
            anchor_keys = forward.keys[spec.anchor][:, h:h + 1]
            q_dist = qh if forward.mode == Mode.KEYS else forward.queries[spec.anchor][:, h * group:(h + 1) * group]
            out = _follower(qh, q_dist, kh, anchor_keys, vh, *forward.masks(t, spec.window, query.device), scaling)
        outs.append(out)
    return torch.cat(outs, dim=1)


def _follower(q_own, q_dist, own_keys, anchor_keys, values, proximal, distant, scaling):
    """One softmax over [proximal own keys | distant anchor keys]: the head dim is widened so that each key
    segment meets its own query (q_own . k_own, q_dist . k_anchor), and the values are the layer's own for both.
    q_* [B, g, T, D]; *_keys, values [B, 1, T, D]; masks [T, T]."""
    zeros = torch.zeros_like(own_keys)
    q = torch.cat([q_own, q_dist], dim=-1)
    keys = torch.cat([torch.cat([own_keys, zeros], -1), torch.cat([zeros, anchor_keys], -1)], dim=2)
    vals = torch.cat([values, values], dim=2)
    mask = torch.cat([proximal, distant], dim=-1)
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=scaling, enable_gqa=True)
