"""Grouping methods against brute force over every segmentation, on random similarity matrices."""

import dataclasses
import itertools
import math

import numpy as np
import pytest

from ilc import grouping


def segmentations(n):
    for cuts in itertools.product([0, 1], repeat=n - 1):
        blocks, cur = [], [0]
        for layer, cut in zip(range(1, n), cuts):
            if cut:
                blocks.append(cur)
                cur = [layer]
            else:
                cur.append(layer)
        blocks.append(cur)
        yield blocks


def admissible(sim, blocks, max_size, floor):
    return all(len(b) <= max_size and (floor is None or all(sim[b[0], f] >= floor for f in b[1:])) for b in blocks)


def loss(sim, blocks):
    return sum(1 - sim[b[0], f] for b in blocks for f in b[1:])


def followers(blocks):
    return sum(len(b) - 1 for b in blocks)


def random_sim(n, rng):
    return np.triu(rng.uniform(0, 1, (n, n)), 1) + np.eye(n)


@pytest.mark.parametrize("seed", range(6))
def test_max_saving_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, max_size, floor = 7, 4, 0.4
    sim = random_sim(n, rng)
    got = grouping.group_max_saving(sim, floor, max_size)
    best = max((followers(b), -loss(sim, b)) for b in segmentations(n) if admissible(sim, b, max_size, floor))
    assert admissible(sim, got, max_size, floor)
    assert (followers(got), -loss(sim, got)) == pytest.approx(best)


@pytest.mark.parametrize("seed", range(4))
def test_target_matches_brute_force_across_heads(seed):
    rng = np.random.default_rng(100 + seed)
    n, heads, max_size = 6, 2, 3
    sims = [random_sim(n, rng) for _ in range(heads)]
    need = int(rng.integers(1, 6))
    got = grouping.group_target(sims, need, max_size)
    options = [[b for b in segmentations(n) if admissible(s, b, max_size, None)] for s in sims]
    best = min(sum(loss(s, b) for s, b in zip(sims, combo))
               for combo in itertools.product(*options) if sum(followers(b) for b in combo) >= need)
    assert sum(followers(b) for b in got) >= need
    assert sum(loss(s, b) for s, b in zip(sims, got)) == pytest.approx(best)


def test_target_out_of_reach_is_an_error():
    sim = np.eye(5) + np.triu(np.full((5, 5), 0.9), 1)
    with pytest.raises(ValueError, match="at most 2 are possible"):
        grouping.group_target([sim], 5, max_size=2)


def test_paper_greedy_rule():
    sim = np.eye(5)
    sim[0, 1], sim[0, 2], sim[0, 3] = 0.9, 0.6, 0.4  # layer 3 falls below delta against anchor 0
    sim[3, 4] = 0.7
    assert grouping.group_paper(sim, 0.5) == [[0, 1, 2], [3, 4]]
    assert grouping.group_paper(sim, 0.5, max_size=2) == [[0, 1], [2], [3, 4]]


def test_followers_for_saving_inverts_the_formula():
    n = grouping.followers_for_saving(0.3, 30, 3, 8192, 468)
    per = (8192 - 468) / (2 * 30 * 3 * 8192)
    assert n * per >= 0.3 > (n - 1) * per
    with pytest.raises(ValueError, match="covers the whole context"):
        grouping.followers_for_saving(0.3, 30, 3, 400, 468)


def mixed_assignments(n, windows, max_size):
    """Every assignment of one head: a segmentation whose one-layer segments may instead be streaming heads."""
    for blocks in segmentations(n):
        if any(len(b) > max_size for b in blocks):
            continue
        singles = [i for i, b in enumerate(blocks) if len(b) == 1]
        for choice in itertools.product([None, *range(len(windows))], repeat=len(singles)):
            stream = dict(zip(singles, choice))
            yield [(tuple(b), stream.get(i)) for i, b in enumerate(blocks)]


def priced(opt, assignment):
    err = sav = 0.0
    for layers, k in assignment:
        if k is None:
            err += sum(opt.follower_error[layers[0], f] for f in layers[1:])
            sav += opt.follower_saving * (len(layers) - 1)
        else:
            err += opt.streaming_error[layers[0], k]
            sav += opt.streaming_saving[k]
    return err, sav


def random_options(n, rng, allowed=("follower", "streaming")):
    windows = (4, 16, 64)
    return grouping.HeadOptions(np.triu(rng.uniform(0, 1, (n, n)), 1), 0.2,
                                np.sort(rng.uniform(0, 1, (n, 3)), axis=1)[:, ::-1].copy(),
                                np.array([0.45, 0.4, 0.3]), windows, frozenset(allowed))


@pytest.mark.parametrize("seed", range(5))
def test_mixed_head_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    opt = random_options(5, rng)
    for lam in (0.0, 0.5, 2.0, 10.0):
        segments, err, sav = grouping.assign_head(opt, lam, 3, None)
        brute = min(e - lam * s for e, s in (priced(opt, a) for a in mixed_assignments(5, opt.windows, 3)))
        assert abs((err - lam * sav) - brute) < 1e-9, (seed, lam)
        assert sum(len(s.layers) for s in segments) == 5 and all(len(s.layers) <= 3 for s in segments)


