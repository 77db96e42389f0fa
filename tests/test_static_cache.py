"""The static PoD cache: same outputs as the growing cache, a decode step that compiles with no graph break, no
host sync in a decode step, and exactly the plan's bytes for its max_length."""

import pytest
import torch

from ilc.runtime import PlanError, cache_report, remove_plan
from ilc.runtime.heads import Selection
from ilc.runtime.static_cache import StaticPoDCache, StaticQuantizedPoDLayer

from conftest import mixed_plan, quantized, served_plan, tiny_llama


def quantized_plan(model, kernels: bool, streams: bool = False):
    """Quantized heads at three precisions (residual 8, groups of 8): the mixed plan (followers keep their anchors'
    packed keys) on the reference path; full and streaming heads only for the kernels (they do not run followers
    of quantized anchors). With `streams`: streaming windows of 40 and 52 slots at K4cV4 (every head of the last
    layer), beside a 16-bit one of 4, and no followers."""
    if streams:
        windows = {(1, 0): 40, (3, 2): 4, (2, 1): 52, (4, 0): 52, (4, 1): 52, (4, 2): 52}  # layer 4: streams only
        base = served_plan(model, windows, sinks=3)
        return quantized(base, "K4cV2", "K8V4", "K2V2", streams="K4cV4")
    base = served_plan(model, {(1, 0): 4, (3, 2): 2, (4, 1): 7}, sinks=3) if kernels else mixed_plan(model, 3, 5)
    return quantized(base, "K4cV2", "K8V4", "K2V2")


@pytest.fixture(params=[(False, False), (True, False), (False, True), (True, True), (False, "streams"),
                        (True, "streams")],
                ids=["reference", "triton", "quantized-reference", "quantized-triton", "quantized-streams-reference",
                     "quantized-streams-triton"])
def planned(request):
    """A mixed plan (full, follower and streaming heads in one layer), or a quantized plan (`quantized_plan`, with
    quantized streaming heads for "quantized-streams"), applied with the PyTorch reference or with the Triton
    kernels (the CPU interpreter here: TRITON_INTERPRET=1, set in conftest)."""
    kernels, bits = request.param
    model = tiny_llama(layers=5, heads=6, kv_heads=3, head_dim=16)
    plan = quantized_plan(model, kernels, bits == "streams") if bits else mixed_plan(model, sinks=3, window=5)
    plan.apply(model, kernels=kernels)
    yield model, plan
    remove_plan(model)


@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("mode", ["scores", "keys"])
def test_static_cache_generates_what_the_growing_cache_does(mode, kernels):
    """Against the growing cache on the reference path; the static cache on the reference path, or through the
    Triton decode kernel with the slot count on the device."""
    model = tiny_llama(layers=5, heads=6, kv_heads=3, head_dim=16)
    plan = mixed_plan(model, sinks=3, window=5, mode=mode)
    torch.manual_seed(0)
    x = torch.randint(3, 90, (2, 30))
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # left padding: row 1's sinks are its first real tokens
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
              output_logits=True)
    with pytest.warns(UserWarning) if mode == "keys" else _nothing():
        plan.apply(model, kernels=False)
    growing = model.generate(x, past_key_values=plan.new_cache(model), **kw)
    with pytest.warns(UserWarning) if mode == "keys" else _nothing():
        plan.apply(model, kernels=kernels)
    static_cache = plan.new_cache(model, max_length=64)
    static = model.generate(x, past_key_values=static_cache, **kw)
    remove_plan(model)
    assert isinstance(static_cache, StaticPoDCache) and int(static_cache.get_seq_length()) == 41
    assert torch.equal(growing.sequences, static.sequences)
    for a, b in zip(growing.logits, static.logits):  # 12 steps past every window: rings have wrapped
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("kernels, streams", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["reference", "triton", "quantized-streams-reference", "quantized-streams-triton"])
def test_static_quantized_cache_generates_what_the_growing_cache_does(kernels, streams):
    """Packed slots in a static cache: decode steps quantize each group as it leaves the residual, on the device,
    at the growing cache's boundaries; 40 steps with left padding cross several groups. The same tokens and logits
    as the growing quantized cache, and not those of the 16-bit plan (quantization really ran). Quantized streaming
    heads: packed groups in a ring in the static cache, dropped from the front in the growing one."""
    model = tiny_llama(layers=5, heads=6, kv_heads=3, head_dim=16)
    plan = quantized_plan(model, kernels, streams)
    torch.manual_seed(0)
    x = torch.randint(3, 90, (2, 30))
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    steps = 24 if kernels else 40  # the Triton interpreter is slow; 24 steps still quantize three groups
    kw = dict(attention_mask=mask, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
              output_logits=True)
    outputs = {}
    for name, run_plan, options in (("16-bit", plan.with_options(precision=None), {}), ("growing", plan, {}),
                                    ("static", plan, dict(max_length=80))):
        run_plan.apply(model, kernels=kernels if name == "static" else False)
        cache = run_plan.new_cache(model, **options)
        outputs[name] = model.generate(x, past_key_values=cache, **kw)
        remove_plan(model)
    assert isinstance(cache, StaticPoDCache) and isinstance(cache.layers[0], StaticQuantizedPoDLayer)
    growing, static = outputs["growing"], outputs["static"]
    assert torch.equal(growing.sequences, static.sequences)
    assert max((a - b).abs().max() for a, b in zip(growing.logits, static.logits)) < 1e-5
    assert max((a - b).abs().max() for a, b in zip(growing.logits, outputs["16-bit"].logits)) > 1e-4


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _prefill(model, plan, batch=2, prompt=30, max_length=64):
    torch.manual_seed(1)
    x = torch.randint(3, 90, (batch, prompt))
    cache = plan.new_cache(model, max_length=max_length)
    with torch.no_grad():
        out = model(x, past_key_values=cache, use_cache=True)
    return cache, out.logits[:, -1:].argmax(-1)


