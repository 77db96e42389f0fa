"""The embedded real model, SmolLM2-135M-Instruct: loading, a short calibration, and the committed plan."""

from pathlib import Path

import pytest
import torch

from ilc.calibrate import CalibrationSettings, calibrate
from ilc.data import default_corpus
from ilc.models import load_model, resolve
from ilc.eval.tasks import make_sample, score
from ilc.runtime import cache_report, load_plan, remove_plan

pytestmark = pytest.mark.slow
PLAN = Path(__file__).parent.parent / "plans" / "smollm2-135m.yaml"


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, source = load_model("smollm2-135m")
    return model, tokenizer, source


def test_converted_copy_gives_identical_logits(smollm2):
    from transformers import AutoModelForCausalLM

    model, tokenizer, _ = smollm2
    src = resolve("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32).eval()
    x = tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct(x).logits, model(x).logits)


def test_converted_directory_is_what_any_engine_loads(smollm2):
    """vLLM reads the embedding under its own name (a tied head saved only as lm_head gave token 0 forever), the
    architecture from the config, and stops at the chat model's end of turn."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from ilc.models import model_directory

    model, _, _ = smollm2
    folder = model_directory("smollm2-135m")
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), model.model.embed_tokens.weight)
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert config.architectures == ["LlamaForCausalLM"] and config.tie_word_embeddings
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == config.eos_token_id == 2
    assert GenerationConfig.from_pretrained(folder).eos_token_id == 2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # re-tied on load


def test_short_calibration_is_sane(smollm2):
    model, tokenizer, source = smollm2
    result = calibrate(CalibrationSettings(seq_len=512, samples=2, query_rows=16), model, tokenizer, source.name,
                       progress=False)
    plan = result.plan
    assert model.config._attn_implementation == "sdpa"  # calibration restored the attention implementation
    assert plan.model.num_layers == 30 and plan.model.num_kv_heads == 3 and plan.model.max_context == 8192
    # SmolLM2 puts ~30% of its attention on the first token: sinks are chosen, the window is capped at seq_len/4
    assert 4 <= plan.sinks <= 32 and 16 <= plan.window <= 128
    assert plan.distance_curve["sink_mass"][1] > 0.1
    sim = result.similarity
    assert sim.shape == (3, 30, 30) and ((sim >= 0) & (sim <= 1)).all()
    for h, blocks in enumerate(plan.blocks):
        for b in blocks:
            assert len(b.layers) <= 8 and all(sim[h, b.anchor, f] >= 0.9 for f in b.followers)
    # a realistic spread: some adjacent layers are alike, not all
    adjacent = [sim[h, a, a + 1] for h in range(3) for a in range(29)]
    assert min(adjacent) < 0.5 < max(adjacent)


def test_committed_plan_retrieves_a_4k_needle_and_saves_measured_bytes(smollm2):
    model, tokenizer, _ = smollm2
    plan = load_plan(PLAN)
    prompt = make_sample("niah", tokenizer, 4000, 0.5, seed=0, haystack=default_corpus())
    n = prompt.input_ids.shape[1]
    needle = prompt.meta["fact_starts"][0]
    assert 3900 < n <= 4000 and 0 <= needle < n - plan.window - plan.sinks  # the needle is distant
    found = lambda text: score(text, prompt.answers, prompt.rule) == 1.0  # noqa: E731
    gen = dict(attention_mask=torch.ones_like(prompt.input_ids), max_new_tokens=28, do_sample=False,
               pad_token_id=tokenizer.eos_token_id, return_dict_in_generate=True)
    remove_plan(model)
    dense = model.generate(prompt.input_ids, **gen)
    dense_text = tokenizer.decode(dense.sequences[0, n:], skip_special_tokens=True)
    assert found(dense_text), f"the full model itself misses the needle: {dense_text!r}"
    plan.apply(model)
    try:
        out = model.generate(prompt.input_ids, **gen)
    finally:
        remove_plan(model)
    text = tokenizer.decode(out.sequences[0, n:], skip_special_tokens=True)
    assert found(text), f"compressed model lost the needle: {text!r}"
    report = cache_report(out.past_key_values)
    tokens = report.tokens
    assert tokens == out.sequences.shape[1] - 1
    assert report.used == plan.kv_bytes(tokens, dtype_bytes=4)[1]  # fp32 on CPU
    estimate = plan.kv_bytes(tokens, dtype_bytes=4)[1]
    assert estimate <= report.held <= 1.02 * estimate
    assert report.held < report.dense


def test_adapt_runs_on_the_real_model_and_serves_what_it_trained(tmp_path):
    """`ilc adapt` end to end on SmolLM2 (two short steps of the committed PoD plan in keys mode, the embedded
    corpus): the adapted plan and its adapter load through the runtime and give the training forward's logits."""
    from ilc.adapt import AdaptConfig, adapt
    from ilc.runtime.sequence import SequenceForward

    model, tokenizer, _ = load_model("smollm2-135m")  # its own copy: adapt leaves LoRA layers in it
    plan = load_plan(PLAN.with_name("smollm2-135m-pod-30pct.yaml"))
    config = AdaptConfig(tokens=2 * 1024, seq_len=1024, lr=1e-3, mode="keys", checkpoint_every=1)
    result = adapt(model, tokenizer, plan, config, tmp_path / "run", progress=False)
    adapted = load_plan(tmp_path / "run" / "plan.yaml")
    assert adapted.mode == "keys" and adapted.adapted.steps == 2 and all(map(torch.isfinite, map(torch.tensor,
                                                                                                   result.losses)))
    ids = tokenizer("It is a truth universally acknowledged " * 120, return_tensors="pt").input_ids[:, :800]
    with torch.no_grad():
        trained = model(ids, ilc_sequence=SequenceForward.for_plan(adapted)).logits
    served_model, _, _ = load_model("smollm2-135m")
    adapted.apply(served_model, adapter=tmp_path / "run" / "adapter")
    with torch.no_grad():
        served = served_model(ids).logits
    torch.testing.assert_close(served, trained, atol=2e-4, rtol=1e-4)
