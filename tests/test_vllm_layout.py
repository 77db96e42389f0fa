"""The vLLM plugin's layout (no vLLM needed): head groups per layer, the checkpoint permutation (an exact rewrite),
the tensor-parallel split, and the one-line refusals."""

import re

import pytest
import torch

from conftest import make_plan, served_plan, tiny_llama
from ilc.runtime.heads import HeadKind, Selection
from ilc.runtime.bits import HeadPrecision, uniform_precision
from ilc.runtime.vllm.layout import UnservablePlanError, describe, permute_checkpoint_tensor, serving_layout


def test_groups_are_full_heads_then_streaming_heads_by_window():
    model = tiny_llama(layers=2, heads=8, kv_heads=4)
    plan = served_plan(model, {(0, 0): 16, (0, 2): 8, (0, 3): 16, (1, 1): 8})
    layer0 = serving_layout(plan).layers[0]
    assert [(g.kind, g.window, g.kv_heads) for g in layer0.groups] == [
        (HeadKind.FULL, 0, (1,)), (HeadKind.STREAMING, 8, (2,)), (HeadKind.STREAMING, 16, (0, 3))]
    assert layer0.order == (1, 2, 0, 3)
    assert serving_layout(plan).layers[1].order == (0, 2, 3, 1)


def test_checkpoint_permutation_leaves_the_dense_model_unchanged():
    """Query heads move with their KV head and o_proj columns with their query heads: the same function."""
    model = tiny_llama(layers=2, heads=8, kv_heads=4)
    layout = serving_layout(served_plan(model, {(0, 0): 16, (0, 2): 8, (1, 1): 8, (1, 2): 8}))
    assert layout.layers[0].order != (0, 1, 2, 3) and layout.layers[1].order != (0, 1, 2, 3)
    permuted = tiny_llama(layers=2, heads=8, kv_heads=4, seed=1)
    state = {name: permute_checkpoint_tensor(layout, name, t) for name, t in model.state_dict().items()}
    changed = [n for n in state if not torch.equal(state[n], model.state_dict()[n])]
    assert sorted({n.split(".")[-2] for n in changed}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    permuted.load_state_dict(state)
    ids = torch.randint(3, 90, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(permuted(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_query_heads_follow_their_kv_head():
    model = tiny_llama(layers=1, heads=6, kv_heads=3)
    layout = serving_layout(served_plan(model, {(0, 0): 8}))
    assert layout.layers[0].order == (1, 2, 0)
    assert layout.query_order(0).tolist() == [2, 3, 4, 5, 0, 1]


def test_tensor_parallel_gives_each_rank_the_same_share_of_every_group():
    model = tiny_llama(layers=1, heads=8, kv_heads=4)
    layout = serving_layout(served_plan(model, {(0, 0): 8, (0, 3): 8}), tensor_parallel=2)
    assert layout.layers[0].order == (1, 0, 2, 3)  # rank 0: full 1, streaming 0; rank 1: full 2, streaming 3
    assert [(g.kind, n) for g, n in layout.layers[0].local_groups(2)] == [(HeadKind.FULL, 1), (HeadKind.STREAMING, 1)]


@pytest.mark.parametrize("streaming, tp, words", [
    ({(0, 0): 8}, 2, "layer 0 has 3 full KV heads"),
    ({(0, 0): 8, (0, 1): 16}, 2, "layer 0 has 1 streaming (window 8)"),
    ({}, 3, "4 KV heads do not split over tensor-parallel size 3"),
])
def test_a_split_that_cannot_be_even_is_refused_in_one_line(streaming, tp, words):
    model = tiny_llama(layers=1, heads=8, kv_heads=4)
    with pytest.raises(UnservablePlanError, match=re.escape(words)) as err:
        serving_layout(served_plan(model, streaming), tensor_parallel=tp, where="p.yaml")
    assert "\n" not in str(err.value) and str(err.value).startswith("p.yaml: ")


def test_followers_and_selection_are_refused_naming_the_kind():
    model = tiny_llama(layers=2, heads=4, kv_heads=2)
    with pytest.raises(UnservablePlanError, match=r"p.yaml: 4 follower heads.*--kinds streaming"):
        serving_layout(make_plan(tiny_llama(layers=3), [[0, 1, 2]]), where="p.yaml")
    selecting = served_plan(model, {(0, 0): 8}, selection=Selection(keep=0.5))
    with pytest.raises(UnservablePlanError, match="token selection"):
        serving_layout(selecting)
    quantized = served_plan(tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16), {(0, 0): 8})
    quantized = quantized.with_options(precision=uniform_precision(quantized.head_table(),
                                                                   HeadPrecision.parse("K8V8", group=16)))
    with pytest.raises(UnservablePlanError, match="quantized heads"):
        serving_layout(quantized)


def test_startup_line_names_kinds_and_bytes_per_token():
    model = tiny_llama(layers=2, heads=4, kv_heads=2)
    plan = served_plan(model, {(0, 0): 8, (1, 1): 16}, sinks=2)
    line = describe(plan, serving_layout(plan), 100)
    dense, planned = plan.kv_bytes(100)
    assert "2 full + 2 streaming" in line and "windows [8, 16]" in line
    assert f"{planned // 100} vs {dense // 100} dense" in line
