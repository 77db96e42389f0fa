"""PoD-compressed inference through plain `model.generate()` on a tiny random Llama, against the dense model."""

import pytest
import torch

from ilc.runtime import PlanError, PoDCache, cache_report, remove_plan

from conftest import make_plan, mixed_plan, tiny_llama

GEN = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)


def ids(b=1, t=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (b, t), generator=g)


def dense_logits(model, x):
    with torch.no_grad():
        return model(x).logits


# window 512: the tiny model's whole context (max_position_embeddings; a plan's windows are bounded by it)
@pytest.mark.parametrize("groups,window", [([[0, 1, 2, 3]], 512), ([[0], [1], [2], [3]], 4)])
def test_exact_when_window_covers_context_or_blocks_are_single(tiny, groups, window):
    """Nothing is shared in effect: tokens and logits equal the uncompressed model's."""
    x = ids()
    want_tokens = tiny.generate(x, **GEN)
    want_logits = dense_logits(tiny, x)
    plan = make_plan(tiny, groups, sinks=2, window=window)
    plan.apply(tiny)
    got_tokens = tiny.generate(x, **GEN)
    got_logits = dense_logits(tiny, x)
    assert torch.equal(got_tokens, want_tokens)
    assert (got_logits - want_logits).abs().max() < 1e-4


def test_mixed_plan_exact_when_windows_cover_the_context_and_lossy_otherwise():
    """Full, follower and streaming heads in one layer: with every window >= the context nothing is dropped or
    shared in effect, so tokens and logits equal the full model's; with small windows they differ and bytes drop."""
    model = tiny_llama(layers=5, heads=6, kv_heads=3)
    x = ids(b=2, t=60)
    mask = torch.ones_like(x)
    mask[1, :9] = 0
    want_tokens = model.generate(x, attention_mask=mask, **GEN)
    with torch.no_grad():
        want_logits = model(x, attention_mask=mask).logits
    for windows, exact in (((100, 200, 300), True), ((3, 8, 20), False)):
        plan = mixed_plan(model, sinks=2, window=max(windows) if exact else 6, windows=windows)
        plan.apply(model)
        got_tokens = model.generate(x, attention_mask=mask, **GEN)
        with torch.no_grad():
            out = model(x, attention_mask=mask, use_cache=True)
        real = mask.bool()
        diff = (out.logits - want_logits)[real].abs().max()
        if exact:
            assert torch.equal(got_tokens, want_tokens) and diff < 1e-4
        else:
            assert diff > 1e-3
            report = cache_report(out.past_key_values)
            assert report.used == plan.kv_bytes(60, batch=2, dtype_bytes=4)[1] < 0.7 * report.dense
            assert report.held < report.dense  # growth slack (32 slots) included
        remove_plan(model)


def test_sharing_changes_outputs_and_saves_bytes(tiny):
    """A real sharing plan must differ from dense (no silent no-op) and hold fewer bytes."""
    x = ids(t=120)
    want = dense_logits(tiny, x)
    plan = make_plan(tiny, [[0, 1], [2, 3]], sinks=2, window=8)
    plan.apply(tiny)
    with torch.no_grad():
        out = tiny(x, use_cache=True)
    assert (out.logits - want).abs().max() > 1e-3
    report = cache_report(out.past_key_values)
    assert report.used == plan.kv_bytes(120, dtype_bytes=4)[1]
    assert report.held < report.dense


def test_batched_left_padded_equals_per_row(tiny):
    plan = make_plan(tiny, [[0, 1], [2, 3]], sinks=2, window=6)
    plan.apply(tiny)
    a, b = ids(t=30, seed=1), ids(t=21, seed=2)
    batch = torch.zeros(2, 30, dtype=torch.long)
    mask = torch.zeros(2, 30, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 9:], mask[1, 9:] = b[0], 1
    out = tiny.generate(batch, attention_mask=mask, **GEN)
    assert torch.equal(out[0, 30:], tiny.generate(a, **GEN)[0, 30:])
    assert torch.equal(out[1, 30:], tiny.generate(b, **GEN)[0, 21:])


def test_chunked_prefill_equals_one_shot(tiny):
    plan = make_plan(tiny, [[0, 1, 2], [3]], sinks=3, window=7)
    plan.apply(tiny)
    x = ids(t=50)
    with torch.no_grad():
        one = tiny(x).logits[:, -1]
        cache = plan.new_cache(tiny)
        for lo in range(0, 50, 13):
            last = tiny(x[:, lo:lo + 13], past_key_values=cache).logits[:, -1]
    assert (one - last).abs().max() < 1e-4


