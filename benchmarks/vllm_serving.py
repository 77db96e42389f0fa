"""An ilc plan served by vLLM, against ilc's Hugging Face runtime and against dense vLLM. Runs in .venv-vllm.

check:    the eval's 20 prompts (NIAH at 2k/4k x 5 depths; the 5 RULER-style tasks at 2k/4k, depth 50%), greedy,
          32 new tokens: the plan through vLLM vs the same plan through ilc's HF runtime (token ids, needle found),
          and dense vLLM vs dense transformers.
capacity: dense vs plan, the same VLLM_CPU_KVCACHE_SPACE: vLLM's maximum concurrency for 4k-token requests, the
          blocks (and bytes) in use after admitting N of them, and the time of that batch.

Each engine runs in its own subprocess (a fresh vLLM per configuration). Results: a table on stdout and --out.

Run: .venv-vllm/bin/python benchmarks/vllm_serving.py --plan plans/smollm2-135m.yaml \
         --haystack ../shared/data/pg_essays --out docs/serving-results.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=4096 + 256, max_num_seqs=16)
NEW_TOKENS = 32
BATCH_NEW_TOKENS = 128  # capacity batch: long enough that the first request still decodes when the last is prefilled


def prompts(haystack: str | None) -> list[dict]:
    """The eval's prompts as token ids, with what scores them."""
    from ilc.data import read_documents
    from ilc.eval.config import headline_samples
    from ilc.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    docs = read_documents([haystack]) if haystack else None
    samples = headline_samples(tok, (2048, 4096), (0.0, 0.25, 0.5, 0.75, 1.0), (0,), docs)
    return [dict(task=s.task, length=s.length, depth=s.depth, ids=s.input_ids[0].tolist(), answers=list(s.answers),
                 rule=s.rule) for s in samples]


def hf_outputs(plan_path: str, samples: list[dict]) -> dict[str, list[list[int]]]:
    """Greedy ids of dense transformers and of ilc's HF runtime with the plan."""
    import torch

    from ilc.models import load_model
    from ilc.runtime import load_plan

    model, tok, _ = load_model("smollm2-135m", dtype=torch.float32)
    plan = load_plan(plan_path)
    out = {}
    for name in ("dense", "plan"):
        if name == "plan":
            plan.apply(model)
        ids = []
        for s in samples:
            x = torch.tensor([s["ids"]])
            y = model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)
            ids.append(_strip(y[0, x.shape[1]:].tolist(), tok.eos_token_id))
        out[name] = ids
    return out


def _strip(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos)] if eos in ids else ids


