"""`ilc`: the command line. `calibrate` writes a plan, `inspect` explains one, `eval` scores one, `generate` runs one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _calibrate(args) -> int:
    from .calibrate import CalibrationSettings, calibrate
    from .inspect_plan import format_plan

    settings = CalibrationSettings(
        model=args.model, data=args.data, seq_len=args.seq_len, samples=args.samples, query_rows=args.query_rows,
        method=args.method, criterion=args.criterion, min_similarity=args.min_similarity,
        target_saving=args.target_saving, target_context=args.target_context, max_group_size=args.max_group_size,
        per_layer=args.per_layer, sinks=args.sinks, window=args.window, window_mass=args.window_mass,
        mode=args.mode, kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
        retrieval_samples=args.retrieval_samples, max_error=args.max_error, device=args.device, dtype=args.dtype,
        device_map=args.device_map, seed=args.seed,
    )
    result = calibrate(settings)
    out = result.plan.save(args.out)
    print(format_plan(result.plan))
    print(f"\nwrote {out} in {result.seconds:.1f} s")
    return 0


def _inspect(args) -> int:
    from ilc.runtime.plan import load_plan

    from .inspect_plan import format_plan, plot_plan

    plan = load_plan(args.plan)
    print(format_plan(plan, context=args.context, dtype_bytes=args.dtype_bytes, batch=args.batch))
    if args.plot:
        print(f"wrote {plot_plan(plan, args.plot)}")
    return 0


def _eval(args) -> int:
    import json

    from ilc.runtime.plan import load_plan

    from .data import read_documents
    from .evaluate import (METHODS, RULER_TASKS, EvalConfig, build_samples, format_perplexity, format_summary,
                           plot_niah, run, run_perplexity, summarize)
    from .models import load_model

    plan = load_plan(args.plan)
    tasks = ["niah", *RULER_TASKS] if args.all else [t for group in args.task for t in
                                                     (RULER_TASKS if group == "ruler" else [group])]
    want_ppl = "ppl" in tasks or args.all
    tasks = [t for t in tasks if t != "ppl"]
    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    model, tokenizer, _ = load_model(args.model or plan.model.name, args.device)
    config = EvalConfig(lengths=tuple(_tokens(x) for x in args.lengths.split(",")),
                        depths=tuple(float(x) / 100 for x in args.depths.split(",")),
                        ruler_depths=tuple(float(x) / 100 for x in args.ruler_depths.split(",")),
                        max_new_tokens=args.max_new_tokens, limit=args.limit)
    haystack = read_documents([args.haystack]) if args.haystack else None
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if tasks:
        samples = build_samples(tasks, tokenizer, config, haystack)
        records = run(model, tokenizer, plan, methods, samples, args.out, config.max_new_tokens)
        summary = summarize(records, methods)
        title = (f"`ilc eval {args.plan}`: {len(samples)} samples ({', '.join(tasks)}) at {args.lengths} tokens, "
                 f"haystack {args.haystack or 'embedded corpus'}; model {plan.model.name}")
        text = format_summary(summary, title)
        Path(args.out, "summary.md").write_text(text + "\n")
        Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1))
        print(text)
        if args.plot and "niah" in tasks:
            print(f"wrote {plot_niah(records, methods, args.plot)}")
    if want_ppl:
        from .data import default_corpus, pack

        docs = read_documents(args.data) if args.data else (haystack or default_corpus())
        length = max(config.lengths)
        ids = pack(docs, tokenizer, length, 1).samples
        ppl = run_perplexity(model, plan, methods, ids, args.out)
        text = format_perplexity(ppl, f"Perplexity by position, one {length}-token text "
                                      f"({', '.join(args.data) if args.data else args.haystack or 'embedded corpus'})")
        Path(args.out, "perplexity.md").write_text(text + "\n")
        print(text)
    return 0


def _tokens(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def _generate(args) -> int:
    from .demo import compressed_generation

    compressed_generation(args.plan, args.model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    return 0


def _method_names() -> list[str]:
    from .evaluate import METHODS

    return list(METHODS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ilc", description="Inter-layer KV-cache compression (PoD) for HF causal LMs")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("calibrate", help="measure attention on sample text and write a compression plan")
    c.add_argument("model", nargs="?", default="smollm2-135m",
                   help="embedded name (smollm2-135m), HF directory, .gguf file, or hub id in the local cache")
    c.add_argument("--data", nargs="+", help=".txt files, directories of them, or .jsonl with a 'text' field "
                   "(default: the embedded public-domain corpus)")
    c.add_argument("--out", default="plan.yaml", help="plan file to write (default: plan.yaml)")
    c.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration sample (default 2048)")
    c.add_argument("--samples", type=int, default=8, help="at most this many samples (default 8)")
    c.add_argument("--query-rows", type=int, default=32, help="query rows recorded per sample (default 32)")
    c.add_argument("--method", choices=["optimal", "paper"], default="optimal",
                   help="optimal: exact segmentation; paper: the paper's greedy rule (default optimal)")
    c.add_argument("--criterion", choices=["output", "jsd"],
                   help="similarity: output change under sharing, or 1-JSD of distant attention "
                        "(default: output for optimal, jsd for paper)")
    c.add_argument("--min-similarity", type=float, help="similarity floor for every follower (paper: delta; "
                   "default: 0.5 for paper, 0.9 for optimal, unless --target-saving is given)")
    c.add_argument("--target-saving", type=float, help="reach this KV saving (e.g. 0.3) with the least output "
                   "error (optimal method); in (0, 1) for mixed plans, (0, 0.5) with --kinds follower")
    c.add_argument("--kinds", default="follower,streaming",
                   help="what a (layer, KV head) may become besides full: follower (PoD sharing), streaming "
                        "(sinks + own window only); default follower,streaming. --kinds follower gives PoD-only plans")
    c.add_argument("--max-error", type=float, help="mixed plans: largest output error in [0, 1] any head's option may "
                   "cost (default 0.1 without --target-saving, none with it)")
    c.add_argument("--retrieval-samples", type=int, default=4,
                   help="extra samples with planted facts recalled later and a copied passage, built from the same "
                        "text, so that retrieval heads are priced as such (default 4; 0 = prose only)")
    c.add_argument("--target-context", type=int, help="context the target saving is measured at "
                   "(default: --seq-len, where the errors are measured; the saving grows with context)")
    c.add_argument("--max-group-size", type=int, default=8, help="layers per block at most (default 8)")
    c.add_argument("--per-layer", action="store_true", help="all KV heads of a layer share the same blocks")
    c.add_argument("--sinks", type=int, help="sink tokens (default: chosen from the attention curve)")
    c.add_argument("--window", type=int, help="recent-window tokens (default: chosen from the attention curve)")
    c.add_argument("--window-mass", type=float, default=0.8,
                   help="share of attention mass the sinks + window must hold (default 0.8)")
    c.add_argument("--mode", choices=["scores", "keys"], default="scores",
                   help="scores: followers reuse the anchor's distant logits (training-free, default); "
                        "keys: own query on the anchor's keys (adapted models only)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--device-map", help="e.g. auto (accelerate) for models larger than one GPU")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_calibrate)

    i = sub.add_parser("inspect", help="explain a plan: blocks, windows, savings by context, plots")
    i.add_argument("plan")
    i.add_argument("--context", type=int, help="context length to price (default: the model's maximum)")
    i.add_argument("--batch", type=int, default=1)
    i.add_argument("--dtype-bytes", type=int, default=2, help="bytes per cached element (default 2: bf16/fp16)")
    i.add_argument("--plot", help="write a PNG: similarity heatmaps with blocks, and the window curve")
    i.set_defaults(func=_inspect)

    e = sub.add_parser("eval", help="score a plan against the full cache and baselines on long-context tasks")
    e.add_argument("plan")
    e.add_argument("--task", nargs="+", default=["niah"], choices=["niah", "ruler", "ppl", "multikey", "multivalue",
                   "vartrack", "commonwords", "qa"], help="tasks (ruler = all five RULER-style tasks; ppl = "
                   "perplexity by position on --data)")
    e.add_argument("--all", action="store_true", help="niah, every RULER-style task, and ppl")
    e.add_argument("--data", nargs="+", help="text for --task ppl (default: the haystack, else the embedded corpus)")
    e.add_argument("--lengths", default="2k,4k", help="context lengths, e.g. 1k,2k,4k (default 2k,4k)")
    e.add_argument("--depths", default="0,25,50,75,100", help="NIAH depths in percent")
    e.add_argument("--ruler-depths", default="25,50", help="depths of the planted facts for RULER-style tasks")
    e.add_argument("--methods", help="comma list (default all): " + ", ".join(_method_names()))
    e.add_argument("--haystack", help="directory of texts (default: the embedded corpus)")
    e.add_argument("--model", help="model to load (default: the plan's model name)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--limit", type=int, help="at most this many samples per task")
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--out", default="eval-out", help="output directory (results.jsonl is resumed)")
    e.add_argument("--plot", help="write the NIAH heatmaps, one per method, to this PNG")
    e.set_defaults(func=_eval)

    g = sub.add_parser("generate", help="run compressed generation with a plan and print the bytes saved")
    g.add_argument("plan")
    g.add_argument("--model", default="smollm2-135m")
    g.add_argument("--prompt-tokens", type=int, default=2000)
    g.add_argument("--new-tokens", type=int, default=24)
    g.set_defaults(func=_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # PlanError, CalibrationDataError, ... are ValueErrors
        print(f"ilc {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
