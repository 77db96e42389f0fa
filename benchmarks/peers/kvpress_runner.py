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
of the compressed context, when the answer step starts. Presses that only mask keys (KVzip, AdaKV-style: kvpress's
"fake compression") keep a dense cache: their `kv_bytes` say so, and `nominal_saved` gives the ratio they simulate.
Resumes from the output file.

The cache the context is prefilled into is a choice too (`--caches`): `dense` (kvpress's default `DynamicCache`) or
Hugging Face's KIVI-style `QuantizedCache` (quanto backend, `optimum-quanto`; 4 or 2 bits, residual 128 tokens, HF's
defaults: axis 0, groups of 64), alone (press `none`) or under a press: kvpress re-quantizes the pruned keys and
values of a `QuantizedCache` in its forward hook (`BasePress.forward_hook`, `KVzipPress.forward_hook`). Bytes are
priced as served (`--float-bytes`, 2): the quantized cache's packed integers as stored, its scales, shifts and
full-precision residual at 2 bytes per float, against a dense cache at 2 bytes per float (`held_bytes`: what the
cache holds on this run, floats at the model's dtype).

    .venv-peers/bin/python benchmarks/peers/kvpress_runner.py --prompts OUT/prompts.jsonl --out OUT/peers.jsonl \\
        --presses snapkv,tova,kvzip,streaming_llm --ratios 0.25,0.5,0.75 --settings agnostic,aware
    .venv-peers/bin/python benchmarks/peers/kvpress_runner.py --prompts OUT/prompts.jsonl --out OUT/peers.jsonl \\
        --presses none --ratios 0 --caches quanto4,quanto2 --settings agnostic
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
    prefix: str = "kvpress"  # method names: PREFIX-NAME-RATIO (press "none": the cache alone, named by the cache)


def peers() -> dict[str, Peer]:
    import kvpress

    return {p.name: p for p in (
        Peer("none", lambda r: None, prefix=""),  # no press: the cache alone (hf-quanto-4, ...)
        Peer("snapkv", lambda r: kvpress.SnapKVPress(compression_ratio=r)),
        Peer("tova", lambda r: kvpress.TOVAPress(compression_ratio=r)),
        Peer("kvzip", lambda r: kvpress.KVzipPress(compression_ratio=r), masks_only=True),
        Peer("streaming_llm", lambda r: kvpress.StreamingLLMPress(compression_ratio=r)),
        Peer("expected_attention", lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r)),
        Peer("knorm", lambda r: kvpress.KnormPress(compression_ratio=r)),
        Peer("pyramidkv", lambda r: kvpress.PyramidKVPress(compression_ratio=r)),
    )}


@dataclass(frozen=True)
class CacheKind:
    """The cache the context is prefilled into: how to build it, its method suffix and the fraction of a 16-bit
    cache's bytes it nominally keeps (packed integers plus a 16-bit scale and shift per group of `group` values)."""

    name: str
    build: Callable[[object], object]  # model config -> a fresh cache
    suffix: str = ""  # appended to the press's method name ("+q4"); the cache's own name when there is no press
    bits: int = 16
    group: int = 64
    residual: int = 0

    @property
    def kept(self) -> float:
        return 1.0 if self.bits >= 16 else (self.group * self.bits / 8 + 2 * 2) / (self.group * 2)

    def settings(self) -> dict:
        if self.bits >= 16:
            return dict(cache=self.name)
        return dict(cache=self.name, backend="quanto", nbits=self.bits, q_group_size=self.group, axis_key=0,
                    axis_value=0, residual_length=self.residual)


def caches() -> dict[str, CacheKind]:
    def quanto(bits: int) -> CacheKind:
        def build(config):
            from transformers import QuantizedCache

            return QuantizedCache(backend="quanto", config=config, nbits=bits, q_group_size=64, residual_length=128)

        return CacheKind(f"quanto{bits}", build, suffix=f"+q{bits}", bits=bits, group=64, residual=128)

    def dense(config):
        from transformers import DynamicCache

        return DynamicCache()

    return {c.name: c for c in (CacheKind("dense", dense), quanto(4), quanto(2))}


SETTINGS = {"agnostic": "question_start", "aware": "answer_start"}  # where the compressed context ends


def method_name(press: str, ratio: float, setting: str, cache: CacheKind | None = None, prefix: str = "kvpress") -> str:
    aware = "-aware" if setting == "aware" else ""
    if not prefix:  # no press: the cache alone
        return f"hf-quanto-{cache.bits}{aware}" if cache is not None and cache.bits < 16 else f"full-{press}{aware}"
    return f"{prefix}-{press}-{round(100 * ratio)}" + (cache.suffix if cache is not None else "") + aware


