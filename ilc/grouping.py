"""Group consecutive layers into blocks, per KV head, from a similarity matrix sim[a, f] (anchor a, follower f).

A block's first layer is its anchor; every other layer (a follower) saves its distant keys for that head.
A block is admissible when it has at most `max_size` layers and (optionally) every follower's similarity to
the anchor is at least `min_similarity`. Its loss is the sum over followers of (1 - sim[anchor, follower]).

Methods (registered by name in `ilc.calibrate.METHODS`):
- ``paper``: the paper's greedy bottom-up rule: a layer joins the current block while its similarity to the
  block's anchor is >= the threshold (delta = 0.5 in the paper).
- ``optimal``: exact. Either the most followers (most bytes saved) under `min_similarity`, as a shortest
  path on the graph of admissible segments (networkx), ties broken by least loss; or, for a target number of
  followers over all heads (a target saving), the least total loss, by dynamic programming per head and a
  knapsack across heads.

Mixed plans (`assign_mixed`) add a third option per (layer, head), a STREAMING head with its own window, and,
per shared block, a precision (its anchor's keys and values, its followers' values as integers), each option
priced by its measured output error and its saving: a DP per head under a Lagrange multiplier found by bisection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import networkx as nx
import numpy as np

from ilc.runtime.heads import HeadKind, dense_vectors

Blocks = list[list[int]]


def _admissible(sim: np.ndarray, a: int, end: int, max_size: int, min_similarity: float | None) -> bool:
    if end - a > max_size:
        return False
    return min_similarity is None or all(sim[a, f] >= min_similarity for f in range(a + 1, end))


def _loss(sim: np.ndarray, a: int, end: int) -> float:
    return float(sum(1.0 - sim[a, f] for f in range(a + 1, end)))


def group_paper(sim: np.ndarray, threshold: float = 0.5, max_size: int | None = None) -> Blocks:
    """Greedy bottom-up: join the current block while sim(anchor, layer) >= threshold."""
    n = sim.shape[0]
    max_size = max_size or n
    blocks: Blocks = [[0]]
    for layer in range(1, n):
        block = blocks[-1]
        if len(block) < max_size and sim[block[0], layer] >= threshold:
            block.append(layer)
        else:
            blocks.append([layer])
    return blocks


def group_max_saving(sim: np.ndarray, min_similarity: float, max_size: int | None = None) -> Blocks:
    """Fewest blocks (most followers) with every follower >= min_similarity; ties: least loss."""
    n = sim.shape[0]
    max_size = max_size or n
    big = n + 1.0  # one more block always outweighs any loss difference (loss < n)
    graph = nx.DiGraph()
    graph.add_nodes_from(range(n + 1))
    for a in range(n):
        for end in range(a + 1, min(n, a + max_size) + 1):
            if _admissible(sim, a, end, max_size, min_similarity):
                graph.add_edge(a, end, weight=big + _loss(sim, a, end))
    path = nx.shortest_path(graph, 0, n, weight="weight")  # every single layer is admissible: a path exists
    return [list(range(a, b)) for a, b in zip(path, path[1:])]


def loss_by_followers(sim: np.ndarray, max_size: int | None = None,
                      min_similarity: float | None = None) -> tuple[list[float], list[Blocks | None]]:
    """For k = 0..n-1 followers: the least loss of a segmentation with exactly k followers, and that segmentation."""
    n = sim.shape[0]
    max_size = max_size or n
    inf = math.inf
    best = [[inf] * n for _ in range(n + 1)]  # best[i][k]: layers [0, i) with k followers
    choice: list[list[int | None]] = [[None] * n for _ in range(n + 1)]
    best[0][0] = 0.0
    for end in range(1, n + 1):
        for a in range(max(0, end - max_size), end):
            if not _admissible(sim, a, end, max_size, min_similarity):
                continue
            cost, extra = _loss(sim, a, end), end - a - 1
            for k in range(0, n - extra):
                if best[a][k] + cost < best[end][k + extra]:
                    best[end][k + extra] = best[a][k] + cost
                    choice[end][k + extra] = a
    segmentations: list[Blocks | None] = []
    for k in range(n):
        if best[n][k] == inf:
            segmentations.append(None)
            continue
        blocks, end, kk = [], n, k
        while end > 0:
            a = choice[end][kk]
            blocks.append(list(range(a, end)))
            kk -= end - a - 1
            end = a
        segmentations.append(blocks[::-1])
    return best[n], segmentations


def group_target(sims: Sequence[np.ndarray], followers_needed: int, max_size: int | None = None,
                 min_similarity: float | None = None, weight: int = 1) -> list[Blocks]:
    """Per-head blocks with at least `followers_needed` followers in total (each head's follower counts
    `weight` times) and the least total loss. Raises ValueError when out of reach."""
    curves = [loss_by_followers(s, max_size, min_similarity) for s in sims]
    # knapsack over heads: total[f] = least loss with f followers, keeping each head's k
    total = {0: (0.0, ())}
    for losses, _ in curves:
        nxt: dict[int, tuple[float, tuple]] = {}
        for f, (cost, picks) in total.items():
            for k, c in enumerate(losses):
                if c == math.inf:
                    continue
                key = f + k * weight
                cand = (cost + c, picks + (k,))
                if key not in nxt or cand[0] < nxt[key][0]:
                    nxt[key] = cand
        total = nxt
    feasible = [(cost, f, picks) for f, (cost, picks) in total.items() if f >= followers_needed]
    if not feasible:
        most = max(total)
        raise ValueError(f"target needs {followers_needed} follower (layer, head) pairs, at most {most} are "
                         "possible under the group-size and similarity limits")
    cost, _, picks = min(feasible, key=lambda x: (x[0], x[1]))
    return [curves[h][1][k] for h, k in enumerate(picks)]


def followers_for_saving(saving: float, num_layers: int, num_kv_heads: int, context: int, proximal: int) -> int:
    """Follower (layer, KV head) pairs needed for `saving` of KV bytes at `context` tokens (paper section 4.4)."""
    if context <= proximal:
        raise ValueError(f"the window ({proximal} proximal tokens) covers the whole context {context}: no saving")
    per_follower = (context - proximal) / dense_vectors(num_layers, num_kv_heads, context)
    return math.ceil(saving / per_follower - 1e-9)


def blocks_min_similarity(sim: np.ndarray, blocks: Blocks) -> list[float | None]:
    return [min((float(sim[b[0], f]) for f in b[1:]), default=None) for b in blocks]


@dataclass(frozen=True)
class HeadOptions:
    """What each option costs for one KV head (errors in [0, 1], savings as shares of the dense cache).

    follower_error[a, f]: layer f follows anchor a (a < f < a + max_size); follower_saving: one follower's saving;
    streaming_error[layer, k] and streaming_saving[k]: the layer as a STREAMING head with windows[k];
    allowed: which of HeadKind.FOLLOWER, HeadKind.STREAMING may be chosen (FULL always may; labels are accepted);
    precisions: names of a shared block's precisions (`bits.HeadPrecision`), the first 16-bit;
    precision_error[p, layer]: the layer's added error at precisions[p] (row 0: zeros);
    anchor_saving[p] / follower_precision_saving[p]: what precisions[p] saves on a block's anchor / on each follower
    (values only) beyond the same head at 16 bits; stream_precisions[k]: the precision of streaming option k (all
    16-bit when empty); selection_error[layer]: what token selection loses on the layer unless it streams (counted
    in a block's error, never against `max_error`: every full head is selected, so it cannot be avoided)."""

    follower_error: np.ndarray
    follower_saving: float
    streaming_error: np.ndarray
    streaming_saving: np.ndarray
    windows: tuple[int, ...]
    allowed: frozenset[HeadKind]
    precisions: tuple[str, ...] = ("K16V16",)
    precision_error: np.ndarray | None = None
    anchor_saving: np.ndarray | None = None
    follower_precision_saving: np.ndarray | None = None
    stream_precisions: tuple[str, ...] = ()
    selection_error: np.ndarray | None = None

    def __post_init__(self):
        kinds = frozenset(k if isinstance(k, HeadKind) else HeadKind.from_label(k) for k in self.allowed)
        object.__setattr__(self, "allowed", kinds)
        n, count = self.follower_error.shape[0], len(self.precisions)
        for name, shape in (("precision_error", (count, n)), ("anchor_saving", (count,)),
                            ("follower_precision_saving", (count,)), ("selection_error", (n,))):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.zeros(shape))
        if not self.stream_precisions:
            object.__setattr__(self, "stream_precisions", (self.precisions[0],) * len(self.windows))


