"""What each (layer, KV head) of a plan stores: its kind, the one definition the plan, cache and kernels read.

Kinds:
- FULL: K and V of every token. A block's anchor (its distant keys serve the block's followers), or a dense head.
- FOLLOWER: V of every token; own K only for the sinks and its recent window; distant K come from the anchor layer.
- STREAMING: K and V only for the sinks and its recent window; distant tokens are dropped for this head.

`stored_vectors` is the savings formula: how many head-token vectors (K or V) a head keeps for one sequence.
`LaunchColumn` names the columns of the int32 head table that the Triton launches read, one row per head.
Torch-free, so that the plan module stays importable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class HeadKind(IntEnum):
    FULL = 0
    FOLLOWER = 1
    STREAMING = 2


KIND_NAMES = {HeadKind.FULL: "full", HeadKind.FOLLOWER: "follower", HeadKind.STREAMING: "streaming"}


@dataclass(frozen=True)
class HeadSpec:
    """One (layer, KV head) of a plan."""

    kind: HeadKind
    anchor: int  # layer whose keys serve this head's distant tokens (FULL, STREAMING: the layer itself)
    window: int  # recent window of own keys (FOLLOWER) or of keys and values (STREAMING); 0 for FULL


def stored_vectors(spec: HeadSpec, context: int, sinks: int) -> int:
    """K plus V head-token vectors that `spec` keeps for one sequence of `context` tokens (dense keeps 2 x context)."""
    if spec.kind == HeadKind.FULL:
        return 2 * context
    proximal = min(context, sinks + spec.window)
    if spec.kind == HeadKind.FOLLOWER:
        return context + proximal
    return 2 * proximal


class LaunchColumn(IntEnum):
    """Columns of the kernels' head table (int32 [heads, len(LaunchColumn)]), one row per KV head of a launch."""

    KV_HEAD = 0  # the KV head (its query heads are KV_HEAD * group + g)
    KIND = 1  # HeadKind, or FOLLOWER_KEYS for a keys-mode follower
    OWN = 2  # index in the layer's anchor keys (FULL), ring/sink keys (FOLLOWER) or streaming storage (STREAMING)
    DIST = 3  # index in the anchor layer's anchor keys (keys-mode FOLLOWER); 0 otherwise
    VALUE = 4  # index in the layer's full-length values (FULL, FOLLOWER); 0 for STREAMING
    WRITES_LOGITS = 5  # 1: a scores-mode anchor whose step logits followers read


# Launch-table kinds beyond HeadKind: a follower that scores distant tokens with its own query (keys mode).
FOLLOWER_KEYS = 3
