"""Bits per head on SmolLM2: the 75% and 90% plans, their bytes on a real 4k cache, NIAH / RULER on the sweep's 20
prompts beside the full model, StreamingLLM at equal bytes and quantization alone (int8 / int4 / int2, KIVI-style),
and perplexity and KL to the full model by position on one held-apart 4k text (its first 1024 tokens a prompt, then
read 64 tokens at a time, so that positions after 1024 read the cache as stored: dropped, selected and packed tokens).

Calibrates once (`ilc calibrate smollm2-135m --seq-len 4096 --precision K8V8,K4cV4,K4cV2,K2cV2`) and chooses each
plan from the same records with `regroup`: what that command writes with --target-saving 0.755 (the 75% plan),
0.905 (the 90% plan), 0.91 --keep 0.25 [--scorer replay] [--selection-window 16 [--selection-pool 31]] (90% with
token selection), 0.91 --keep 0.2 --precision K8V8,K4cV4 (90% with selection and no 2-bit values), or 0.5, all with
selection's loss free (--free-selection) as they were chosen; "90-priced" is the 90% plan with it priced, which
needs its own calibration (`ilc calibrate` with its flags; docs/bits/README.md). Every step resumes from its
results.jsonl, and a plan-NAME.yaml already in --out is used as it is.

Run: OMP_NUM_THREADS=1 python benchmarks/bits_plans.py --out docs/bits --haystack ../shared/data/pg_essays
(one thread: the kvpress peers run beside it on the other core)
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
from pathlib import Path

from common import emit_table
from ilc.calibrate import CalibrationSettings, calibrate, regroup
from ilc.data import pack, read_documents
from ilc.eval.baselines import equal_memory_window, quantized_plan, streaming_plan
from ilc.eval.config import headline_samples
from ilc.eval.records import write_prompts
from ilc.eval.report import summarize
from ilc.eval.methods import applied
from ilc.eval.run import by_bucket, held_bytes, kl_by_position, next_token_logits, run, run_perplexity
from ilc.models import load_model, weights_dir
from ilc.runtime import load_plan
from ilc.runtime.bits import HeadPrecision

SEQ_LEN = 4096
PRECISIONS = ("K8V8", "K4cV4", "K4cV2", "K2cV2")
# name -> `settings` arguments: (target saving, token selection keep or None, scorer[, precisions, selection window,
# pool]); the plans before the pool's default became 31 pooled over 15. 75 and 90-keep-w16-p31 are committed under
# plans/. The targets are a little above 75% / 90%: a real cache holds its growth slack too (0.4% at 4k), and the
# plans must hold >= 75% / 90%
PLANS = {"75": (0.755, None, "snapkv"), "90": (0.905, None, "snapkv"),
         "90-keep": (0.91, 0.25, "snapkv", PRECISIONS, 64, 15),
         "90-keep-4bit": (0.91, 0.2, "snapkv", ("K8V8", "K4cV4"), 64, 15),  # no 2-bit values: exact digits survive
         "90-replay": (0.91, 0.25, "replay", PRECISIONS, 64, 15), "50": (0.5, None, "snapkv"),
         "90-keep-w16": (0.91, 0.25, "snapkv", PRECISIONS, 16, 15),  # the last 16 prompt queries score the tokens
         "90-keep-w16-p31": (0.91, 0.25, "snapkv", PRECISIONS, 16, 31),  # ... pooled over 31 tokens, not 15
         "75-streams": (0.755, None, "snapkv"),
         "90-priced": (0.91, 0.25, "snapkv", PRECISIONS, 16, 31, True)}  # selection's loss priced (its own records)
# "75" and "75-streams" share their flags: plan-75.yaml was written before calibration priced bits for streaming
# heads, plan-75-streams.yaml after (a calibration run now regroups "75" to the latter; both files are reused as
# they are)
# (plan, method, what) in the order they run: "all" = NIAH / RULER on the 20 prompts, perplexity and KL to the full
# model by position; "ppl" = perplexity and KL only (one 4k text). The plans first, then the baselines beside them
# (2 CPU cores: hours).
JOBS = (("75", "plan", "all"), ("90", "plan", "all"), ("90-keep", "plan", "all"), ("90-keep-w16", "plan", "all"),
        ("90-keep-w16-p31", "plan", "all"),
        ("90-keep-4bit", "plan", "all"), ("75-streams", "plan", "all"), ("90-priced", "plan", "all"),
        ("50", "plan", "ppl"), ("75", "int4", "ppl"), ("75", "streaming-equal", "ppl"),
        ("90-keep", "streaming-equal", "ppl"), ("90-keep", "int2", "ppl"))
PPL_PROMPT = 1024  # perplexity: the text's first 1024 tokens are the prompt, the rest is read 64 tokens at a time
QUANTIZED_ALONE = {"int8": "K8V8", "int4": "K4cV4", "int2": "K2cV2"}
LABELS = {"75": "ilc 75%", "90": "ilc 90%, no selection", "90-keep": "ilc 90% + selection 25%",
          "90-keep-4bit": "ilc 90% + selection 20%, no 2-bit values", "90-replay": "ilc 90% + replay selection 25%",
          "50": "ilc 50%", "90-keep-w16": "ilc 90% + selection 25%, 16 observing queries",
          "90-keep-w16-p31": "ilc 90% + selection 25%, 16 observing queries, pool 31",
          "75-streams": "ilc 75%, streaming heads quantized too",
          "90-priced": "ilc 90% + selection 25%, 16 observing queries, pool 31, selection's loss priced"}


def settings(target: float, keep: float | None = None, scorer: str = "snapkv",
             precision: tuple[str, ...] = PRECISIONS, selection_window: int = 64,
             selection_pool: int = CalibrationSettings.selection_pool, priced: bool = False) -> CalibrationSettings:
    """A plan's flags; `priced`: selection's loss priced, which needs a calibration with the same --keep (the
    plans before it were chosen with selection free, so that one calibration without --keep serves them all)."""
    return CalibrationSettings(seq_len=SEQ_LEN, target_saving=target, precision=precision, keep=keep, scorer=scorer,
                               selection_window=selection_window, selection_pool=selection_pool,
                               free_selection=keep is not None and not priced)


def evaluate(model, tok, plan, method, samples, out_dir: Path, ppl_ids, what: str, reference) -> dict:
    """NIAH / RULER of one method on the prompts (what="all"), its perplexity and its KL to the full model by
    position (`reference()`: the full model's log-probabilities), each resumed."""
    s = dict(niah=math.nan, ruler=math.nan, kv_saved=math.nan, prefill_s=math.nan, samples=0)
    if what == "all":
        s = summarize(run(model, tok, plan, [method], samples, out_dir, progress=False), [method])[method]
    ppl_path = out_dir / f"perplexity-{method}.json"
    if not ppl_path.exists():
        run_perplexity(model, plan, [method], ppl_ids, out_dir, prompt=PPL_PROMPT)
        (out_dir / "perplexity.json").rename(ppl_path)
    s["ppl"] = json.loads(ppl_path.read_text())[method]
    kl_path = out_dir / f"kl-{method}.json"
    if not kl_path.exists():
        with applied(method, model, plan, ppl_ids.shape[1]) as chosen:
            kl = kl_by_position(chosen, ppl_ids, reference(), prompt=PPL_PROMPT)
        kl_path.write_text(json.dumps(by_bucket(kl, lambda part: sum(part) / len(part)), indent=1))
    if kl_path.exists():
        s["kl"] = json.loads(kl_path.read_text())
    return s


def write_kl_table(rows, out_dir: Path):
    """kl.md: mean KL(full || method) per position bucket, beside the perplexity of the same reading."""
    rows = [r for r in rows if r.get("kl")]
    if not rows:
        return
    buckets = [k for k in rows[0]["kl"] if k != "all"]
    lines = ["Mean KL(full model || method) of the next-token distribution, in nats, per bucket of token positions "
             f"(one held-apart 4k pg_essays text; the first {PPL_PROMPT} tokens a prompt, the rest read 64 tokens at a "
             "time):", "", "| method | KV saved, real 4k cache | " + " | ".join(buckets) + " | all | ppl, last bucket |",
             "|---" * (len(buckets) + 4) + "|"]
    lines += [f"| {r['name']} | {r['saved_4k']:.1%} | " + " | ".join(f"{r['kl'][b]:.2g}" for b in buckets)
              + f" | {r['kl']['all']:.2g} | {r['ppl_last']:.2f} |" for r in rows]
    emit_table(lines, out_dir / "kl.md")


def applied_plan(plan, method):
    """The plan a method runs, for its bytes on a real 4k cache."""
    if method == "plan":
        return plan
    if method == "streaming-equal":
        return streaming_plan(plan, equal_memory_window(plan, SEQ_LEN))
    return quantized_plan(plan, HeadPrecision.parse(QUANTIZED_ALONE[method]))


def describe(plan) -> str:
    counts = plan.kind_counts()
    bits = plan.precision.counts() if plan.precision else {}
    return f"{counts['full']}/{counts['follower']}/{counts['streaming']}" + "".join(f"; {n} {k}" for k, n in
                                                                                  bits.items())


def row(name, plan, s) -> dict:
    held, dense = held_bytes(plan, SEQ_LEN)
    buckets = [v for k, v in s["ppl"].items() if k != "all"]
    return dict(name=name, kinds=describe(plan), saved_4k=1 - held / dense, saved_eval=s["kv_saved"],
                niah=s["niah"], ruler=s["ruler"], prefill_s=s["prefill_s"], ppl=s["ppl"]["all"], ppl_last=buckets[-1],
                samples=s["samples"], ppl_buckets=s["ppl"], kl=s.get("kl"))


def write_table(rows, out_dir: Path):
    (out_dir / "bits.json").write_text(json.dumps(rows, indent=1))
    lines = ["| method | full/follower/streaming; bits | KV saved, real 4k cache | KV saved (per prompt, 2k+4k) | "
             "NIAH | RULER | prompts | prefill s | ppl (4k text) | ppl, last bucket |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    shown = lambda x, spec: "not run" if math.isnan(x) else format(x, spec)  # noqa: E731  (perplexity-only rows)
    lines += [f"| {r['name']} | {r['kinds']} | {r['saved_4k']:.1%} | {shown(r['saved_eval'], '.1%')} | "
              f"{shown(r['niah'], '.1f')} | {shown(r['ruler'], '.1f')} | {r['samples']} | {shown(r['prefill_s'], '.1f')} "
              f"| {r['ppl']:.2f} | {r['ppl_last']:.2f} |" for r in rows]
    buckets = [k for k in rows[0]["ppl_buckets"] if k != "all"]
    lines += ["", "Perplexity by position on one held-apart 4k text (pg_essays), per bucket of token positions:", "",
              "| method | " + " | ".join(buckets) + " | all |", "|---" * (len(buckets) + 2) + "|"]
    lines += [f"| {r['name']} | " + " | ".join(f"{r['ppl_buckets'][b]:.2f}" for b in buckets)
              + f" | {r['ppl']:.2f} |" for r in rows]
    emit_table(lines, out_dir / "bits.md")


def main(out: str, haystack: str | None, jobs):
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok, src = load_model()
    cached = out_dir / "calibration.pkl"
    if cached.exists():
        result = pickle.loads(cached.read_bytes())
    else:
        result = calibrate(settings(PLANS["75"][0]), model, tok, src.name, progress=False)
        cached.write_bytes(pickle.dumps(result))
    print(f"calibration: {result.seconds:.0f} s", flush=True)
    docs = read_documents([haystack]) if haystack else None
    samples = headline_samples(tok, (2048, 4096), (0.0, 0.25, 0.5, 0.75, 1.0), (0,), docs)
    write_prompts(samples, out_dir, weights_dir(src))  # for the peers' runner (benchmarks/peers)
    ppl_ids = pack(docs or [], tok, SEQ_LEN, 1).samples if docs else None
    computed = {}

    def reference():
        """The full model's log-probabilities on the perplexity text, read the same way (once, when needed)."""
        if not computed:
            with applied("full", model, result.plan, SEQ_LEN) as dense:
                computed["logp"] = next_token_logits(dense, ppl_ids, prompt=PPL_PROMPT).log_softmax(-1)
        return computed["logp"]

    full = evaluate(model, tok, result.plan, "full", samples, out_dir / "full", ppl_ids, "all", reference)
    rows = [dict(row("full model", result.plan, full), kinds="", saved_4k=0.0)]
    plans = {}
    for name, method, what in jobs:
        if name not in plans:  # a plan written by an earlier run is reused (a recalibration can differ in the
            path = out_dir / f"plan-{name}.yaml"  # last digit of an error, and the records name the plan's digest)
            if path.exists():
                plans[name] = load_plan(path)
            else:
                plans[name] = regroup(result, settings(*PLANS[name]), SEQ_LEN)
                plans[name].save(path)
        s = evaluate(model, tok, plans[name], method, samples, out_dir / f"plan-{name}", ppl_ids, what, reference)
        label = {"plan": LABELS[name], "streaming-equal": f"StreamingLLM at the bytes of '{LABELS[name]}'"}.get(
            method, f"{method} alone ({QUANTIZED_ALONE.get(method)} every head, ilc runtime)")
        rows.append(row(label, applied_plan(plans[name], method), s))
        print(rows[-1], flush=True)
        write_table(rows, out_dir)
        write_kl_table(rows, out_dir)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/bits")
    ap.add_argument("--haystack", default=None)
    ap.add_argument("--jobs", default=",".join(":".join(job) for job in JOBS),
                    help="plan:method:all|ppl, in order")
    args = ap.parse_args()
    main(args.out, args.haystack, [tuple(job.split(":")) for job in args.jobs.split(",")])
