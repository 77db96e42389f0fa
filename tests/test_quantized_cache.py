"""Quantized heads in the growing cache: packed slots, bytes as the plan counts them, outputs near the 16-bit plan."""

import pytest
import torch
import yaml

from ilc.runtime import Plan, PlanError, cache_report, load_plan, plan_from_dict, remove_plan
from ilc.runtime.plan import blocks_from_layers, streaming_block
from ilc.runtime.bits import HeadPrecision, Precision, QuantSpec, vector_bytes, window_packed_tokens
from ilc.runtime.quant import dequantize, quantize
from ilc.runtime.selection import Selection
from ilc.runtime.slots import HeadSlots, Slots, StaticSlots

from conftest import make_plan, mixed_plan, quantized, served_plan, tiny_llama


@pytest.mark.parametrize("spec", [QuantSpec(4, 8), QuantSpec(2, 8, "channel"), QuantSpec(8, 16)])
def test_slots_keep_sinks_and_residual_exact_and_pack_the_rest(spec):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 150, 16)
    slots = Slots(spec, residual=20, prefix=4, like=x[:, :, :0])
    for lo, hi in ((0, 3), (3, 90), (90, 91), (91, 150)):  # a prompt in pieces, then decode-sized steps
        slots.append(x[:, :, lo:hi])
    got = slots.read()
    packed = (150 - 4 - 20) // spec.group * spec.group
    assert slots.packed == packed > 0 and got.shape == x.shape
    assert torch.equal(got[:, :, :4], x[:, :, :4]) and torch.equal(got[:, :, 4 + packed:], x[:, :, 4 + packed:])
    middle = x[:, :, 4:4 + packed]
    assert torch.allclose(got[:, :, 4:4 + packed], dequantize(quantize(middle, spec)), atol=1e-6)
    assert (got[:, :, 4:4 + packed] - middle).abs().max() > 0  # really quantized
    assert slots.used_bytes() == 2 * 3 * vector_bytes(spec, 150, 16, 4, 20, dtype_bytes=4)
    assert slots.nbytes() < x.numel() * 4  # packed integers held, not floats


def test_head_slots_mix_precisions_in_head_order():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 100, 16)
    slots = HeadSlots([QuantSpec(8, 8), None, QuantSpec(2, 8)], residual=8, prefix=2, like=x[:, :, :0])
    slots.append(x)
    got = slots.read()
    assert torch.equal(got[:, 1], x[:, 1])
    err = [(got[:, h] - x[:, h]).abs().max() for h in (0, 2)]
    assert 0 < err[0] < err[1]


def test_quantized_plan_generates_near_the_16_bit_plan_and_holds_fewer_bytes():
    model = tiny_llama(layers=4, heads=4, kv_heads=2, head_dim=16, init_range=0.05)
    x = torch.randint(3, 97, (1, 120), generator=torch.Generator().manual_seed(0))
    base = make_plan(model, [[0, 1], [2], [3]], sinks=2, window=6)
    logits, used = {}, {}
    for name in ("K16V16", "K8V8", "K4cV4", "K2V2"):
        plan = base if name == "K16V16" else quantized(base, name)
        plan.apply(model)
        with torch.no_grad():
            out = model(x, use_cache=True)
            cache = out.past_key_values
            step = model(x[:, -1:], past_key_values=cache).logits[:, -1]  # a decode step reads packed slots
        logits[name] = (out.logits[0], step[0])
        report = cache_report(cache)
        used[name] = report.used
        assert report.used == plan.kv_bytes(121, dtype_bytes=4)[1]
        remove_plan(model)
    for n in ("K8V8", "K4cV4", "K2V2"):  # a prompt attends to itself at 16 bits (KIVI's prefill), stored packed
        assert torch.allclose(logits[n][0], logits["K16V16"][0], atol=1e-5)
    err = {n: (logits[n][1] - logits["K16V16"][1]).abs().max().item() for n in ("K8V8", "K4cV4", "K2V2")}
    assert 0 < err["K8V8"] < err["K2V2"] and err["K8V8"] < 1e-2
    assert used["K2V2"] < used["K4cV4"] < used["K8V8"] < used["K16V16"]


