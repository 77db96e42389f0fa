"""The vLLM plugin, in vLLM itself (runs in .venv-vllm: `make test-vllm`; the main suite does not collect it).

A tiny random Llama saved as a Hugging Face directory is served with a full + streaming plan; greedy ids must
equal ilc's Hugging Face runtime with the same plan, token for token. The block manager frees exactly the blocks
between the sink blocks and the window. Bad plans and models fail before or at startup, in one line.
"""

from __future__ import annotations

import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process: its errors and block pool are ours
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

import pytest  # noqa: E402
import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.v1.core.block_pool import BlockPool  # noqa: E402

from conftest import make_plan, served_plan, tiny_llama  # noqa: E402
from ilc.runtime.plan import PlanError  # noqa: E402
from ilc.runtime.vllm.attention import sink_window_attention, visible_positions  # noqa: E402
from ilc.runtime.vllm.model import ARCHITECTURE, PLAN_KEY  # noqa: E402
from ilc.runtime.vllm.plugin import engine_args, register  # noqa: E402
from ilc.runtime.vllm.spec import SinkWindowManager, SinkWindowSpec  # noqa: E402

ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=4, skip_tokenizer_init=True)
STREAMING = {(0, 0): 24, (1, 1): 40, (2, 0): 24, (2, 1): 24, (3, 1): 64}  # (layer, KV head): window


