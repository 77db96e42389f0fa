"""Token selection (a plan's `selection:`) composed with sharing: kept tokens, block consistency, exactness, bytes."""

import pytest
import torch

from ilc.runtime import PoDCache, load_plan, remove_plan
from ilc.runtime.heads import HeadKind, Selection
from ilc.runtime.plan import PlanError

from conftest import make_plan, mixed_plan, tiny_llama
from helpers import brute_force, run_cache


def expected_kept(qs, ks, plan, sel, t0, row_start):
    """kept[layer][row][kv_head]: bool [t0] of the prompt tokens the head keeps, computed position by position:
    FULL heads by their own scores, FOLLOWERs take their anchor's set, STREAMING heads are not selected (None)."""
    s, w = plan.sinks, sel.window
    n_obs = 1 if sel.scorer == "tova" else w
    table = plan.head_table()
    b, hq, _, d = qs[0].shape
    hkv = ks[0].shape[1]
    g = hq // hkv
    budget = sel.budget(t0 - int(row_start.min()) - s - w)
    own = {}
    for l in range(len(qs)):
        for row in range(b):
            rs = int(row_start[row])
            for kv in range(hkv):
                if table[l][kv].kind != HeadKind.FULL:
                    continue
                keep = torch.zeros(t0, dtype=torch.bool)
                if t0 - rs <= s + budget + w:  # a short row keeps all its tokens
                    keep[rs:] = True
                    own[l, row, kv] = keep
                    continue
                score = torch.zeros(t0, dtype=torch.float64)
                for h in range(kv * g, kv * g + g):
                    for i in range(t0 - n_obs, t0):
                        logits = qs[l][row, h, i].double() @ ks[l][row, kv, :t0].double().T * d ** -0.5
                        j = torch.arange(t0)
                        logits = logits.masked_fill((j > i) | (j < rs), float("-inf"))
                        score += torch.softmax(logits, -1)
                if sel.scorer == "snapkv":  # average pooling, zero-padded at the ends
                    pad = sel.pool // 2
                    padded = torch.cat([torch.zeros(pad), score, torch.zeros(pad)]).double()
                    score = torch.stack([padded[j:j + sel.pool].sum() for j in range(t0)]) / sel.pool
                elif sel.scorer == "spans":  # max pooling, ties broken by the token's own score
                    pad = sel.pool // 2
                    padded = torch.cat([torch.full((pad,), -torch.inf), score, torch.full((pad,), -torch.inf)])
                    score = torch.stack([padded[j:j + sel.pool].max() for j in range(t0)]) + 1e-3 * score
                candidates = torch.arange(rs + s, t0 - w)
                top = candidates[score[candidates].topk(budget).indices]
                keep[rs:rs + s] = True
                keep[t0 - w:] = True
                keep[top] = True
                own[l, row, kv] = keep
    kept = [[[None] * hkv for _ in range(b)] for _ in range(len(qs))]
    for l in range(len(qs)):
        for row in range(b):
            for kv in range(hkv):
                spec = table[l][kv]
                if spec.kind != HeadKind.STREAMING:
                    kept[l][row][kv] = own[spec.anchor, row, kv]
    return kept


