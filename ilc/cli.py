"""`ilc`: the command line. `ilc calibrate` writes a plan, `ilc inspect` explains one, `ilc generate` runs one."""

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
        mode=args.mode, device=args.device, dtype=args.dtype, device_map=args.device_map, seed=args.seed,
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


def _generate(args) -> int:
    from .demo import compressed_generation

    compressed_generation(args.plan, args.model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    return 0


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
    c.add_argument("--target-saving", type=float, help="reach this KV saving (e.g. 0.35) with the least similarity "
                   "loss (optimal method)")
    c.add_argument("--target-context", type=int, help="context the target saving is measured at "
                   "(default: the model's maximum context)")
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