def tensor_bytes(t, float_bytes: int | None) -> int:
    """Bytes of a tensor as stored, floats priced at `float_bytes` (None: at their own dtype); a tensor subclass
    (quanto's packed integers, scales and shifts) is the sum of its inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        return sum(tensor_bytes(getattr(t, n), float_bytes) for n in t.__tensor_flatten__()[0])
    if t.is_floating_point() and float_bytes is not None:
        return t.numel() * float_bytes
    return t.numel() * t.element_size()


def cache_bytes(cache, float_bytes: int | None = None) -> int:
    """Keys and values a cache holds: a dense layer's tensors; a quantized layer's quantized keys and values (packed
    integers, scales, shifts) and its full-precision residual."""
    parts = ("_quantized_keys", "_quantized_values", "keys", "values")
    return sum(tensor_bytes(t, float_bytes) for layer in cache.layers for t in (getattr(layer, a, None) for a in parts)
               if isinstance(t, torch.Tensor) and t.numel())


def split_point(prompt: dict, setting: str, prompts: list[dict]) -> tuple[int, bool]:
    """Where the compressed context ends, and whether it was inferred: where the prompt's tokenizer could not say
    (a token straddles the document's end, e.g. a needle at depth 1.0 ends the document with " \\n"), the split
    is taken from a prompt of the same task whose tail (question, end of turn) is the same tokens, but its first;
    the straddling token goes with the question."""
    split = prompt[SETTINGS[setting]]
    if split > 0:
        return split, False
    ids = prompt["input_ids"]
    for other in prompts:
        s = other[SETTINGS[setting]]
        if other["task"] != prompt["task"] or s <= 0:
            continue
        tail = other["input_ids"][s:]
        if len(tail) > 1 and len(tail) < len(ids) and ids[-(len(tail) - 1):] == tail[1:]:
            return len(ids) - len(tail), True
    raise ValueError(f"prompt {prompt['prompt_key']}: no {SETTINGS[setting]} recorded (tokenizer without offsets)")


def run_one(pipe, prompt: dict, peer: Peer, ratio: float, setting: str, max_new_tokens: int, kind: CacheKind,
            split: int, float_bytes: int | None) -> dict:
    ids = torch.tensor([prompt["input_ids"]])
    context, rest = ids[:, :split], ids[:, split:]
    cache = kind.build(pipe.model.config)
    press = peer.build(ratio)
    answering = []  # (seconds, answer) of the pipeline's answer step: the question forward and greedy decoding
    held = []  # (priced, held) bytes of the compressed context's cache, as the answer step starts

    def timed_answer(*a, generate=type(pipe).generate_answer, **kw):
        held.append((cache_bytes(cache, float_bytes), cache_bytes(cache)))
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
    float_size = float_bytes or model.dtype.itemsize
    dense = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * tokens * head_dim * float_size
    kept = (1 - ratio) * split * kind.kept + (tokens - split)  # the question and the answer prefix stay full
    return dict(text=answers[0], kv_bytes=held[0][0], dense_bytes=dense, tokens=tokens,
                nominal_saved=1 - kept / tokens, prefill_s=total - answer_s,
                decode_ms=1e3 * answer_s / new_tokens, held_bytes=held[0][1])


def main(args) -> None:
    from importlib.metadata import version

    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    prompts_path = Path(args.prompts)
    prompts = [json.loads(line) for line in prompts_path.read_text().splitlines() if line.strip()]
    if args.seeds:
        prompts = [p for p in prompts if p["seed"] in {int(x) for x in args.seeds.split(",")}]
    model_dir = args.model or json.loads((prompts_path.parent / "run.json").read_text())["model_dir"]
    table, kinds = peers(), caches()
    chosen = [table[p] for p in args.presses.split(",")]
    cache_kinds = [kinds[c] for c in args.caches.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
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
    jobs = [(p, peer, r, s, c) for c in cache_kinds for peer in chosen for r in ratios for s in settings
            for p in prompts]
    todo = [j for j in jobs if (f"{method_name(j[1].name, j[2], j[3], j[4], j[1].prefix)}|{j[0]['prompt_key']}",
                                j[0]["prompt"]) not in done]
    print(f"{len(todo)} of {len(jobs)} runs to do ({len(prompts)} prompts)", flush=True)
    with out.open("a") as f, torch.no_grad():
        for n, (prompt, peer, ratio, setting, kind) in enumerate(todo, 1):
            method = method_name(peer.name, ratio, setting, kind, peer.prefix)
            split, inferred = split_point(prompt, setting, prompts)
            res = run_one(pipe, prompt, peer, ratio, setting, args.max_new_tokens, kind, split,
                          args.float_bytes or None)
            rec = dict(key=f"{method}|{prompt['prompt_key']}", method=method, task=prompt["task"],
                       length=prompt["length"], depth=prompt["depth"], seed=prompt["seed"], answers=prompt["answers"],
                       score=score(res["text"], tuple(prompt["answers"]), prompt["rule"]),
                       settings=dict(method=method, press=peer.name, compression_ratio=ratio, setting=setting,
                                     masks_only=peer.masks_only, prompt=prompt["prompt"], model=str(model_dir),
                                     max_new_tokens=args.max_new_tokens, dtype="float32",
                                     target_saved=round(1 - (1 - ratio) * kind.kept, 4),
                                     saving="nominal" if peer.masks_only else "measured",
                                     float_bytes=args.float_bytes or "model dtype", **kind.settings(), **versions),
                       split=split, split_inferred=inferred, **res)
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
    ap.add_argument("--ratios", default="0.25,0.5,0.75", help="compression ratios (press none: 0)")
    ap.add_argument("--caches", default="dense", help="dense, quanto4, quanto2 (HF QuantizedCache, optimum-quanto)")
    ap.add_argument("--float-bytes", type=int, default=2,
                    help="price floats (dense caches, scales, residuals) at this many bytes; 0: the model's dtype")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--settings", default="agnostic,aware", help="agnostic (kvpress default), aware, or both")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seeds", help="only the prompts of these seeds (a CPU-sized subset of the same prompts)")
    main(ap.parse_args())