@pytest.mark.parametrize("scorer", ["snapkv", "spans", "tova"])
@pytest.mark.parametrize("pad", [0, 4, 10])  # 10: the padded row is short enough to keep all its tokens
@pytest.mark.parametrize("kinds", ["shared", "mixed"])
def test_selection_keeps_the_chosen_tokens_and_matches_brute_force(scorer, pad, kinds):
    torch.manual_seed(2)
    model = tiny_llama(layers=5, heads=6, kv_heads=3)
    per_head = [[[0, 1, 2], [3, 4]], [[0], [1, 2, 3, 4]], [[0, 1], [2], [3, 4]]]
    plan = make_plan(model, None, sinks=3, window=5, per_head=per_head)
    if kinds == "mixed":
        plan = mixed_plan(model, sinks=3, window=5)
    sel = Selection(keep=0.4, scorer=scorer, window=5, pool=7)  # a pool wider than the prompt ties the scores
    plan = plan.with_options(selection=sel)
    b, hq, hkv, d, t, t0 = 2, 6, 3, 8, 29, 20
    row_start = torch.tensor([0, pad])
    qs = [torch.randn(b, hq, t, d) for _ in range(5)]
    ks = [torch.randn(b, hkv, t, d) for _ in range(5)]
    vs = [torch.randn(b, hkv, t, d) for _ in range(5)]
    cache, got = run_cache(plan, qs, ks, vs, row_start, [12, 8] + [1] * 9)  # chunked prompt, then decode
    assert cache.state.selected and cache.state.shift > 0
    kept = expected_kept(qs, ks, plan, sel, t0, row_start)
    masks = [[[None if k is None else torch.cat([k, torch.ones(t - t0, dtype=torch.bool)]) for k in row]
              for row in layer] for layer in kept]
    want = brute_force(qs, ks, vs, plan.head_table(), 3, "scores", row_start, kept=masks)
    for l in range(5):
        for row in range(b):
            err = (got[l][row, :, t0:] - want[l][row, :, t0:]).abs().max().item()  # decode steps after selection
            assert err < 1e-5, (l, row, err)
    # every layer of a block keeps the same tokens: a follower's values are its own values at its anchor's choice
    for l, specs in enumerate(plan.head_table()):
        layer = cache.layers[l]
        for kv, spec in enumerate(specs):
            if spec.kind == HeadKind.STREAMING:
                continue
            for row in range(b):
                stored = layer.values[row, layer.value_pos[kv], :t0 - cache.state.shift]  # the prompt's kept slots
                rs_stored = 0 if cache.state.row_start is None else int(cache.state.row_start[row])
                want_v = vs[l][row, kv, :t0][kept[l][row][kv]]
                assert torch.equal(stored[rs_stored:], want_v), (l, kv, row)


def test_spans_scorer_keeps_the_neighbourhood_of_a_read_token_whole():
    """One token the observing queries read (a needle's first digit): SnapKV's average pooling spreads a share of
    its score to its neighbours, the spans scorer gives each of them the token's score, so a budget of one pool
    keeps exactly that span."""
    from ilc.runtime.selection import token_scores

    torch.manual_seed(0)
    d, t, w, peak = 16, 80, 8, 30
    keys = torch.randn(1, 1, t, d) * 0.1
    query = torch.randn(d)
    keys[0, 0, peak] = query * 3  # read by every observing query
    queries = query.expand(1, 1, 2, w, d) + 0.01 * torch.randn(1, 1, 2, w, d)
    rs = torch.zeros(1, dtype=torch.long)
    spans = token_scores(queries, keys, rs, 1.0, Selection(keep=0.2, scorer="spans", window=w, pool=7))[0, 0]
    top = spans[:t - w].topk(7).indices.sort().values
    assert top.tolist() == list(range(peak - 3, peak + 4))
    avg = token_scores(queries, keys, rs, 1.0, Selection(keep=0.2, scorer="snapkv", window=w, pool=7))[0, 0]
    assert spans[peak + 3] > 0.5 * spans[peak] and avg[peak + 3] < 0.2 * spans[peak]


def test_budget_covering_the_prompt_reproduces_the_plan_exactly():
    torch.manual_seed(3)
    model = tiny_llama(layers=5, heads=6, kv_heads=3)
    plan = mixed_plan(model, sinks=3, window=5)
    x = torch.randint(3, 90, (2, 40))
    mask = torch.ones_like(x)
    mask[1, :6] = 0
    outs = []
    for p in (plan, plan.with_options(selection=Selection(keep=0.999, window=5))):
        p.apply(model)
        outs.append(model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   past_key_values=p.new_cache(model)))
        remove_plan(model)
    assert torch.equal(outs[0], outs[1])