def test_explicit_cache_reuse_and_sampling(tiny):
    plan = make_plan(tiny, [[0, 1], [2, 3]], sinks=2, window=5)
    plan.apply(tiny)
    x = ids(t=25)
    cache = plan.new_cache(tiny)
    first = tiny.generate(x, past_key_values=cache, **GEN)
    assert isinstance(cache, PoDCache) and cache.get_seq_length() == first.shape[1] - 1
    more = tiny.generate(first, past_key_values=cache, **GEN)  # continue the same conversation
    assert torch.equal(more[:, : first.shape[1]], first)
    bare = tiny.generate(x, **GEN)
    assert torch.equal(bare, first)
    torch.manual_seed(0)
    sampled = tiny.generate(x, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    assert sampled.shape == (1, 33)


def test_beam_search_runs(tiny):
    plan = make_plan(tiny, [[0, 1], [2, 3]], sinks=2, window=5)
    plan.apply(tiny)
    out = tiny.generate(ids(t=20), max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 26)


def test_mixed_plan_beam_search_and_repeated_rows_match_the_full_model_when_exact():
    """Beam search reorders, and num_return_sequences repeats, every buffer (streaming groups included): with
    windows covering the context the beams equal the full model's."""
    model = tiny_llama(layers=5, heads=6, kv_heads=3)
    x = ids(t=30)
    beams = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    want = model.generate(x, **beams)
    mixed_plan(model, sinks=2, window=100, windows=(100, 100, 100)).apply(model)
    assert torch.equal(model.generate(x, **beams), want)
    mixed_plan(model, sinks=2, window=6, windows=(3, 8, 20)).apply(model)
    lossy = model.generate(x, **beams)
    assert lossy.shape == want.shape


def test_apply_is_reversible_and_models_are_independent():
    m1, m2 = tiny_llama(seed=0), tiny_llama(seed=0)
    x = ids(t=60)
    dense = dense_logits(m1, x)
    make_plan(m1, [[0, 1, 2, 3]], sinks=1, window=4).apply(m1)
    make_plan(m2, [[0], [1], [2], [3]], sinks=1, window=4).apply(m2)
    assert (dense_logits(m2, x) - dense).abs().max() < 1e-4  # m1's plan does not leak into m2
    assert (dense_logits(m1, x) - dense).abs().max() > 1e-3
    remove_plan(m1)
    assert m1.config._attn_implementation == "sdpa"
    assert (dense_logits(m1, x) - dense).abs().max() < 1e-5


def test_skip_threshold_one_equals_no_skip_and_low_threshold_skips(tiny):
    x = ids(t=80)
    plan = make_plan(tiny, [[0, 1, 2, 3]], sinks=2, window=6)
    plan.apply(tiny)
    base = dense_logits(tiny, x)
    plan.apply(tiny, skip_threshold=1.0)
    assert (dense_logits(tiny, x) - base).abs().max() < 1e-5
    plan.apply(tiny, skip_threshold=0.05)
    with torch.no_grad():
        out = tiny(x)
    state = out.past_key_values.state
    assert state.skipped_rows > 0 and state.skipped_rows <= state.follower_rows
    assert (out.logits - base).abs().max() > 1e-4


def test_errors_before_any_compute(tiny):
    other = tiny_llama(layers=3)
    plan = make_plan(tiny, [[0, 1], [2, 3]])
    with pytest.raises(PlanError, match="num_layers"):
        plan.apply(other)
    finetune = tiny_llama(seed=5)
    with pytest.raises(PlanError, match="other weights"):
        plan.apply(finetune)
    plan.apply(finetune, strict=False)
    plan.apply(tiny)
    with pytest.raises(PlanError, match="exceeds the model's limit of 512"):
        tiny(ids(t=513))
    right_padded = torch.ones(1, 20, dtype=torch.long)
    right_padded[0, -3:] = 0
    with pytest.raises(PlanError, match="left padding"):
        tiny(ids(t=20), attention_mask=right_padded)
    tiny.set_attn_implementation("sdpa")
    with pytest.raises(PlanError, match="attention implementation was changed"):
        tiny(ids(t=10))
