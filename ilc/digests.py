"""The digests ilc records to tell runs apart, in the project's one format (`ilc.runtime.heads.short_digest`).

`plan_digest` identifies a plan by its file text: `ilc adapt` records it in a run's identity (a resumed run must
train the same plan) and `ilc eval` in every record (a resumed evaluation reuses only records of the same plan).
"""

from __future__ import annotations

import hashlib

from ilc.runtime.heads import short_digest
from ilc.runtime.plan import Plan


def plan_digest(plan: Plan) -> str:
    """Digest of the plan's YAML text (what `plan.save` writes)."""
    return short_digest(plan.to_yaml().encode())


def tokens_digest(*tensors) -> str:
    """Digest of token tensors' bytes, in order (CPU tensors)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.numpy().tobytes())
    return short_digest(h)
