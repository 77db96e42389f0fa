"""The split cache + reference attention against a brute-force implementation of the PoD rule."""

import pytest
import torch

from ilc.runtime import PoDCache
from ilc.runtime.heads import HeadKind

from conftest import make_plan, mixed_plan, tiny_llama
from helpers import brute_force, run_cache


@pytest.mark.parametrize("mode", ["scores", "keys"])
@pytest.mark.parametrize("pad", [0, 4, 10])  # 10: the padded row's sinks arrive in a later chunk than row 0's
@pytest.mark.parametrize("kinds", ["shared", "mixed"])
def test_cache_and_reference_match_brute_force(mode, pad, kinds):
    torch.manual_seed(1)
    model = tiny_llama(layers=5, heads=6, kv_heads=3)
    per_head = [[[0, 1, 2], [3, 4]], [[0], [1, 2, 3, 4]], [[0, 1], [2], [3, 4]]]  # blocks differ per KV head
    plan = make_plan(model, None, sinks=3, window=5, mode=mode, per_head=per_head)
    if kinds == "mixed":
        plan = mixed_plan(model, sinks=3, window=5, mode=mode)
    b, hq, hkv, d, t = 2, 6, 3, 8, 29
    row_start = torch.tensor([0, pad])
    qs = [torch.randn(b, hq, t, d) for _ in range(5)]
    ks = [torch.randn(b, hkv, t, d) for _ in range(5)]
    vs = [torch.randn(b, hkv, t, d) for _ in range(5)]
    chunks = [9, 1, 1, 6, 1, 2, 1, 8]  # prefill chunks and decode steps
    assert sum(chunks) == t
    cache, got = run_cache(plan, qs, ks, vs, row_start, chunks)
    want = brute_force(qs, ks, vs, plan.head_table(), 3, mode, row_start)
    for l in range(5):
        g = got[l]
        for row in range(b):
            rs = int(row_start[row])
            err = (g[row, :, rs:] - want[l][row, :, rs:]).abs().max().item()
            assert err < 1e-5, (mode, l, row, err)
    assert not cache.state.queries, "scores-mode query scratch must be freed by the last reader"


def test_followers_hold_only_proximal_keys():
    model = tiny_llama(layers=4, heads=4, kv_heads=2)
    plan = make_plan(model, [[0, 1, 2, 3]], sinks=2, window=4)
    cache = PoDCache(plan)
    k = torch.randn(1, 2, 1, 8)
    for step in range(2000):
        for l in range(4):
            cache.update(k, k, l)
    follower = cache.layers[1]
    assert follower.anchor_keys.shape[1] == 0
    assert follower.sink_keys.shape[2] == 2 and follower.ring_keys.shape[2] == 4
    assert cache.layers[0].anchor_keys.shape[1] == 2
    dense, planned = plan.kv_bytes(2000, dtype_bytes=4)
    assert cache.used_bytes() == planned and cache.dense_bytes() == dense
    assert planned <= cache.nbytes() <= 1.02 * planned  # growth slack stays under 2%
    assert planned < 0.8 * dense


def test_streaming_heads_hold_only_sinks_and_their_window():
    model = tiny_llama(layers=5, heads=6, kv_heads=3)
    plan = mixed_plan(model, sinks=3, window=5)
    assert plan.kind_counts() == {"full": 6, "follower": 4, "streaming": 5}
    cache = PoDCache(plan)
    k = torch.randn(2, 3, 1, 8)
    for step in range(2000):
        for l in range(5):
            cache.update(k, k, l)
    layer = cache.layers[3]  # head 0 streaming (window 4), head 1 follower, head 2 streaming (window 7)
    assert layer.values.shape[1] == 1 and layer.anchor_keys.shape[1] == 0
    assert [(g.window, g.heads, g.ring_k.shape[2], g.ring_v.shape[2]) for g in layer.stream_groups] == \
        [(4, [0], 4, 4), (7, [2], 7, 7)]
    assert all(g.sink_k.shape[2] == 3 and g.sink_v.shape[2] == 3 for g in layer.stream_groups)
    dense, planned = plan.kv_bytes(2000, batch=2, dtype_bytes=4)
    assert cache.used_bytes() == planned and cache.dense_bytes() == dense
    assert planned <= cache.nbytes() <= 1.02 * planned
