"""Triton kernels against the PyTorch reference, on CPU through TRITON_INTERPRET=1 (set in conftest)."""

import pytest
import torch

from ilc.kernels import pod_attention_triton
from ilc.runtime import PoDCache, reference_attention

from conftest import make_plan, tiny_llama

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


def test_bfloat16_inputs_accumulate_in_fp32():
    model = tiny_llama(layers=2, heads=4, kv_heads=2)
    plan = make_plan(model, [[0, 1]], sinks=2, window=5)
    err = run_layers(plan, "scores", torch.bfloat16, 64, None, chunks=[30, 1, 1])
    assert err < TOLERANCE[torch.bfloat16], err


def test_mqa_and_no_sinks():
    model = tiny_llama(layers=2, heads=4, kv_heads=1)
    plan = make_plan(model, [[0, 1]], sinks=0, window=4)
    err = run_layers(plan, "keys", torch.float32, 64, None, chunks=[25, 1, 1], hq=4, hkv=1)
    assert err < TOLERANCE[torch.float32], err


def test_generate_through_kernels_matches_reference():
    """The runtime picks the kernels end to end (prefill, decode, scores-mode logits reuse) with plain generate()."""
    model = tiny_llama(layers=4, heads=4, kv_heads=2, head_dim=64).to(DEVICE)
    plan = make_plan(model, None, sinks=2, window=6, per_head=[[[0, 1, 2], [3]], [[0], [1, 2, 3]]])
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