def test_quantized_mixed_plan_with_selection_and_padding_runs_and_counts_bytes():
    """Followers' values, a token selection (quantized once it has compacted) and left padding together."""
    model = tiny_llama(layers=5, heads=6, kv_heads=3, head_dim=16)
    plan = mixed_plan(model, sinks=2, window=6, windows=(3, 8, 20))
    plan = quantized(plan.with_options(selection=Selection(keep=0.5, window=8, pool=3)), "K4V4")
    x = torch.randint(3, 97, (2, 90), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    mask[1, :7] = 0
    plan.apply(model)
    out = model.generate(x, attention_mask=mask, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    report = cache_report(out.past_key_values)
    assert out.sequences.shape == (2, 95) and 0 < report.used < report.held < report.dense
    remove_plan(model)


def test_precision_round_trips_and_old_plans_load_unchanged(tmp_path):
    old = load_plan("plans/smollm2-135m.yaml")
    assert old.precision is None and not old.quantized
    plan = quantized(old, "K4cV2", residual=128, group=32)
    path = plan.save(tmp_path / "q.yaml")
    again = load_plan(path)
    assert again == plan and again.estimated_saving(4096) > old.estimated_saving(4096) + 0.2


@pytest.mark.parametrize("change, message", [
    (lambda d: d["precision"].update(all_heads=["K3V3"] * 4), "not a precision"),
    (lambda d: d["precision"].update(all_heads=["K8V8"] * 3), "KV heads of 4 layers"),
    (lambda d: d["precision"].update(wat=1), "unknown key"),
    (lambda d: d.update(format="ilc-plan/1"), "not part of format ilc-plan/1"),
])
def test_bad_precision_sections_are_refused(change, message):
    model = tiny_llama(head_dim=16)
    d = yaml.safe_load(quantized(make_plan(model, [[0], [1], [2], [3]]), "K8V8").to_yaml())
    change(d)
    with pytest.raises(PlanError, match=message):
        plan_from_dict(d)


def test_quantized_streaming_head_and_follower_keys_are_refused():
    model = tiny_llama(layers=5, heads=6, kv_heads=3, head_dim=16)
    plan = mixed_plan(model)
    d = yaml.safe_load(quantized(plan, "K8V8").to_yaml())
    d["precision"]["per_head"][0] = ["K8V8"] * 5  # head 0: layers 3, 4 stream; layers 1, 2 follow
    with pytest.raises(PlanError, match="follower|streaming"):
        plan_from_dict(d)


def test_kernels_refuse_quantized_anchors_with_followers_growing_or_static():
    model = tiny_llama(head_dim=16)
    plan = quantized(make_plan(model, [[0, 1], [2, 3]]), "K8V8")
    for options in ({}, dict(max_length=64)):
        with pytest.raises(PlanError, match="followers of quantized anchors"):
            plan.new_cache(model, kernels=True, **options)
    assert plan.new_cache(model, max_length=64).max_length == 64  # the reference path serves them


@pytest.mark.parametrize("streams", [False, True], ids=["16-bit-streams", "quantized-streams"])
def test_quantized_decode_through_the_kernels_matches_the_reference(monkeypatch, streams):
    """kernels=True (Triton's interpreter on CPU): a quantized plan of full and streaming heads decodes through
    the quantized kernel and the streaming kernel with the reference's tokens and logits; quantized streaming heads
    (windows 40 and 48 over 74 tokens: packed groups dropped) through the quantized kernel, sinks included."""
    import ilc.runtime.kernel_dispatch as dispatch

    model = tiny_llama(layers=3, heads=4, kv_heads=2, head_dim=16, init_range=0.05)
    heads = (tuple(blocks_from_layers([[0], [1]])) + (streaming_block(2, 48 if streams else 8),),
             (streaming_block(0, 40 if streams else 4),) + tuple(blocks_from_layers([[1], [2]])))
    plan = quantized(Plan(model=make_plan(model, [[0], [1], [2]]).model, sinks=2, window=4, blocks=heads), "K4cV2",
                     streams="K4cV4" if streams else None)
    assert plan.precision.of(0, 1).quantized == streams
    x = torch.randint(3, 97, (2, 70), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    launches = []
    kernel = dispatch.ops.quantized_decode_attention
    monkeypatch.setattr(dispatch.ops, "quantized_decode_attention",
                        lambda *a, **k: launches.append(1) or kernel(*a, **k))
    runs = {}
    for kernels in (False, True):
        plan.apply(model, kernels=kernels)
        out = model.generate(x, attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        runs[kernels] = (out.sequences, torch.stack(out.logits))
        remove_plan(model)
    assert len(launches) == 3 * (3 + 2 * streams)  # 3 decode steps x (3 layers with full heads + quantized streams)
    assert torch.equal(runs[True][0], runs[False][0])
    assert (runs[True][1] - runs[False][1]).abs().max() < 1e-3


def test_a_precision_section_has_one_group_size():
    with pytest.raises(ValueError, match="one group size"):
        Precision(((HeadPrecision(8, 8, group=8), HeadPrecision(8, 8, group=16)),))
    assert Precision(((HeadPrecision(4, 4, group=16),),)).group == 16


@pytest.mark.parametrize("spec", [QuantSpec(4, 8), QuantSpec(2, 8, "channel")])
def test_windowed_slots_hold_the_windows_groups_as_unwindowed_slots_store_them(spec):
    """A quantized streaming head's storage: the same packed and 16-bit slots as storage without a window, from
    the first group still holding a window token on (growing: rows shifted down; static: a ring of groups)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 150, 16)
    window, residual = 40, 12
    plain = Slots(spec, residual, 0, x[:, :, :0])
    growing = Slots(spec, residual, 0, x[:, :, :0], window=window)
    static = StaticSlots(spec, residual, 0, x[:, :, :0], 150, window=window)
    position = torch.tensor(0)
    for lo, hi in ((0, 70), (70, 71), (71, 97)) + tuple((t, t + 1) for t in range(97, 150)):
        for slots in (plain, growing):
            slots.append(x[:, :, lo:hi])
        if hi - lo > 1:
            static.write(lo, x[:, :, lo:hi])
        else:
            static.write_step(x[:, :, lo:hi], position.fill_(lo))
        want = plain.read()
        first, got = growing.window_slots()
        dropped, kept = window_packed_tokens(hi, residual, spec.group, window)
        assert first == dropped and hi - first < window + spec.group + residual and torch.equal(got, want[:, :, first:])
        assert growing.used_bytes() == 2 * 3 * (spec.stored_bytes(kept, 16) + (hi - dropped - kept) * 16 * 4)
        if hi - lo > 1:  # a prompt: read eagerly, in slot order
            static_first, vectors = static.window_slots()
            assert static_first <= first
            assert torch.allclose(vectors[:, :, first - static_first:], want[:, :, first:], atol=1e-6)
            continue
        vectors, slot = static.window_read(position)
        held = slot >= first
        assert torch.equal(slot[held].sort().values, torch.arange(first, hi))
        order = slot[held].argsort()
        assert torch.allclose(vectors[:, :, held][:, :, order], want[:, :, first:], atol=1e-6)
    assert growing.data.shape[2] < 2 * (window + spec.group)  # dropped rows are given back, not kept behind a view


def test_quantized_streaming_heads_hold_the_plans_bytes_and_stay_near_16_bits():
    model = tiny_llama(layers=4, heads=4, kv_heads=2, head_dim=16, init_range=0.05)
    base = served_plan(model, {(1, 0): 40, (2, 1): 64, (3, 0): 6})
    x = torch.randint(3, 97, (1, 160), generator=torch.Generator().manual_seed(0))
    used, steps = {}, {}
    for name, plan in (("16-bit", quantized(base, "K8V8")), ("K4cV4", quantized(base, "K8V8", streams="K4cV4")),
                       ("K2V2", quantized(base, "K8V8", streams="K2V2"))):
        plan.apply(model)
        with torch.no_grad():
            cache = model(x, use_cache=True).past_key_values
            steps[name] = torch.stack([model(x[:, t:t + 1], past_key_values=cache).logits[0, -1] for t in range(8)])
        used[name] = cache_report(cache).used
        assert used[name] == plan.kv_bytes(168, dtype_bytes=4)[1]
        remove_plan(model)
    err = {n: (steps[n] - steps["16-bit"]).abs().max().item() for n in ("K4cV4", "K2V2")}
    assert 0 < err["K4cV4"] < err["K2V2"] < 0.5
    assert used["K2V2"] < used["K4cV4"] < used["16-bit"]


def test_quantized_streaming_heads_are_checked_and_round_trip(tmp_path):
    model = tiny_llama(layers=4, heads=4, kv_heads=2, head_dim=16)
    plan = quantized(served_plan(model, {(1, 0): 40, (3, 1): 6}), "K8V8", streams="K4cV2")
    assert plan.precision.of(1, 0).name == "K4cV2" and plan.precision.of(3, 1).name == "K16V16"
    assert load_plan(plan.save(tmp_path / "s.yaml")) == plan
    for name, window, message in (("K4cV2", 39, "too little to quantize"), ("K16V4", 40, "keys and values both")):
        d = yaml.safe_load(plan.to_yaml())
        d["sharing"]["blocks"]["per_head"][0][1]["window"] = window
        d["precision"]["per_head"][0][1] = name
        with pytest.raises(PlanError, match=message):
            plan_from_dict(d)