@dataclass(frozen=True)
class Segment:
    """One block of a mixed assignment: shared layers (first = anchor), or one streaming layer with a window."""

    layers: tuple[int, ...]
    streaming_window: int | None = None
    precision: str = "K16V16"  # the block's precision (`HeadOptions.precisions`, `stream_precisions`)


def assign_head(opt: HeadOptions, lam: float, max_size: int, max_error: float | None):
    """Exact DP over one head's layers for the Lagrangian cost sum(error) - lam * sum(saving).

    A shared block [a, end) at precision p costs its followers' sharing errors plus every layer's precision and
    selection errors, and saves its followers' sharing plus what p saves on the anchor and on each follower.
    Returns (segments, total error, total saving). Options whose error exceeds `max_error` are not allowed."""
    n = opt.follower_error.shape[0]
    best = [0.0] + [math.inf] * n
    how: list = [None] * (n + 1)
    stream_cost = opt.streaming_error - lam * opt.streaming_saving[None, :]
    if max_error is not None:
        stream_cost = np.where(opt.streaming_error > max_error, math.inf, stream_cost)
    precision_ok = np.ones_like(opt.precision_error, dtype=bool) if max_error is None \
        else opt.precision_error <= max_error

    def block(a: int, end: int, p: int) -> tuple[float, float]:
        """(error, saving) of the shared block [a, end) at precision p."""
        followers = end - a - 1
        error = float(opt.follower_error[a, a + 1:end].sum() + opt.precision_error[p, a:end].sum()
                      + opt.selection_error[a:end].sum())
        saving = opt.anchor_saving[p] + followers * (opt.follower_saving + opt.follower_precision_saving[p])
        return error, float(saving)

    for end in range(1, n + 1):
        for a in range(max(0, end - max_size), end):
            errs = opt.follower_error[a, a + 1:end]
            if end - a > 1 and (HeadKind.FOLLOWER not in opt.allowed
                                or (max_error is not None and errs.max() > max_error)):
                continue
            for p in range(len(opt.precisions)):
                if not precision_ok[p, a:end].all():
                    continue
                error, saving = block(a, end, p)
                cost = best[a] + error - lam * saving
                if cost < best[end]:
                    best[end], how[end] = cost, (a, None, p)
        if HeadKind.STREAMING in opt.allowed and len(opt.windows):
            k = int(np.argmin(stream_cost[end - 1]))
            cost = best[end - 1] + float(stream_cost[end - 1, k])
            if cost < best[end]:
                best[end], how[end] = cost, (end - 1, k, 0)
    segments, end, error, saving = [], n, 0.0, 0.0
    while end > 0:
        a, k, p = how[end]
        if k is None:
            segments.append(Segment(tuple(range(a, end)), precision=opt.precisions[p]))
            block_error, block_saving = block(a, end, p)
            error += block_error
            saving += block_saving
        else:
            segments.append(Segment((a,), opt.windows[k], opt.stream_precisions[k]))
            error += float(opt.streaming_error[a, k])
            saving += float(opt.streaming_saving[k])
        end = a
    return segments[::-1], error, saving


