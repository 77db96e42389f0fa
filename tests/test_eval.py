"""`ilc eval` end to end on a tiny random Llama: every method runs, bytes are measured, runs resume."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from ilc.eval.baselines import equal_memory_window, uniform_plan
from ilc.eval.config import EvalConfig, build_samples
from ilc.eval.methods import METHODS
from ilc.eval.report import plot_niah, summarize
from ilc.eval.run import run, run_perplexity
from ilc.models import converted_copy, resolve

from conftest import make_plan, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(converted_copy(resolve("smollm2-135m")))


def test_every_method_runs_measures_bytes_and_resumes(tokenizer, tmp_path):
    model = tiny_llama(layers=4, heads=4, kv_heads=2, vocab=len(tokenizer), max_pos=1024)
    plan = make_plan(model, [[0, 1], [2, 3]], sinks=4, window=64)
    samples = build_samples(["niah", "qa"], tokenizer, EvalConfig(lengths=(384,), depths=(0.25,),
                                                                  ruler_depths=(0.5,)), None)
    methods = list(METHODS)
    records = run(model, tokenizer, plan, methods, samples, tmp_path, max_new_tokens=4, progress=False)
    assert len(records) == len(methods) * 2
    assert all(0.0 <= r["score"] <= 1.0 and r["tokens"] > 300 for r in records)
    by = {(r["method"], r["task"]): r for r in records}
    full, pod, stream = by[("full", "niah")], by[("plan", "niah")], by[("streaming", "niah")]
    assert full["kv_bytes"] == full["dense_bytes"]
    assert pod["kv_bytes"] < full["kv_bytes"] and stream["kv_bytes"] < pod["kv_bytes"]
    # StreamingLLM at equal memory holds the plan's layout bytes (its window was sized for that; the PoD cache
    # holds a little more: growth slack, at least 32 tokens per layer)
    equal = by[("streaming-equal", "niah")]
    layout = plan.kv_bytes(equal["tokens"])[1]  # records count floats at 2 bytes (the 16-bit cache served)
    assert abs(equal["kv_bytes"] - layout) / layout < 0.02 and layout <= pod["kv_bytes"]
    # quantization alone holds integers: fewer bytes with fewer bits, every head still full
    ints = [by[(f"int{bits}", "niah")]["kv_bytes"] for bits in (8, 4, 2)]
    assert full["kv_bytes"] > ints[0] > ints[1] > ints[2]
    # uniform blocks of 2 here equal the plan's blocks: same bytes
    assert by[("uniform-2", "niah")]["kv_bytes"] == pod["kv_bytes"]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    again = run(model, tokenizer, plan, methods, samples, tmp_path, max_new_tokens=4, progress=False)
    assert len(again) == len(records) and (tmp_path / "results.jsonl").read_text().splitlines() == lines
    assert json.loads(lines[0])["key"].startswith("full|niah|384")
    summary = summarize(records, methods)
    assert set(summary) == set(methods) and summary["full"]["kv_saved"] == 0.0
    assert summary["streaming"]["kv_saved"] > summary["plan"]["kv_saved"] > 0
    png = plot_niah(records, methods, tmp_path / "niah.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert model.config._attn_implementation == "sdpa"  # every method was removed again


def test_baseline_helpers(tiny):
    plan = make_plan(tiny, [[0, 1], [2, 3]], sinks=4, window=64)
    assert uniform_plan(plan, 3).blocks[0][0].layers == (0, 1, 2)
    window = equal_memory_window(plan, 1000)
    _, planned = plan.kv_tokens(1000)
    assert 2 * 4 * 2 * (4 + window) <= planned < 2 * 4 * 2 * (4 + window + 1)


def test_perplexity_by_position_per_method(tokenizer, tmp_path):
    model = tiny_llama(layers=4, heads=4, kv_heads=2, vocab=len(tokenizer), max_pos=1024)
    plan = make_plan(model, [[0, 1, 2, 3]], sinks=2, window=32)
    ids = tokenizer("It is a truth universally acknowledged. " * 60, return_tensors="pt").input_ids[:, :300]
    ppl = run_perplexity(model, plan, ["full", "plan", "streaming"], ids, tmp_path)
    assert list(ppl["full"]) == ["0-256", "256-299", "all"]
    # tokens whose context fits the window (the first 34) are identical; later ones differ under compression
    assert ppl["plan"]["all"] != ppl["full"]["all"] and ppl["streaming"]["all"] != ppl["full"]["all"]
    assert all(v > 1.0 for row in ppl.values() for v in row.values())
    assert (tmp_path / "perplexity.json").exists()


def test_resumed_records_must_match_their_settings(tokenizer, tmp_path):
    """A record is reused only if made with the same settings (plan, model, prompt, answer length); a line cut
    short by an interrupted write is skipped, never parsed as a result."""
    model = tiny_llama(layers=4, heads=4, kv_heads=2, vocab=len(tokenizer), max_pos=1024)
    plan = make_plan(model, [[0, 1], [2, 3]], sinks=4, window=64)
    samples = build_samples(["niah"], tokenizer, EvalConfig(lengths=(256,), depths=(0.5,)), None)
    first = run(model, tokenizer, plan, ["full", "plan"], samples, tmp_path, max_new_tokens=3, progress=False)
    path = tmp_path / "results.jsonl"
    with path.open("a") as f:
        f.write('{"key": "plan|niah|256|0.5|0", "score": 1.0, "sett')  # interrupted mid-write
    same = run(model, tokenizer, plan, ["full", "plan"], samples, tmp_path, max_new_tokens=3, progress=False)
    assert same == first and len(path.read_text().splitlines()) == 3
    other_plan = make_plan(model, [[0, 1, 2, 3]], sinks=4, window=64)
    again = run(model, tokenizer, other_plan, ["full", "plan"], samples, tmp_path, max_new_tokens=3, progress=False)
    assert again[0] == first[0], "the full model's record does not depend on the plan"
    assert again[1]["settings"]["plan"] != first[1]["settings"]["plan"]
    longer = run(model, tokenizer, plan, ["full"], samples, tmp_path, max_new_tokens=4, progress=False)
    assert longer[0]["settings"]["max_new_tokens"] == 4 and len(path.read_text().splitlines()) == 5
    assert len(run(model, tokenizer, plan, ["full", "plan"], samples, tmp_path, max_new_tokens=3,
                   progress=False)) == 2 and len(path.read_text().splitlines()) == 5  # all reused


def test_selection_method_holds_the_plans_bytes(tokenizer, tmp_path):
    """`selection-equal`: every head full with selection, sized to the plan's bytes; a selection plan's records
    hold fewer bytes than the same plan without selection."""
    from ilc.runtime.heads import Selection

    model = tiny_llama(layers=4, heads=4, kv_heads=2, vocab=len(tokenizer), max_pos=1024)
    plan = make_plan(model, [[0, 1], [2, 3]], sinks=4, window=32)
    selected = plan.with_options(selection=Selection(keep=0.2, window=32))
    samples = build_samples(["niah"], tokenizer, EvalConfig(lengths=(384,), depths=(0.5,)), None)
    plain = run(model, tokenizer, plan, ["plan"], samples, tmp_path / "a", max_new_tokens=3, progress=False)
    recs = run(model, tokenizer, selected, ["plan", "selection-equal"], samples, tmp_path / "b", max_new_tokens=3,
               progress=False)
    by = {r["method"]: r for r in recs}
    assert by["plan"]["kv_bytes"] < 0.7 * plain[0]["kv_bytes"]
    assert abs(by["selection-equal"]["kv_bytes"] - by["plan"]["kv_bytes"]) / by["plan"]["kv_bytes"] < 0.1


def test_prompts_file_and_peer_records_join_the_summary(tokenizer, tmp_path):
    """prompts.jsonl carries the exact tokens and the question's split points for the kvpress runner; records it
    writes in the eval's schema join the summary (other prompts' records are ignored)."""
    from ilc.eval.records import merge_peers, prompt_digest, read_peer_records, write_prompts

    samples = build_samples(["niah", "qa"], tokenizer, EvalConfig(lengths=(384,), depths=(0.5,), ruler_depths=(0.5,)),
                            None)
    write_prompts(samples, tmp_path, "/models/x")
    rows = [json.loads(x) for x in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "run.json").read_text())["model_dir"] == "/models/x"
    for row, sample in zip(rows, samples):
        ids = row["input_ids"]
        assert ids == sample.input_ids[0].tolist() and row["prompt"] == prompt_digest(sample)
        q, a = row["question_start"], row["answer_start"]
        assert 0 < q < a < len(ids)
        assert tokenizer.decode(ids[q:a]).strip() == sample.meta["question"]
        assert tokenizer.decode(ids[a:]).startswith("<|im_end|>")
    peer = lambda s, score: dict(key=f"kvpress-snapkv-50|x", method="kvpress-snapkv-50", task=s.task,  # noqa: E731
                                 length=s.length, depth=s.depth, seed=0, answers=list(s.answers), score=score,
                                 settings={"prompt": prompt_digest(s)}, kv_bytes=50, dense_bytes=100, tokens=384,
                                 prefill_s=1.0, decode_ms=5.0)
    lines = [peer(samples[0], 1.0), peer(samples[1], 0.0), {**peer(samples[0], 1.0), "settings": {"prompt": "other"}}]
    (tmp_path / "peers.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"cut sho')
    peers = read_peer_records(tmp_path / "peers.jsonl", samples)
    assert len(peers) == 2
    records, methods = merge_peers([], ["full"], peers)
    summary = summarize(records, methods)
    assert summary["kvpress-snapkv-50"]["niah"] == 100.0 and summary["kvpress-snapkv-50"]["kv_saved"] == 0.5


def test_chunked_perplexity_reads_the_stored_cache():
    """With a prompt, later positions read the cache as stored: a quantized plan's one-prefill perplexity equals
    the 16-bit plan's (a prompt attends to itself at 16 bits), its chunked perplexity does not; the dense model's
    chunked perplexity equals its one-prefill perplexity."""
    from ilc.eval.run import perplexity_by_position
    from ilc.runtime import remove_plan
    from ilc.runtime.bits import HeadPrecision, uniform_precision

    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, init_range=0.05)
    ids = torch.randint(3, 97, (1, 120), generator=torch.Generator().manual_seed(0))
    whole = perplexity_by_position(model, ids)
    assert max(abs(a - b) for a, b in zip(whole, perplexity_by_position(model, ids, prompt=40, chunk=16))) < 1e-4
    plan = make_plan(model, [[0], [1]], sinks=2, window=8)
    quantized = plan.with_options(precision=uniform_precision(plan.head_table(), HeadPrecision.parse("K2V2", 16), 8))
    runs = {}
    for name, p in (("16-bit", plan), ("2-bit", quantized)):
        p.apply(model)
        runs[name] = (perplexity_by_position(model, ids), perplexity_by_position(model, ids, prompt=40, chunk=16))
        remove_plan(model)
    assert max(abs(a - b) for a, b in zip(runs["16-bit"][0], runs["2-bit"][0])) < 1e-4
    assert max(abs(a - b) for a, b in zip(runs["16-bit"][1], runs["2-bit"][1])) > 1e-3


def test_kl_to_the_full_model_by_position_grows_as_bits_fall():
    """KL(full || method) per position, read as the chunked perplexity reads: zero for the model against itself,
    zero on the prompt (it attends to itself at 16 bits), above zero after it, larger at 2 bits than at 8."""
    from ilc.eval.run import by_bucket, kl_by_position, next_token_logits
    from ilc.runtime import remove_plan
    from ilc.runtime.bits import HeadPrecision, uniform_precision

    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, init_range=0.05)
    ids = torch.randint(3, 97, (1, 120), generator=torch.Generator().manual_seed(0))
    reference = next_token_logits(model, ids).log_softmax(-1)
    assert max(kl_by_position(model, ids, reference, prompt=40, chunk=16)) < 1e-5
    plan = make_plan(model, [[0], [1]], sinks=2, window=8)
    kl = {}
    for name in ("K8V8", "K2V2"):
        p = plan.with_options(precision=uniform_precision(plan.head_table(), HeadPrecision.parse(name, 16), 8))
        p.apply(model)
        kl[name] = kl_by_position(model, ids, reference, prompt=40, chunk=16)
        remove_plan(model)
        assert max(kl[name][:39]) < 1e-5 and sum(kl[name][40:]) > 0
    mean = lambda part: sum(part) / len(part)  # noqa: E731
    assert by_bucket(kl["K8V8"], mean)["all"] < by_bucket(kl["K2V2"], mean)["all"]
    assert list(by_bucket(kl["K2V2"], mean)) == ["0-119", "all"]
