"""Helpers the tests share beyond conftest's model builders: the PoD rule by brute force, and a cache fed layer by
layer through the registered attention (tests import from here, never from another test module)."""

import torch

from ilc.runtime import PoDCache
from ilc.runtime.attention import pod_attention
from ilc.runtime.heads import HeadKind, Mode


def brute_force(qs, ks, vs, table, sinks, mode, row_start, kept=None):
    """Per layer output [B, Hq, T, D] of the rule, position by position, with explicit logits.
    table[layer][kv_head]: the plan's HeadSpec (kind, anchor, window); kept[layer][row][kv_head]: None or a bool
    [T] of the keys the head may see (token selection)."""
    L = len(qs)
    b, hq, t, d = qs[0].shape
    hkv = ks[0].shape[1]
    g = hq // hkv
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    outs = []
    for l in range(L):
        out = torch.zeros(b, hq, t, d, dtype=torch.float64)
        for row in range(b):
            rs = int(row_start[row])
            for h in range(hq):
                kv = h // g
                spec = table[l][kv]
                a = spec.anchor
                q_own = qs[l][row, h].double()
                q_d = q_own if (mode == Mode.KEYS or a == l) else qs[a][row, h].double()
                own = q_own @ ks[l][row, kv].double().T
                dist = q_d @ ks[a][row, kv].double().T
                if spec.kind == HeadKind.FULL:
                    prox = torch.ones(t, t, dtype=torch.bool)
                else:
                    prox = ((j - rs) < sinks) | ((i - j) < spec.window)
                if spec.kind == HeadKind.STREAMING:
                    dist = torch.full_like(dist, float("-inf"))
                logits = torch.where(prox, own, dist) * d ** -0.5
                valid = (j <= i) & (j >= rs)
                if kept is not None and kept[l][row][kv] is not None:
                    valid = valid & kept[l][row][kv][None, :]
                logits = logits.masked_fill(~valid, float("-inf"))
                p = torch.softmax(logits[rs:], -1)
                out[row, h, rs:] = p @ vs[l][row, kv].double()
        outs.append(out)
    return outs


class _Module:
    layer_idx = 0


def run_cache(plan, qs, ks, vs, row_start, chunks):
    """Feed per-layer q/k/v [B, H, T, D] through a PoDCache and the registered attention, chunk by chunk;
    returns (cache, per-layer outputs [B, Hq, T, D] in float64)."""
    cache = PoDCache(plan)
    cache.set_row_start(row_start)
    got = [[] for _ in qs]
    start = 0
    d = qs[0].shape[-1]
    for n in chunks:
        for l in range(len(qs)):
            sl = slice(start, start + n)
            view, values = cache.update(ks[l][:, :, sl], vs[l][:, :, sl], l)
            _Module.layer_idx = l
            out, _ = pod_attention(_Module, qs[l][:, :, sl], view, values, None, scaling=d ** -0.5)
            got[l].append(out.transpose(1, 2))
        start += n
    return cache, [torch.cat(g, dim=2).double() for g in got]
