"""The replay scorer of token selection (KVzip's rule): score each prompt token by the most attention it receives
while the model reads the prompt a second time, right after the first.

`replay_scores(model, input_ids, attention_mask)` runs the planned model's own layers (the plan's attention
function, in its dense replay path: no PoD cache) on the prompt and then on a copy of it, in chunks of
`REPLAY_CHUNK` tokens over a dense `DynamicCache`, and keeps, per layer and KV head, the largest attention any
query of the copy (any of the KV head's query heads) pays to each prompt token. The copy is the cue: a model
re-reading text attends to the token it is about to repeat (induction heads), so a token nobody attends to
while repeating is one the context can lose. KVzip adds an instruction to repeat; the runtime has no tokenizer,
so ilc replays the bare copy (the instruction, tried, changed nothing). Cost: two extra prefills (the prompt, and
its copy over a twice-as-long cache) and a dense cache of twice the prompt while they run; `ilc eval` reports it as
prefill time. Measured on SmolLM2 (docs/bits/README.md): 6-11x a plain prefill on CPU, and it loses the needles
that SnapKV's rule keeps: every token is attended when it is repeated, so a head's scores are flat, and a fixed
share per head keeps an arbitrary part of the needle. KVzip ranks tokens across all heads and layers instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

REPLAY_KWARG = "ilc_replay"  # the forward keyword that carries a `ReplayRecorder` down to the attention function
REPLAY_CHUNK = 512  # query tokens per replay forward (bounds the [Hq, chunk, 2 x prompt] probabilities)


@dataclass
class ReplayRecorder:
    """What one replay collects: scores[layer] [B, Hkv, T] for the T prompt tokens (filled while `scoring`)."""

    prompt: int
    row_start: torch.Tensor  # [B] first real token of each row (left padding)
    scoring: bool = False  # the forward is reading the copy
    scores: dict[int, torch.Tensor] = field(default_factory=dict)


def replay_attention(layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                     recorder: ReplayRecorder) -> torch.Tensor:
    """Dense causal attention of query [B, Hq, q, D] (the last q of the L positions in key / value [B, Hkv, L, D]),
    masked to each row's real tokens; while scoring, the row-wise most attention on the prompt's tokens is kept."""
    b, hq, q, _ = query.shape
    hkv, length = key.shape[1], key.shape[2]
    group = hq // hkv
    pos_q = torch.arange(length - q, length, device=query.device)[:, None]
    pos_k = torch.arange(length, device=query.device)[None, :]
    rs = recorder.row_start.to(query.device)[:, None, None, None]
    copy_padding = (pos_k >= recorder.prompt) & (pos_k < recorder.prompt + rs)  # the copy's own left padding
    visible = (pos_k <= pos_q)[None, None] & (pos_k >= rs) & ~copy_padding
    k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    if not recorder.scoring:
        return F.scaled_dot_product_attention(query, k, v, attn_mask=visible, scale=scaling)
    logits = (query.float() @ k.float().transpose(-1, -2)) * scaling
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)  # [B, Hq, q, L]
    most = probs[..., :recorder.prompt].amax(2).unflatten(1, (hkv, group)).amax(2)  # [B, Hkv, T]
    old = recorder.scores.get(layer_idx)
    recorder.scores[layer_idx] = most if old is None else torch.maximum(old, most)
    return (probs @ v.float()).to(query.dtype)


@torch.no_grad()
def replay_scores(model, input_ids: torch.Tensor, row_start: torch.Tensor) -> dict[int, torch.Tensor]:
    """{layer: [B, Hkv, T]} replay scores of the T prompt tokens (see the module docstring); row_start [B]."""
    t = input_ids.shape[1]
    recorder = ReplayRecorder(t, row_start)
    cache = DynamicCache()
    sequence = torch.cat([input_ids, input_ids], dim=1)
    lo = 0
    while lo < 2 * t:
        hi = min(lo + REPLAY_CHUNK, t if lo < t else 2 * t)  # no chunk straddles the prompt and its copy
        recorder.scoring = lo >= t
        positions = (torch.arange(lo, hi, device=input_ids.device)[None] - row_start[:, None]).clamp(min=0)
        model(sequence[:, lo:hi], past_key_values=cache, position_ids=positions, use_cache=True,
              **{REPLAY_KWARG: recorder})
        lo = hi
    return recorder.scores
