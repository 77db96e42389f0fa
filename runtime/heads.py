"""What each (layer, KV head) of a plan stores: its kind, the one definition the plan, cache and kernels read.

Kinds:
- FULL: K and V of every token. A block's anchor (its distant keys serve the block's followers), or a dense head.
- FOLLOWER: V of every token; own K only for the sinks and its recent window; distant K come from the anchor layer.
- STREAMING: K and V only for the sinks and its recent window; distant tokens are dropped for this head.

`Selection` is a plan's token selection (SnapKV-style, once at the end of prefill): FULL heads keep, of their
distant tokens, only the best-scored share; followers keep values for their anchor's choice.
`stored_vectors` is the savings formula: how many head-token vectors (K or V) a head keeps for one sequence, and
`dense_vectors` the dense cache's (`ilc.runtime.bits.head_bytes` prices those vectors at a head's precision). (The kernels' launch table has kinds of its own, `ilc.kernels.table.LaunchKind`;
`ilc.runtime.kernel_dispatch` derives them from `HeadKind` and `Mode`.) Torch-free, so that the plan module stays importable without torch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from enum import Enum, IntEnum


class Mode(str, Enum):
    """How a follower scores distant tokens: with its anchor's attention (SCORES, training-free) or with its own
    query on the anchor's keys (KEYS, needs adapted weights). Compares equal to its plan-file word."""

    SCORES = "scores"
    KEYS = "keys"

    def __str__(self) -> str:
        return self.value


class HeadKind(IntEnum):
    """What one (layer, KV head) stores; `label` is its word in plans, reports and the CLI."""

    FULL = 0
    FOLLOWER = 1
    STREAMING = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> "HeadKind":
        return cls[label.upper()]


class BlockKind(str, Enum):
    """A plan block's kind as the file writes it: SHARED (anchor + followers) or STREAMING."""

    SHARED = "shared"
    STREAMING = "streaming"

    def __str__(self) -> str:
        return self.value


KIND_NAMES = {kind: kind.label for kind in HeadKind}


def short_digest(data: bytes | "hashlib._Hash") -> str:
    """The project's one digest format, ``sha256:`` and 16 hex digits, of bytes or of a running sha256."""
    h = hashlib.sha256(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    return "sha256:" + h.hexdigest()[:16]


def dense_vectors(num_layers: int, num_kv_heads: int, context: int) -> int:
    """K plus V head-token vectors a dense cache keeps for one sequence of `context` tokens."""
    return 2 * num_layers * num_kv_heads * context


@dataclass(frozen=True)
class HeadSpec:
    """One (layer, KV head) of a plan."""

    kind: HeadKind
    anchor: int  # layer whose keys serve this head's distant tokens (FULL, STREAMING: the layer itself)
    window: int  # recent window of own keys (FOLLOWER) or of keys and values (STREAMING); 0 for FULL


@dataclass(frozen=True)
class Scorer:
    """A token-scoring rule of `Selection` (computed by `ilc.runtime.selection.token_scores`): the attention of
    the last prompt queries to each token, averaged over those queries and the KV head's query heads."""

    name: str
    description: str
    last_queries: int | None  # how many of the last prompt queries vote; None: the selection's window
    pooling: str | None  # over Selection.pool neighbouring tokens: "avg", "max" (a span scores as its best token)
    replay: bool = False  # scores come from re-reading the prompt (`ilc.runtime.replay`), not the last queries


SCORERS = {s.name: s for s in (
    Scorer("snapkv", "mean attention of the last `window` prompt queries, average-pooled (SnapKV, as in kvpress)",
           None, "avg"),
    Scorer("spans", "SnapKV's scores max-pooled: a token within pool/2 of a well-read token scores as that one, so "
           "a span (every digit of a number) is kept or dropped whole (ChunkKV's observation)", None, "max"),
    Scorer("tova", "attention of the last prompt query (TOVA's rule, per KV head)", 1, None),
    Scorer("replay", "most attention received while the model re-reads the prompt (KVzip's rule; two extra "
           "prefills)", 1, None, replay=True),
)}


@dataclass(frozen=True)
class Selection:
    """Token selection at the end of prefill, per KV head (the plan's ``selection:`` section).

    Of a prompt of n tokens, every FULL head keeps the sinks, the last `window` tokens and the `keep` share of
    the other (distant) tokens with the highest `scorer` score; a FOLLOWER keeps values for its anchor's choice
    (the block keeps one set of tokens). STREAMING heads are unaffected. Tokens that arrive later are all kept.
    """

    keep: float  # share of the distant tokens kept, in (0, 1)
    scorer: str = "snapkv"  # one of SCORERS
    window: int = 64  # recent tokens always kept (also SnapKV's observation window: the queries that score)
    pool: int = 31  # pooling kernel over the scores (odd; 1 = none); kvpress uses 5; docs/bits: 31 beats 15 and 63

    @property
    def observation(self) -> int:
        """How many of the last prompt queries score the tokens (the cache keeps them until selection runs)."""
        last = SCORERS[self.scorer].last_queries
        return self.window if last is None else min(last, self.window)

    def budget(self, distant: int) -> int:
        """Distant tokens kept out of `distant` candidates."""
        return min(distant, math.ceil(self.keep * distant))

    def kept(self, context: int, sinks: int) -> int:
        """Tokens a selected head keeps of a `context`-token prompt."""
        proximal = min(context, sinks + self.window)
        return proximal + self.budget(context - proximal)


# K plus V vectors a head of each kind keeps, from `kept` (the tokens the sequence keeps: all of them, or what
# selection left) and `proximal` (its sinks and window): full K and V; full V and proximal K; proximal K and V.
_STORED = {
    HeadKind.FULL: lambda kept, proximal: 2 * kept,
    HeadKind.FOLLOWER: lambda kept, proximal: kept + proximal,
    HeadKind.STREAMING: lambda kept, proximal: 2 * proximal,
}


def stored_vectors(spec: HeadSpec, context: int, sinks: int, selection: Selection | None = None) -> int:
    """K plus V head-token vectors that `spec` keeps for one sequence of `context` tokens (dense keeps 2 x context);
    with `selection`, right after it ran on a `context`-token prompt."""
    kept = selection.kept(context, sinks) if selection is not None else context
    return _STORED[spec.kind](kept, min(context, sinks + spec.window))
