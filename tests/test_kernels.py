"""Triton kernels against the PyTorch reference, on CPU through TRITON_INTERPRET=1 (set in conftest)."""

import pytest
import torch

from ilc.runtime.kernel_dispatch import pod_attention_triton
from ilc.runtime import PoDCache, reference_attention

from conftest import make_plan, mixed_plan, tiny_llama

pytestmark = pytest.mark.triton

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
# Compiled kernels on a GPU; the interpreter on CPU (conftest sets TRITON_INTERPRET=1 when there is no GPU).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_layers(plan, mode, dtype, head_dim, row_start, chunks, b=2, hq=4, hkv=2, seed=0, device=DEVICE):
    """Feed random chunks through a PoDCache; compare the kernels with the reference at every layer and step."""
    torch.manual_seed(seed)
    cache = PoDCache(plan, mode=mode)
    cache.set_row_start(None if row_start is None else row_start.to(device))
    state = cache.state
    worst = 0.0
    for n in chunks:
        for layer in range(plan.num_layers):
            k = torch.randn(b, hkv, n, head_dim, device=device).to(dtype)
            v = torch.randn(b, hkv, n, head_dim, device=device).to(dtype)
            q = torch.randn(b, hq, n, head_dim, device=device).to(dtype)
            view, values = cache.update(k, v, layer)
            if mode == "scores" and layer in cache.last_reader:
                state.queries[layer] = q
            want = reference_attention(q, view, values, head_dim ** -0.5)
            got = pod_attention_triton(q, view, values, head_dim ** -0.5)
            assert got.dtype == dtype and not torch.isnan(got).any(), "every output element must be written"
            real = torch.ones(b, n, dtype=torch.bool)
            if row_start is not None:
                slots = torch.arange(view.start, view.total)
                real = slots[None, :] >= row_start[:, None]
            diff = (got.float() - want.float()).norm(dim=-1)  # [B, H, n]
            ref = want.float().norm(dim=-1).clamp_min(1e-3)
            rel = (diff / ref).transpose(1, 2).cpu()[real].max().item() if real.any() else 0.0
            worst = max(worst, rel)
    return worst