@pytest.mark.parametrize("seed", range(4))
def test_mixed_target_is_reached_with_no_dominating_assignment(seed):
    """The Lagrangian solution reaches the target, and no assignment saves as much with less error."""
    rng = np.random.default_rng(seed)
    options = [random_options(4, rng) for _ in range(2)]
    segments, err, sav = grouping.assign_mixed(options, 3, target_saving=1.2)
    assert sav >= 1.2 - 1e-9
    per_head = [list(mixed_assignments(4, o.windows, 3)) for o in options]
    for a, b in itertools.product(*per_head):
        (e1, s1), (e2, s2) = priced(options[0], a), priced(options[1], b)
        if s1 + s2 >= sav - 1e-12:
            assert e1 + e2 >= err - 1e-9


def test_mixed_kinds_restrict_and_max_error_caps_each_option():
    rng = np.random.default_rng(0)
    opt = random_options(6, rng, allowed=("follower",))
    segments, _, _ = grouping.assign_head(opt, 100.0, 4, None)
    assert all(s.streaming_window is None for s in segments)
    only_stream = random_options(6, rng, allowed=("streaming",))
    segments, _, _ = grouping.assign_head(only_stream, 100.0, 4, None)
    assert all(len(s.layers) == 1 for s in segments)
    capped = random_options(6, rng)
    capped.follower_error[0, 1] = 0.01  # one cheap follower, one cheap streaming option; everything else > 0.3
    capped.streaming_error[:] = np.maximum(capped.streaming_error, 0.3)
    capped.follower_error[capped.follower_error > 0.01] = np.maximum(capped.follower_error[capped.follower_error
                                                                                          > 0.01], 0.3)
    capped.streaming_error[4, 2] = 0.02
    segments, err, _ = grouping.assign_head(capped, 100.0, 4, 0.05)
    assert [(s.layers, s.streaming_window) for s in segments] == [((0, 1), None), ((2,), None), ((3,), None),
                                                                  ((4,), 64), ((5,), None)]
    assert abs(err - 0.03) < 1e-12
    with pytest.raises(ValueError, match="save at most"):
        grouping.assign_mixed([random_options(4, rng)], 3, target_saving=5.0)


@pytest.mark.parametrize("seed", range(3))
def test_block_precision_dp_matches_brute_force(seed):
    """Each shared block also picks a precision: its layers' precision errors and the anchor's and followers'
    savings add to the block's; the DP finds the brute-force optimum over segmentations x kinds x precisions."""
    rng = np.random.default_rng(seed)
    base = random_options(4, rng)
    opt = grouping.HeadOptions(base.follower_error, base.follower_saving, base.streaming_error,
                               base.streaming_saving, base.windows, base.allowed, ("K16V16", "K8V8", "K2V2"),
                               np.vstack([np.zeros(4), rng.uniform(0, 0.1, 4), rng.uniform(0, 0.6, 4)]),
                               np.array([0.0, 0.2, 0.35]), np.array([0.0, 0.1, 0.18]))

    def brute(lam):
        best = math.inf
        for assignment in mixed_assignments(4, opt.windows, 3):
            shared = [layers for layers, k in assignment if k is None]
            for picks in itertools.product(range(3), repeat=len(shared)):
                err, sav = priced(opt, assignment)
                for layers, p in zip(shared, picks):
                    err += opt.precision_error[p, list(layers)].sum()
                    sav += opt.anchor_saving[p] + (len(layers) - 1) * opt.follower_precision_saving[p]
                best = min(best, err - lam * sav)
        return best

    for lam in (0.0, 0.3, 1.0, 5.0):
        segments, err, sav = grouping.assign_head(opt, lam, 3, None)
        assert abs((err - lam * sav) - brute(lam)) < 1e-9, (seed, lam)
    assert {s.precision for s in grouping.assign_head(opt, 5.0, 3, None)[0] if s.streaming_window is None} \
        - {"K16V16"}  # a high price on bytes picks some integers


@pytest.mark.parametrize("seed", range(3))
def test_selection_error_counts_on_every_non_streaming_layer_but_caps_nothing(seed):
    """A layer that does not stream pays selection's loss: the DP finds the brute-force optimum with it; a loss
    above max_error still leaves the head full (selection is not an option a head can decline)."""
    rng = np.random.default_rng(seed)
    base = random_options(4, rng)
    loss = rng.uniform(0, 0.5, 4)
    opt = dataclasses.replace(base, selection_error=loss)
    for lam in (0.0, 0.5, 2.0):
        segments, err, sav = grouping.assign_head(opt, lam, 3, None)
        brute = min(e + sum(loss[list(layers)].sum() for layers, k in a if k is None) - lam * s
                    for a in mixed_assignments(4, opt.windows, 3) for e, s in [priced(opt, a)])
        assert abs((err - lam * sav) - brute) < 1e-9, (seed, lam)
    full_only = dataclasses.replace(base, allowed=frozenset(), selection_error=np.full(4, 0.9))
    segments, err, _ = grouping.assign_head(full_only, 1.0, 3, 0.1)
    assert [s.layers for s in segments] == [(0,), (1,), (2,), (3,)] and abs(err - 3.6) < 1e-9