def assign_mixed(options: Sequence[HeadOptions], max_size: int, target_saving: float | None = None,
                 max_error: float | None = None, iterations: int = 60):
    """Per head, the segments with the least total error whose total saving reaches `target_saving` (a share of
    the dense cache over all heads), or, without a target, the most saving with every option's error at most
    `max_error`. Heads are independent for a fixed Lagrange multiplier, so each is an exact DP; the multiplier is
    found by bisection (the result lies on the lower convex hull of error against saving). Raises ValueError
    when the target is out of reach. Returns (segments per head, total error, total saving)."""
    def solve(lam):
        picks = [assign_head(o, lam, max_size, max_error) for o in options]
        return [p[0] for p in picks], sum(p[1] for p in picks), sum(p[2] for p in picks)

    most = solve(1e6)  # saving dominates: the most any assignment can save under the limits
    if target_saving is None:
        return most
    if most[2] < target_saving - 1e-12:
        raise ValueError(f"the options save at most {most[2]:.1%} of the KV cache under the group-size and error "
                         "limits")
    lo, hi = 0.0, 1.0
    while solve(hi)[2] < target_saving:
        hi *= 4
        if hi > 1e6:
            return most
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if solve(mid)[2] >= target_saving:
            hi = mid
        else:
            lo = mid
    return solve(hi)
