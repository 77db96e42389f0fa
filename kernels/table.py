"""The head table of a kernel launch: one int32 row per KV head, columns `LaunchColumn`, kinds `LaunchKind`.

Defined once here and read by both sides: `ilc.runtime.kernel_dispatch` writes the rows (deriving each row's kind
from the runtime's `HeadKind` and `Mode`), the kernels (`decode.py`, `prefill.py`) read the columns and kinds as
constexpr numbers. The kernels import nothing from the runtime.
"""

from __future__ import annotations

from enum import IntEnum


class LaunchColumn(IntEnum):
    """Columns of a launch's head table (int32 [heads, len(LaunchColumn)])."""

    KV_HEAD = 0  # the KV head (its query heads are KV_HEAD * group + g)
    KIND = 1  # LaunchKind
    OWN = 2  # index in the layer's anchor keys (ANCHOR), ring/sink keys (FOLLOWER_*) or streaming storage (STREAMING)
    DIST = 3  # index in the anchor layer's anchor keys (FOLLOWER_KEYS); 0 otherwise
    VALUE = 4  # index in the layer's full-length values (ANCHOR, FOLLOWER_*); 0 for STREAMING
    WRITES_LOGITS = 5  # 1: a scores-mode anchor whose step logits followers read


class LaunchKind(IntEnum):
    """What a row of the head table reads (see `decode.py`)."""

    ANCHOR = 0  # a FULL head: own full keys and values
    FOLLOWER_LOGITS = 1  # a scores-mode FOLLOWER: the anchor's step logits for distant slots
    STREAMING = 2  # a STREAMING head: sinks and a ring of the last WINDOW slots
    FOLLOWER_KEYS = 3  # a keys-mode FOLLOWER: own query on the anchor's keys for distant slots