def test_selection_changes_outputs_and_holds_the_planned_bytes():
    torch.manual_seed(4)
    model = tiny_llama(layers=5, heads=6, kv_heads=3)
    plan = mixed_plan(model, sinks=3, window=5).with_options(selection=Selection(keep=0.2, window=5))
    x = torch.randint(3, 90, (1, 80))
    plan.apply(model)
    cache = plan.new_cache(model)
    with torch.no_grad():
        model(x, past_key_values=cache)
        before, held_before = cache.used_bytes(), cache.nbytes()
        cache.select()
    dense, planned = plan.kv_bytes(80, dtype_bytes=4)
    assert cache.used_bytes() == planned < before
    assert cache.nbytes() < held_before  # storage really shrinks (reallocated to the kept size)
    kw = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    out = model.generate(x, past_key_values=plan.new_cache(model), **kw)
    remove_plan(model)
    unselected = mixed_plan(model, sinks=3, window=5)
    unselected.apply(model)
    plain = model.generate(x, past_key_values=unselected.new_cache(model), **kw)
    remove_plan(model)
    assert cache.get_seq_length() == 80
    assert torch.equal(out.logits[0], plain.logits[0])  # the prompt's own logits: prefill attends to every token
    assert (out.logits[1] - plain.logits[1]).abs().max() > 1e-4  # decode after dropping 80% of distant tokens


def test_selection_plan_round_trips_and_rejects_bad_sections(tmp_path):
    model = tiny_llama(layers=5, heads=6, kv_heads=3)
    plan = mixed_plan(model, sinks=3, window=5).with_options(selection=Selection(keep=0.1, scorer="tova", window=8))
    path = plan.save(tmp_path / "p.yaml")
    assert load_plan(path) == plan
    assert plan.estimated_saving(4096) > mixed_plan(model, sinks=3, window=5).estimated_saving(4096)
    text = path.read_text()
    for bad, message in ((text.replace("keep: 0.1", "keep: 1.5"), "keep"),
                         (text.replace("scorer: tova", "scorer: magic"), "scorer"),
                         (text.replace("window: 8", "window: 2", 1), "window"),
                         (text.replace("window: 8", "window: 0", 1), "window must be >= 1"),
                         (text.replace("keep: 0.1", "keep: 0.1\n  keeep: 3"), "keeep")):
        (tmp_path / "bad.yaml").write_text(bad)
        with pytest.raises(PlanError, match=message):
            load_plan(tmp_path / "bad.yaml")
    with pytest.raises(PlanError, match="token selection"):
        PoDCache(plan, kernels=True)


def test_held_bytes_count_what_selection_leaves():
    """`ilc.eval.run.held_bytes` (the sweep's "saved at 4k") runs the selection as the first decode step would."""
    from ilc.eval.run import held_bytes

    model = tiny_llama(layers=5, heads=6, kv_heads=3)
    plan = mixed_plan(model, sinks=3, window=5)
    selected = plan.with_options(selection=Selection(keep=0.1, window=8))
    held, dense = held_bytes(selected, 4000)
    _, planned = selected.kv_bytes(4000)  # held_bytes counts floats at 2 bytes (a 16-bit cache)
    assert planned <= held < held_bytes(plan, 4000)[0] and held < 1.1 * planned  # slack: 32+ slots per tensor


def test_replay_scores_are_the_attention_of_the_copy_and_drive_selection(monkeypatch):
    """The replay scorer (KVzip's rule): per layer and KV head, the most attention any query of the prompt's copy
    pays to each prompt token, as an eager dense forward over prompt + copy computes it; selection keeps by it."""
    from ilc.runtime.replay import replay_scores

    model = tiny_llama(layers=3, heads=4, kv_heads=2, init_range=0.2)
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    plan = make_plan(model, [[0], [1], [2]], sinks=2, window=4).with_options(
        selection=Selection(keep=0.3, scorer="replay", window=4))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attn = model(torch.cat([ids, ids], 1), output_attentions=True).attentions  # [B, Hq, 80, 80] per layer
    plan.apply(model)
    got = replay_scores(model, ids, torch.zeros(1, dtype=torch.long))
    for layer, a in enumerate(attn):
        want = a[:, :, 40:, :40].amax(2).unflatten(1, (2, 2)).amax(2)  # [B, Hkv, T]
        assert torch.allclose(got[layer], want, atol=1e-5)
    import ilc.runtime.apply as apply_module

    runs = []
    monkeypatch.setattr(apply_module, "replay_scores", lambda *a: runs.append(1) or replay_scores(*a))
    cache = plan.new_cache(model)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 43) and cache.state.selected and cache.state.shift > 0 and runs == [1]
    remove_plan(model)