@pytest.mark.parametrize("mode", ["scores", "keys"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_and_decode_match_reference(mode, head_dim):
    model = tiny_llama(layers=3, heads=4, kv_heads=2)
    plan = make_plan(model, None, sinks=3, window=8, mode=mode, per_head=[[[0, 1, 2]], [[0], [1, 2]]])
    err = run_layers(plan, mode, torch.float32, head_dim, None, chunks=[37, 1, 1, 1])
    assert err < TOLERANCE[torch.float32], err


def test_left_padding_ragged_rows_and_chunked_prefill():
    model = tiny_llama(layers=3, heads=6, kv_heads=3)
    plan = make_plan(model, None, sinks=2, window=6, per_head=[[[0, 1], [2]], [[0, 1, 2]], [[0], [1], [2]]])
    err = run_layers(plan, "scores", torch.float32, 64, torch.tensor([0, 5]), chunks=[20, 9, 1, 1], hq=6, hkv=3)
    assert err < TOLERANCE[torch.float32], err


@pytest.mark.parametrize("mode", ["scores", "keys"])
@pytest.mark.parametrize("row_start", [None, (0, 5)])
def test_mixed_layers_all_three_kinds(mode, row_start):
    """Layers holding full, follower and streaming heads at once (streaming windows 2, 4, 7 and 30 slots, each
    a launch of its own), with and without left padding, prefill in chunks, then decode steps."""
    model = tiny_llama(layers=5, heads=6, kv_heads=3)
    plan = mixed_plan(model, sinks=2, window=6, mode=mode, windows=(2, 4, 30))
    rs = None if row_start is None else torch.tensor(row_start)
    err = run_layers(plan, mode, torch.float32, 64, rs, chunks=[23, 9, 1, 1, 1], hq=6, hkv=3)
    assert err < TOLERANCE[torch.float32], err


def test_bfloat16_inputs_accumulate_in_fp32():
    model = tiny_llama(layers=2, heads=4, kv_heads=2)
    plan = make_plan(model, [[0, 1]], sinks=2, window=5)
    err = run_layers(plan, "scores", torch.bfloat16, 64, None, chunks=[30, 1, 1])
    assert err < TOLERANCE[torch.bfloat16], err


@pytest.mark.parametrize("sinks, window, b", [(20, 64, 2), (3, 5, 4)])
def test_window_covering_context_many_sinks_and_one_split(sinks, window, b):
    """Window longer than the context (nothing distant), more sinks than a 16-slot tile, and a batch large enough
    that each KV head gets a single split (no merge across splits)."""
    model = tiny_llama(layers=3, heads=4, kv_heads=2)
    plan = make_plan(model, None, sinks=sinks, window=window, per_head=[[[0, 1, 2]], [[0], [1, 2]]])
    err = run_layers(plan, "scores", torch.float32, 64, None, chunks=[40, 1, 1], b=b)
    assert err < TOLERANCE[torch.float32], err


def test_mqa_and_no_sinks():
    model = tiny_llama(layers=2, heads=4, kv_heads=1)
    plan = make_plan(model, [[0, 1]], sinks=0, window=4)
    err = run_layers(plan, "keys", torch.float32, 64, None, chunks=[25, 1, 1], hq=4, hkv=1)
    assert err < TOLERANCE[torch.float32], err


@pytest.mark.parametrize("kinds", ["shared", "mixed"])
def test_generate_through_kernels_matches_reference(kinds):
    """The runtime picks the kernels end to end (prefill, decode, scores-mode logits reuse; mixed: streaming heads
    too) with plain generate()."""
    if kinds == "shared":
        model = tiny_llama(layers=4, heads=4, kv_heads=2, head_dim=64).to(DEVICE)
        plan = make_plan(model, None, sinks=2, window=6, per_head=[[[0, 1, 2], [3]], [[0], [1, 2, 3]]])
    else:
        model = tiny_llama(layers=5, heads=6, kv_heads=3, head_dim=64).to(DEVICE)
        plan = mixed_plan(model, sinks=2, window=6, windows=(3, 8, 20))
    x = torch.randint(3, 97, (2, 40), device=DEVICE)
    mask = torch.ones_like(x)
    mask[1, :7] = 0
    outs = {}
    for kernels in (False, True):
        plan.apply(model, kernels=kernels)
        with torch.no_grad():
            outs[kernels] = model(x, attention_mask=mask).logits[:, -1]
            outs[f"gen{kernels}"] = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                                   pad_token_id=0)
    assert (outs[True] - outs[False]).abs().max() < 1e-4
    assert torch.equal(outs["genTrue"], outs["genFalse"])


class _CountingKernel:
    """Wraps a Triton kernel: counts launches, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("mode, split_launches", [("scores", 1), ("keys", 2)])
def test_decode_launches_per_layer(monkeypatch, mode, split_launches):
    """A layer whose heads anchor, follow layer 0 and follow layer 1 decodes in one split launch and one merge
    (scores mode); keys mode needs one split launch per anchor whose keys it reads."""
    import ilc.kernels.decode as decode

    model = tiny_llama(layers=3, heads=6, kv_heads=3)
    plan = make_plan(model, None, sinks=2, window=6, mode=mode,
                     per_head=[[[0, 1, 2]], [[0], [1, 2]], [[0, 1], [2]]])  # layer 2: follows 0 and 1, anchors h2
    split, merge = _CountingKernel(decode._decode_split), _CountingKernel(decode._decode_merge)
    monkeypatch.setattr(decode, "_decode_split", split)
    monkeypatch.setattr(decode, "_decode_merge", merge)
    cache = PoDCache(plan, mode=mode)
    torch.manual_seed(0)
    for n in (20, 1):
        for layer in range(3):
            k, v = torch.randn(2, 3, n, 64, device=DEVICE), torch.randn(2, 3, n, 64, device=DEVICE)
            q = torch.randn(2, 6, n, 64, device=DEVICE)
            view, values = cache.update(k, v, layer)
            if mode == "scores" and layer in cache.last_reader:
                cache.state.queries[layer] = q
            split.launches = merge.launches = 0
            got = pod_attention_triton(q, view, values, 0.125)
            if n == 1:
                assert view.chunk_recent is None, "decode reads the ring in place: no copy of the window"
                assert merge.launches == 1
                assert split.launches == (split_launches if layer == 2 else 1)
                want = reference_attention(q, view, values, 0.125)
                assert (got - want).abs().max() < 1e-4
    written = cache.state.kernel_scratch["logits_from"]
    assert set(written) == ({0, 1, 2} if mode == "scores" else set()), "only scores-mode anchors leave logits"


def test_follower_without_its_anchor_this_step_fails_loudly():
    model = tiny_llama(layers=2, heads=4, kv_heads=2)
    plan = make_plan(model, [[0, 1]], sinks=2, window=4)
    cache = PoDCache(plan)
    torch.manual_seed(0)
    for layer in range(2):
        k = torch.randn(1, 2, 12, 64, device=DEVICE)
        view, values = cache.update(k, k, layer)
        cache.state.queries[layer] = q = torch.randn(1, 4, 12, 64, device=DEVICE)
        pod_attention_triton(q, view, values, 0.125)
    k = torch.randn(1, 2, 1, 64, device=DEVICE)
    cache.update(k, k, 0)  # the anchor's step is stored but its attention never runs
    view, values = cache.update(k, k, 1)
    with pytest.raises(RuntimeError, match="step logits of anchor layer 0"):
        pod_attention_triton(torch.randn(1, 4, 1, 64, device=DEVICE), view, values, 0.125)


def test_decode_launches_with_streaming_heads(monkeypatch):
    """Layer 3 of the mixed plan holds streaming heads of two windows and a follower: one split launch for the
    follower, one per streaming window, and one merge; no window is copied out of a ring."""
    import ilc.kernels.decode as decode

    model = tiny_llama(layers=5, heads=6, kv_heads=3)
    plan = mixed_plan(model, sinks=2, window=6, windows=(2, 4, 30))
    split, merge = _CountingKernel(decode._decode_split), _CountingKernel(decode._decode_merge)
    monkeypatch.setattr(decode, "_decode_split", split)
    monkeypatch.setattr(decode, "_decode_merge", merge)
    cache = PoDCache(plan)
    torch.manual_seed(0)
    launches = {}
    for n in (40, 1):
        for layer in range(5):
            k, v = torch.randn(1, 3, n, 64, device=DEVICE), torch.randn(1, 3, n, 64, device=DEVICE)
            q = torch.randn(1, 6, n, 64, device=DEVICE)
            view, values = cache.update(k, v, layer)
            if layer in cache.last_reader:
                cache.state.queries[layer] = q
            split.launches = merge.launches = 0
            got = pod_attention_triton(q, view, values, 0.125)
            if n == 1:
                launches[layer] = (split.launches, merge.launches)
                assert not view.stream_recent, "decode reads the streaming rings in place"
                assert (got - reference_attention(q, view, values, 0.125)).abs().max() < 1e-4
    # layer 3: streaming windows 4 (head 0) and 30 (head 2), head 1 follows; layer 1: full, streaming 2, follower
    assert launches[3] == (3, 1) and launches[1] == (2, 1) and launches[2] == (1, 1)


def test_kernels_are_custom_ops_that_pass_opcheck_and_trace_without_a_graph_break(monkeypatch):
    """The runtime calls the Triton launchers through `torch.library` custom ops (`ilc::...`): their schemas and
    fake implementations pass `opcheck` on the arguments of a real mixed-layer step, and `torch.compile`
    (fullgraph) traces a call without a graph break."""
    from ilc.kernels import ops

    calls = {}
    for name in ("decode_attention", "decode_merge", "prefill_attention"):
        op = getattr(ops, name)

        def record(*args, op=op, name=name, **kwargs):
            calls.setdefault(name, (args, kwargs))
            return op(*args, **kwargs)
        monkeypatch.setattr(ops, name, record)
    model = tiny_llama(layers=5, heads=6, kv_heads=3)
    run_layers(mixed_plan(model, sinks=3, window=5), "scores", torch.float32, 16, None, [9, 1], hq=6, hkv=3)
    monkeypatch.undo()
    assert set(calls) == {"decode_attention", "decode_merge", "prefill_attention"}
    for name, (args, kwargs) in calls.items():
        torch.library.opcheck(getattr(torch.ops.ilc, name).default, args, kwargs,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    args, kwargs = calls["decode_merge"]
    out = args[0].clone()

    def merge(out, mid_o, mid_lse):
        ops.decode_merge(out, mid_o, mid_lse, kwargs.get("nsplit", args[3] if len(args) > 3 else None))
        return out * 1

    torch._dynamo.reset()
    explain = torch._dynamo.explain(merge)(out, args[1], args[2])
    assert explain.graph_break_count == 0 and explain.graph_count == 1