def tiny_model():
    """A random Llama vLLM's CPU attention runs (head_dim 32), peaked enough that the plan changes outputs."""
    return tiny_llama(layers=4, heads=4, kv_heads=2, head_dim=32, vocab=211, max_pos=512, init_range=0.3)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model directory, plan path, HF model) for the tiny model."""
    register()
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_model()
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(folder / "model")
    plan = served_plan(model, STREAMING, sinks=4).save(folder / "plan.yaml")
    return folder / "model", plan, model


PROMPTS = [torch.randint(3, 211, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (150, 301, 77)]


def hf_greedy(model, prompt, new_tokens):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def vllm_greedy(llm, prompts, new_tokens):
    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    return [list(r.outputs[0].token_ids) for r in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                                use_tqdm=False)]


def test_plan_in_vllm_matches_the_ilc_runtime_token_for_token(served):
    directory, plan_path, model = served
    llm = LLM(**engine_args(plan_path, directory, **ENGINE, block_size=32, max_num_batched_tokens=128))
    got = vllm_greedy(llm, PROMPTS, 12)  # a batch, prefilled in 128-token chunks
    dense = [hf_greedy(model, p, 12) for p in PROMPTS]
    from ilc.runtime import load_plan, remove_plan

    load_plan(plan_path).apply(model)
    try:
        want = [hf_greedy(model, p, 12) for p in PROMPTS]
    finally:
        remove_plan(model)
    assert got == want
    assert got != dense  # the plan changes what the model says: the streaming heads really run
    del llm


def test_dense_vllm_matches_transformers(served):
    directory, _, model = served
    llm = LLM(model=str(directory), **ENGINE, block_size=32)
    assert vllm_greedy(llm, PROMPTS, 12) == [hf_greedy(model, p, 12) for p in PROMPTS]
    del llm


def test_sink_window_attention_is_ilc_rule():
    """Every query sees keys j <= i with j < sinks or j > i - window; compared with a dense masked softmax."""
    torch.manual_seed(0)
    n, sinks, window = 70, 4, 9
    q, k, v = torch.randn(n, 4, 32), torch.randn(n, 2, 32), torch.randn(n, 2, 32)
    first = 50
    pos = visible_positions(n, first, sinks, window)
    assert pos.tolist() == [0, 1, 2, 3] + list(range(42, 70))
    got = sink_window_attention(q[first:], k[pos], v[pos], torch.arange(first, n), pos, sinks, window, 0.2)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    mask = (j <= i) & ((j < sinks) | (j > i - window))
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) * 0.2
    want = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), vv)[first:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_manager_frees_the_blocks_between_sinks_and_window():
    spec = SinkWindowSpec(block_size=4, num_kv_heads=1, head_size=32, dtype=torch.float32, sliding_window=10,
                          sinks=5)
    pool = BlockPool(num_gpu_blocks=64, enable_caching=False, hash_block_size=4)
    manager = SinkWindowManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0,
                                scheduler_block_size=4)
    manager.allocate_new_blocks("r", 40, 40)  # 10 blocks for 40 tokens
    free = pool.get_num_free_blocks()
    manager.remove_skipped_blocks("r", 40)  # next query at 40 reads [0, 5) and [31, 40]
    kept = [b is not pool.null_block for b in manager.req_to_blocks["r"]]
    assert kept == [True, True, False, False, False, False, False, True, True, True]  # sink blocks 0-1, window 7-9
    assert pool.get_num_free_blocks() == free + 5
    manager.allocate_new_blocks("r", 44, 44)
    manager.remove_skipped_blocks("r", 44)  # window [35, 44]: block 7 (28..31) goes too
    assert [b is not pool.null_block for b in manager.req_to_blocks["r"]][:9] == [True, True] + [False] * 6 + [True]


def test_follower_plan_is_refused_in_one_line(served, tmp_path):
    directory, _, model = served
    path = make_plan(model, [[0, 1], [2, 3]]).save(tmp_path / "pod.yaml")
    with pytest.raises(PlanError, match=r"pod.yaml: \d+ follower heads") as err:
        engine_args(path, directory)
    assert "\n" not in str(err.value)


def test_plan_for_another_model_is_refused_in_one_line(served, tmp_path):
    directory, _, _ = served
    other = served_plan(tiny_llama(layers=4, heads=4, kv_heads=2, head_dim=32, vocab=300, init_range=0.3),
                        STREAMING, sinks=4)
    path = other.save(tmp_path / "other.yaml")
    with pytest.raises(PlanError, match="does not fit .*config fingerprint") as err:
        engine_args(path, directory)
    assert "\n" not in str(err.value)


def test_model_without_its_plan_fails_at_startup(served):
    directory, _, _ = served
    with pytest.raises(Exception, match=f"{ARCHITECTURE} needs a plan"):
        LLM(model=str(directory), hf_overrides={"architectures": [ARCHITECTURE]}, enable_prefix_caching=False,
            **ENGINE)


def test_other_weights_fail_at_startup(served, tmp_path):
    directory, plan_path, _ = served
    other = tiny_model()
    with torch.no_grad():
        other.model.embed_tokens.weight.mul_(2)
    other.config.architectures = ["LlamaForCausalLM"]
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(Exception, match="calibrated on other weights"):
        LLM(**engine_args(plan_path, tmp_path / "other", **ENGINE))


def test_prefix_caching_is_refused(served):
    directory, plan_path, _ = served
    with pytest.raises(Exception, match="prefix caching"):
        LLM(**engine_args(plan_path, directory, **ENGINE, enable_prefix_caching=True))


def test_plan_path_reaches_the_model_through_the_config(served):
    directory, plan_path, _ = served
    args = engine_args(plan_path, directory)
    assert args["hf_overrides"] == {"architectures": [ARCHITECTURE], PLAN_KEY: str(plan_path.resolve())}
    assert args["enable_prefix_caching"] is False


def test_tensor_parallel_2_splits_every_head_group_and_matches_the_runtime(tmp_path):
    """Two CPU ranks, each with one full and one streaming head per layer: the same ids as ilc's HF runtime."""
    model = tiny_llama(layers=2, heads=8, kv_heads=4, head_dim=32, vocab=211, init_range=0.3)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(tmp_path / "model")
    plan = served_plan(model, {(0, 0): 16, (0, 3): 16, (1, 1): 32, (1, 2): 32}, sinks=4)
    plan_path = plan.save(tmp_path / "plan.yaml")
    llm = LLM(**engine_args(plan_path, tmp_path / "model", tensor_parallel_size=2, **ENGINE,
                            distributed_executor_backend="mp"))
    got = vllm_greedy(llm, PROMPTS[:2], 10)
    del llm
    from ilc.runtime import load_plan, remove_plan

    load_plan(plan_path).apply(model)
    try:
        assert got == [hf_greedy(model, p, 10) for p in PROMPTS[:2]]
    finally:
        remove_plan(model)
