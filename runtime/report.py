"""Memory accounting: the bytes a PoD cache really holds, against a dense cache of the same tokens."""

from __future__ import annotations

from dataclasses import dataclass

from .cache import PoDCache


@dataclass(frozen=True)
class LayerBytes:
    layer: int
    anchor_heads: int  # FULL heads (anchors and dense heads)
    follower_heads: int
    streaming_heads: int
    held: int  # allocated storage, growth slack included
    used: int  # head-token vectors the layout must keep
    dense: int  # a dense cache for the same slots


@dataclass(frozen=True)
class CacheReport:
    tokens: int
    layers: tuple[LayerBytes, ...]

    @property
    def held(self) -> int:
        return sum(x.held for x in self.layers)

    @property
    def used(self) -> int:
        return sum(x.used for x in self.layers)

    @property
    def dense(self) -> int:
        return sum(x.dense for x in self.layers)

    @property
    def saving(self) -> float:
        """Share of a dense cache's bytes not held (allocated storage counted)."""
        return 1.0 - self.held / self.dense if self.dense else 0.0

    def __str__(self) -> str:
        lines = [f"{'layer':>5} {'full/follower/streaming':>23} {'held MiB':>9} {'dense MiB':>9} {'saved':>6}"]
        for x in self.layers:
            saved = 1 - x.held / x.dense if x.dense else 0.0
            kinds = f"{x.anchor_heads}/{x.follower_heads}/{x.streaming_heads}"
            lines.append(f"{x.layer:>5} {kinds:>23} {x.held / 2**20:>9.2f} {x.dense / 2**20:>9.2f} {saved:>6.1%}")
        lines.append(f"total: {self.tokens} tokens, {self.held / 2**20:.2f} MiB held vs {self.dense / 2**20:.2f} MiB "
                     f"dense ({self.saving:.1%} saved; {self.used / 2**20:.2f} MiB without growth slack)")
        return "\n".join(lines)


def cache_report(cache: PoDCache) -> CacheReport:
    if not isinstance(cache, PoDCache):
        raise TypeError(f"cache_report needs an ilc PoDCache, got {type(cache).__name__}")
    rows = tuple(
        LayerBytes(l.layer_idx, len(l.anchor_heads), len(l.follower_heads), len(l.stream_heads), l.nbytes(),
                   l.used_bytes(), l.dense_bytes())
        for l in cache.layers
    )
    return CacheReport(cache.get_seq_length(), rows)