def _step(model, cache):
    def step(token, pos):
        return model.forward(input_ids=token, past_key_values=cache, cache_position=pos,
                             position_ids=pos[None].expand(token.shape[0], 1), use_cache=True, logits_to_keep=1).logits
    return step


def test_decode_step_compiles_with_no_graph_break_and_matches_eager(planned):
    model, plan = planned
    cache, token = _prefill(model, plan)
    eager_cache, _ = _prefill(model, plan)
    torch._dynamo.reset()
    with torch.no_grad():
        explain = torch._dynamo.explain(_step(model, cache))(token, torch.tensor([30]))
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    cache, token = _prefill(model, plan)  # explain ran one step: start again
    torch._dynamo.reset()
    compiled = torch.compile(_step(model, cache), fullgraph=True, backend="eager")
    eager = _step(model, eager_cache)
    eager_token = token
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        steps = 6 if model._ilc_applied.kernels else 12  # the Triton interpreter is slow; 6 still wraps every ring
        for pos in range(30, 30 + steps):  # one graph for every step: positions are device tensors
            got = compiled(token, torch.tensor([pos]))
            want = eager(eager_token, torch.tensor([pos]))
            assert (got - want).abs().max() < 1e-5
            token = eager_token = want.argmax(-1)


FORBIDDEN = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def test_decode_step_reads_nothing_on_the_host(planned, monkeypatch):
    """No .item(), .tolist(), .cpu(), bool(), int() on any tensor in a decode step (on a GPU each is a sync)."""
    model, plan = planned
    cache, token = _prefill(model, plan)
    step = _step(model, cache)
    pos = torch.tensor([30])
    calls = []

    def forbid(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            calls.append(name)
            return original(self, *a, **k)
        return wrapper

    with torch.no_grad():
        for name in FORBIDDEN:
            monkeypatch.setattr(torch.Tensor, name, forbid(name))
        step(token, pos)
        monkeypatch.undo()
    assert calls == [], f"host reads in a decode step: {calls}"
    cache, token = _prefill(model, plan)
    with torch.no_grad():  # the check itself catches a host read (guards the test against a silent patch)
        for name in FORBIDDEN:
            monkeypatch.setattr(torch.Tensor, name, forbid(name))
        int(cache.get_seq_length())
        monkeypatch.undo()
    assert calls == ["__int__"]


def test_static_cache_holds_the_plans_bytes_for_max_length(planned):
    """Preallocated once, no growth slack; what the tokens seen need (`used`) is the formula's bytes. A quantized
    side keeps in its ring the group being quantized beside the residual: one group of 16-bit slots more than
    `kv_bytes` counts at a length where the groups fill up."""
    model, plan = planned
    length = 3 + 8 + 8 * 10  # sinks + residual + whole groups (quantized plans: residual 8, groups of 8)
    cache, _ = _prefill(model, plan, max_length=length)
    assert cache_report(cache).used == plan.kv_bytes(30, batch=2, dtype_bytes=4)[1]  # the 30 prompt tokens' layout
    cache.release_prompt()  # the prompt's 16-bit copy (a quantized layer's `fresh`), as the first decode step does
    _, planned_bytes = plan.kv_bytes(length, batch=2, dtype_bytes=4)
    ring_group = 2 * 8 * 16 * 4  # batch x group x head_dim x fp32
    sides = sum(len(positions) for layer in cache.layers for slots in getattr(layer, "_slots", list)()
                for positions, part in slots.groups if part.spec is not None)
    streams = [g for layer in cache.layers for g in layer.stream_groups if g.quantized]
    if not streams:
        assert cache.nbytes() == planned_bytes + sides * ring_group
    else:  # a quantized streaming head holds a ring of whole groups for its window: less than its 16-bit ring
        assert planned_bytes < cache.nbytes()
        for g in streams:
            held = sum(t.numel() * t.element_size() for t in g.tensors())
            sixteen = 2 * 2 * len(g.heads) * (3 + g.window) * 16 * 4  # K and V, batch 2: sinks + window, fp32
            assert held < 0.8 * sixteen
    assert (sides > 0) == plan.quantized
    with pytest.raises(PlanError, match=f"holds {length} tokens"):
        with torch.no_grad():
            model(torch.randint(3, 90, (2, 70)), past_key_values=cache)


def test_static_cache_refuses_what_it_cannot_run(planned):
    model, plan = planned
    with pytest.raises(PlanError, match="token selection"):
        plan.with_options(selection=Selection(keep=0.5, window=8)).new_cache(max_length=64)
    with pytest.raises(PlanError, match="compute skip"):
        plan.new_cache(max_length=64, skip_threshold=0.5)
    with pytest.raises(PlanError, match="exceeds the model's context"):
        plan.new_cache(max_length=10**6)
    with pytest.raises(PlanError, match="max_length"):
        plan.new_cache(max_length=0)
