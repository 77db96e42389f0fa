"""Run NVIDIA kvpress presses, unmodified, on the exact prompts an `ilc eval` run wrote; records in the eval's schema.

This runs in its own environment (`make peers` -> .venv-peers: kvpress 0.5.5 pins transformers<5.3, ilc needs
5.17). It reads OUT/prompts.jsonl and OUT/run.json (the model's weights directory) written by `ilc eval --out OUT`
(or `benchmarks/eval_sweep.py`), and for every press x compression ratio x setting it calls kvpress's own pipeline
step (`KVPressTextGenerationPipeline._forward`: prefill of the context under the press, then the question, then
greedy decoding) with the prompt's own token ids, so the chat formatting and the tokens are identical to ilc's:
- ``agnostic`` (kvpress's default): the context is compressed before the question is seen; the question and the
  assistant prefix are fed after compression;
- ``aware``: the question is inside the compressed context; only the assistant prefix is fed after.
Scores use ilc's own `score` (imported from this checkout; it needs only torch). KV bytes are measured on the cache
after the answer. Presses that only mask keys (KVzip, AdaKV-style: kvpress's "fake compression") keep a dense cache:
their `kv_bytes` say so, and `nominal_saved` gives the ratio they simulate. Resumes from the output file.

    .venv-peers/bin/python benchmarks/peers/kvpress_runner.py --prompts OUT/prompts.jsonl --out OUT/peers.jsonl \\
        --presses snapkv,tova,kvzip,streaming_llm --ratios 0.25,0.5,0.75 --settings agnostic,aware
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ilc.eval.tasks import score  # noqa: E402  (torch-only module of this checkout: no transformers, no ilc.runtime)


@dataclass(frozen=True)
class Peer:
    """One kvpress press: how to build it for a compression ratio, and whether it really shrinks the cache."""

    name: str
    build: Callable[[float], object]
    masks_only: bool = False  # kvpress keeps the dense cache and masks the pruned keys


def peers() -> dict[str, Peer]:
    import kvpress

    return {p.name: p for p in (
        Peer("snapkv", lambda r: kvpress.SnapKVPress(compression_ratio=r)),
        Peer("tova", lambda r: kvpress.TOVAPress(compression_ratio=r)),
        Peer("kvzip", lambda r: kvpress.KVzipPress(compression_ratio=r), masks_only=True),
        Peer("streaming_llm", lambda r: kvpress.StreamingLLMPress(compression_ratio=r)),
        Peer("expected_attention", lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r)),
        Peer("knorm", lambda r: kvpress.KnormPress(compression_ratio=r)),
        Peer("pyramidkv", lambda r: kvpress.PyramidKVPress(compression_ratio=r)),
    )}


SETTINGS = {"agnostic": "question_start", "aware": "answer_start"}  # where the compressed context ends


def method_name(press: str, ratio: float, setting: str) -> str:
    return f"kvpress-{press}-{round(100 * ratio)}" + ("-aware" if setting == "aware" else "")


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def run_one(pipe, prompt: dict, peer: Peer, ratio: float, setting: str, max_new_tokens: int) -> dict:
    from transformers import DynamicCache

    split = prompt[SETTINGS[setting]]
    if split <= 0:
        raise ValueError(f"prompt {prompt['prompt_key']}: no {SETTINGS[setting]} recorded (tokenizer without offsets)")
    ids = torch.tensor([prompt["input_ids"]])
    context, rest = ids[:, :split], ids[:, split:]
    cache = DynamicCache()
    press = peer.build(ratio)
    answering = []  # (seconds, answer) of the pipeline's answer step: the question forward and greedy decoding

    def timed_answer(*a, generate=type(pipe).generate_answer, **kw):
        t0 = time.perf_counter()
        text = generate(pipe, *a, **kw)
        answering.append((time.perf_counter() - t0, text))
        return text

    pipe.generate_answer = timed_answer  # an instance attribute: kvpress's code itself is unchanged
    t = time.perf_counter()
    answers = pipe._forward({"context_ids": context, "questions_ids": [rest]}, max_new_tokens=max_new_tokens,
                            press=press, cache=cache)
    total = time.perf_counter() - t
    answer_s = answering[0][0]
    new_tokens = max(1, len(pipe.tokenizer(answers[0], add_special_tokens=False)["input_ids"]))
    model = pipe.model
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tokens = ids.shape[1]  # the answer was removed from the cache by the pipeline; count the prompt's tokens
    dense = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * tokens * head_dim * model.dtype.itemsize
    return dict(text=answers[0], kv_bytes=cache_bytes(cache), dense_bytes=dense, tokens=tokens,
                nominal_saved=ratio * split / tokens, prefill_s=total - answer_s,
                decode_ms=1e3 * answer_s / new_tokens)


def main(args) -> None:
    from importlib.metadata import version

    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    prompts_path = Path(args.prompts)
    prompts = [json.loads(line) for line in prompts_path.read_text().splitlines() if line.strip()]
    if args.seeds:
        prompts = [p for p in prompts if p["seed"] in {int(x) for x in args.seeds.split(",")}]
    model_dir = args.model or json.loads((prompts_path.parent / "run.json").read_text())["model_dir"]
    table = peers()
    chosen = [table[p] for p in args.presses.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    settings = args.settings.split(",")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    out = Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                rec = json.loads(line)
                done.add((rec["key"], rec["settings"]["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    versions = {name: version(name) for name in ("kvpress", "transformers", "torch")}
    jobs = [(p, peer, r, s) for peer in chosen for r in ratios for s in settings for p in prompts]
    todo = [j for j in jobs if (f"{method_name(j[1].name, j[2], j[3])}|{j[0]['prompt_key']}", j[0]["prompt"])
            not in done]
    print(f"{len(todo)} of {len(jobs)} runs to do ({len(prompts)} prompts)", flush=True)
    with out.open("a") as f, torch.no_grad():
        for n, (prompt, peer, ratio, setting) in enumerate(todo, 1):
            method = method_name(peer.name, ratio, setting)
            res = run_one(pipe, prompt, peer, ratio, setting, args.max_new_tokens)
            rec = dict(key=f"{method}|{prompt['prompt_key']}", method=method, task=prompt["task"],
                       length=prompt["length"], depth=prompt["depth"], seed=prompt["seed"], answers=prompt["answers"],
                       score=score(res["text"], tuple(prompt["answers"]), prompt["rule"]),
                       settings=dict(method=method, press=peer.name, compression_ratio=ratio, setting=setting,
                                     masks_only=peer.masks_only, prompt=prompt["prompt"], model=str(model_dir),
                                     max_new_tokens=args.max_new_tokens, dtype="float32", **versions),
                       **res)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            print(f"[{n}/{len(todo)}] {method} {prompt['prompt_key']}: score {rec['score']:.2f}, "
                  f"prefill {res['prefill_s']:.1f} s, kv {1 - rec['kv_bytes'] / rec['dense_bytes']:.1%} saved", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", required=True, help="prompts.jsonl written by `ilc eval --out DIR`")
    ap.add_argument("--out", required=True, help="results JSONL (resumed); pass it to `ilc eval --peers`")
    ap.add_argument("--model", help="weights directory (default: run.json beside the prompts)")
    ap.add_argument("--presses", default="snapkv,tova,kvzip,streaming_llm")
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--settings", default="agnostic,aware", help="agnostic (kvpress default), aware, or both")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seeds", help="only the prompts of these seeds (a CPU-sized subset of the same prompts)")
    main(ap.parse_args())