def engine(kind: str, plan_path: str, samples_file: str, mode: str, requests: int, batched: int) -> dict:
    """One vLLM engine (dense or the plan), in this process: outputs of the prompts, or capacity figures."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler in this process, to read its block pool
    from vllm import LLM, SamplingParams
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    from ilc.models import model_directory
    from ilc.runtime.vllm.plugin import SERVING_DEFAULTS, engine_args

    directory = model_directory("smollm2-135m")
    settings = {**SERVING_DEFAULTS, "max_num_batched_tokens": batched}
    args = (engine_args(plan_path, directory, **ENGINE, **settings) if kind == "plan"
            else dict(model=str(directory), enable_prefix_caching=False, **ENGINE, **settings))
    llm = LLM(**args)
    core = llm.llm_engine.engine_core.engine_core
    sched = core.scheduler
    samples = json.loads(Path(samples_file).read_text())
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    if mode == "outputs":
        res = llm.generate([{"prompt_token_ids": s["ids"]} for s in samples], greedy, use_tqdm=False)
        eos = llm.get_tokenizer().eos_token_id
        return dict(ids=[_strip(list(r.outputs[0].token_ids), eos) for r in res])
    config = sched.kv_cache_config
    pool = sched.kv_cache_manager.block_pool
    # every KVCacheTensor describes the same backing allocation (cache groups overlay it; a block has one owner)
    assert len({t.size for t in config.kv_cache_tensors}) == 1
    bytes_per_block = config.kv_cache_tensors[0].size / config.num_blocks
    prompts = [s["ids"] for s in samples if s["length"] == 4096][:requests]  # distinct 4k prompts
    assert len(prompts) == requests, f"{requests} requests need as many 4k prompts"
    engine_ = llm.llm_engine
    t0 = time.perf_counter()
    batch = SamplingParams(temperature=0, max_tokens=BATCH_NEW_TOKENS, min_tokens=BATCH_NEW_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine_.add_request(str(i), {"prompt_token_ids": prompt}, batch)
    used_after_admission, done, tokens = None, 0, 0
    while engine_.has_unfinished_requests():
        for out in engine_.step():
            if out.finished:
                done += 1
                tokens += len(out.outputs[0].token_ids)
        running = sched.running
        if used_after_admission is None and len(running) == requests and all(
                r.num_computed_tokens >= r.num_prompt_tokens for r in running):
            used_after_admission = pool.num_gpu_blocks - pool.get_num_free_blocks()
    seconds = time.perf_counter() - t0
    return dict(max_concurrency=get_max_concurrency_for_kv_cache_config(core.vllm_config, config),
                num_blocks=config.num_blocks, groups=len(config.kv_cache_groups), bytes_per_block=bytes_per_block,
                used_blocks=used_after_admission, seconds=seconds, requests=requests, generated=tokens,
                prompt_tokens=sum(map(len, prompts)), float_bytes=core.vllm_config.model_config.dtype.itemsize)


def run_engine(kind, plan, samples_file, mode, requests, batched) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "engine", kind, "--plan", plan, "--samples", samples_file, "--mode", mode,
           "--requests", str(requests), "--batched", str(batched), "--result", out]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if mode == "outputs" else None)
    return json.loads(Path(out).read_text())


def found(ids: list[int], sample: dict, tok) -> float:
    from ilc.eval.tasks import score

    return score(tok.decode(ids, skip_special_tokens=True), tuple(sample["answers"]), sample["rule"])


def main(args) -> None:
    from ilc.models import load_tokenizer
    from ilc.runtime import load_plan
    from ilc.runtime.vllm.plugin import SERVING_DEFAULTS

    plan = load_plan(args.plan)
    saving = plan.estimated_saving(4096)
    lines = [f"# vLLM serving: `{args.plan}` ({saving:.1%} of KV bytes saved at 4k by the plan's count)", "",
             f"Command: `VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE')} "
             f"VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS=2 .venv-vllm/bin/python {' '.join(sys.argv)}` "
             "(2 CPU cores, fp32)", ""]
    samples = prompts(args.haystack)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(samples, f)
        samples_file = f.name
    if "check" in args.parts:
        tok = load_tokenizer("smollm2-135m")
        hf = hf_outputs(args.plan, samples)
        vl = {kind: run_engine(kind, args.plan, samples_file, "outputs", 0, args.batched)["ids"]
              for kind in ("dense", "plan")}
        lines += ["## Token-for-token check (greedy, 32 new tokens, 20 prompts)", "",
                  "| pair | identical outputs | score (sum over the prompts), transformers / ilc HF runtime | score, vLLM |", "|---|---|---|---|"]
        for kind, label in (("dense", "dense: vLLM vs transformers"), ("plan", "plan: vLLM plugin vs ilc HF runtime")):
            same = sum(a == b for a, b in zip(hf[kind], vl[kind]))
            hf_score = sum(found(i, s, tok) for i, s in zip(hf[kind], samples))
            vl_score = sum(found(i, s, tok) for i, s in zip(vl[kind], samples))
            lines.append(f"| {label} | {same} / {len(samples)} | {hf_score:.1f} | {vl_score:.1f} |")
        for i, s in enumerate(samples):
            if hf["plan"][i] != vl["plan"][i]:
                lines.append(f"\nplan differs on {s['task']} {s['length']} depth {s['depth']}: HF "
                             f"{tok.decode(hf['plan'][i])!r} vs vLLM {tok.decode(vl['plan'][i])!r}")
        lines.append("")
    if "capacity" in args.parts:
        cap = {kind: run_engine(kind, args.plan, samples_file, "capacity", args.requests, args.batched)
               for kind in ("dense", "plan")}
        d, p = cap["dense"], cap["plan"]
        need = 0.9 / (1 - saving)
        lines += [f"## Capacity: {args.requests} concurrent 4k-token requests, {BATCH_NEW_TOKENS} new tokens each "
                  f"(VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE')} GiB, fp32 cache, "
                  f"block size {SERVING_DEFAULTS['block_size']}, max_num_batched_tokens {args.batched})", "",
                  "| engine | KV cache groups | blocks | vLLM max concurrency (4k) | blocks in use after admitting "
                  "| KV MiB per request (16-bit) | batch seconds | tokens/s |", "|---|---|---|---|---|---|---|---|"]
        for kind, c in cap.items():
            # bytes as a 16-bit cache would hold them (this CPU run keeps fp32)
            per_req = c["used_blocks"] * c["bytes_per_block"] * 2 / c["float_bytes"] / c["requests"] / 2 ** 20
            lines.append(f"| {kind} | {c['groups']} | {c['num_blocks']} | {c['max_concurrency']:.2f} | "
                         f"{c['used_blocks']} | {per_req:.1f} | {c['seconds']:.1f} | "
                         f"{(c['prompt_tokens'] + c['requests'] * BATCH_NEW_TOKENS) / c['seconds']:.0f} |")
        ratio = p["max_concurrency"] / d["max_concurrency"]
        held = (p["used_blocks"] * p["bytes_per_block"]) / (d["used_blocks"] * d["bytes_per_block"])
        lines += ["", f"Max concurrency plan / dense: **{ratio:.3f}x** (target 0.9 / (1 - s) = {need:.3f}x; "
                  f"{1 / (1 - saving):.3f}x if vLLM held exactly the plan's tokens). KV held after admission, plan / "
                  f"dense: {held:.3f} (the plan's count: {1 - saving:.3f}). Batch time plan / dense: "
                  f"{p['seconds'] / d['seconds']:.2f}x."]
    Path(samples_file).unlink()
    from common import emit_table

    emit_table(lines, args.out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command")
    e = sub.add_parser("engine")
    e.add_argument("kind", choices=("dense", "plan"))
    e.add_argument("--plan", required=True)
    e.add_argument("--samples", required=True)
    e.add_argument("--mode", choices=("outputs", "capacity"), required=True)
    e.add_argument("--requests", type=int, default=4)
    e.add_argument("--batched", type=int, default=256)
    e.add_argument("--result", required=True)
    ap.add_argument("--plan", default="plans/smollm2-135m.yaml")
    ap.add_argument("--haystack", default=None, help="directory of .txt files (default: the eval's noise haystack)")
    ap.add_argument("--parts", default="check,capacity")
    ap.add_argument("--requests", type=int, default=4, help="concurrent 4k requests of the capacity part")
    ap.add_argument("--batched", type=int, default=256, help="vLLM max_num_batched_tokens (prefill chunk)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.command == "engine":
        result = engine(a.kind, a.plan, a.samples, a.mode, a.requests, a.batched)
        Path(a.result).write_text(json.dumps(result))
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        main(a)
