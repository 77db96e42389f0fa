"""Grouping methods against brute force over every segmentation, on random similarity matrices."""

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
