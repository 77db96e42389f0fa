"""`ilc`: the command line. `calibrate` writes a plan, `inspect` explains one, `adapt` trains the model to run it,
`eval` scores one, `generate` runs one.

Every option is checked against its range (`ilc.options`) and every output path for writability before any model
is loaded. Errors print one line and exit 2; Ctrl-C exits 130; `--debug` (or ILC_DEBUG=1) shows tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .options import OptionError, check, check_device, check_writable, help_range

EXIT_USAGE, EXIT_INTERRUPTED, EXIT_INTERNAL = 2, 130, 1


def calibration_settings(args):
    """The `CalibrationSettings` of parsed `ilc calibrate` arguments, validated (no work done)."""
    from .calibrate import CalibrationSettings

    settings = CalibrationSettings(
        model=args.model, data=args.data, seq_len=args.seq_len, samples=args.samples, query_rows=args.query_rows,
        method=args.method, criterion=args.criterion, min_similarity=args.min_similarity,
        target_saving=args.target_saving, target_context=args.target_context, max_group_size=args.max_group_size,
        per_layer=args.per_layer, sinks=args.sinks, window=args.window, window_mass=args.window_mass,
        mode=args.mode, kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
        retrieval_samples=args.retrieval_samples, max_error=args.max_error, keep=args.keep,
        scorer=args.scorer, selection_window=args.selection_window, device=args.device, dtype=args.dtype,
        device_map=args.device_map, seed=args.seed,
    )
    settings.validate()
    return settings


def _calibrate(args) -> int:
    from .calibrate import calibrate
    from .inspect_plan import format_plan

    settings = calibration_settings(args)
    check_device(args.device)
    check_writable(args.out, "--out")
    result = calibrate(settings)
    out = result.plan.save(args.out)
    print(format_plan(result.plan))
    print(f"\nwrote {out} in {result.seconds:.1f} s")
    return 0


def adapt_config(args):
    """The `AdaptConfig` of parsed `ilc adapt` arguments, validated (no work done)."""
    from .adapt import AdaptConfig

    config = AdaptConfig(tokens=args.tokens, seq_len=args.seq_len, lr=args.lr, rank=args.rank,
                         targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()), layers=args.layers,
                         mode=args.mode, retrieval_share=args.retrieval_share, proximal_weight=args.proximal_weight,
                         lm_weight=args.lm_weight, checkpoint_every=args.checkpoint_every, seed=args.seed)
    config.validate()
    return config


def _adapt(args) -> int:
    from ilc.runtime.plan import load_plan

    from .adapt import adapt, check_out_dir
    from .data import read_documents
    from .models import load_model

    config = adapt_config(args)
    check_device(args.device)
    check_writable(args.out, "--out", directory=True)
    check_out_dir(Path(args.out), args.resume)
    plan = load_plan(args.plan)
    docs = read_documents(args.data) if args.data else None
    model, tokenizer, _ = load_model(args.model, args.device)
    result = adapt(model, tokenizer, plan, config, args.out, docs=docs, resume=args.resume, merge=args.merge)
    a = result.plan.adapted
    print(f"adapted {a.steps} steps ({a.tokens} tokens, {result.tokens_per_second:.0f} tokens/s this run): "
          f"loss {a.loss_initial:.4f} -> {a.loss_final:.4f}; wrote {result.out}/plan.yaml and {result.out}/adapter")
    return 0


def _inspect(args) -> int:
    from ilc.runtime.plan import load_plan

    from .inspect_plan import format_plan, plot_plan

    check("context", args.context)
    check("batch", args.batch)
    if args.plot:
        check_writable(args.plot, "--plot")
    plan = load_plan(args.plan)
    print(format_plan(plan, context=args.context, dtype_bytes=args.dtype_bytes, batch=args.batch))
    if args.plot:
        print(f"wrote {plot_plan(plan, args.plot)}")
    return 0


def eval_request(args):
    """(plan, tasks, methods, EvalConfig, wants perplexity) of parsed `ilc eval` arguments, validated."""
    from ilc.runtime.plan import load_plan

    from .evaluate import METHODS, RULER_TASKS, EvalConfig

    lengths = tuple(_tokens(x, "--lengths") for x in args.lengths.split(","))
    depths = tuple(_number(x, "--depths") / 100 for x in args.depths.split(","))
    ruler_depths = tuple(_number(x, "--ruler-depths") / 100 for x in args.ruler_depths.split(","))
    config = EvalConfig(lengths=lengths, depths=depths, ruler_depths=ruler_depths, max_new_tokens=args.max_new_tokens,
                        limit=args.limit)
    config.validate()
    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise OptionError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    check_device(args.device)
    if args.peers and not Path(args.peers).is_file():
        raise OptionError(f"--peers {args.peers}: no such file")
    if args.haystack and not Path(args.haystack).is_dir():
        raise OptionError(f"--haystack {args.haystack}: no such directory")
    check_writable(args.out, "--out", directory=True)
    if args.plot:
        check_writable(args.plot, "--plot")
    plan = load_plan(args.plan)
    config.validate(plan.model.max_context)
    if plan.adapted is not None:
        from ilc.runtime.adapter import adapter_fingerprint

        if args.adapter and adapter_fingerprint(args.adapter) != plan.adapted.adapter:
            raise OptionError(f"--adapter {args.adapter} is not the adapter {args.plan} was adapted with")
        if not args.adapter:
            raise OptionError(f"{args.plan} is an adapted plan: pass --adapter DIR (the adapter `ilc adapt` wrote); "
                              "the full model and the baselines run on the base weights")
        if not args.methods:  # the plan runs in the mode it was adapted for
            methods = [m for m in methods if not (METHODS[m].mode and METHODS[m].mode != plan.adapted.mode)]
    elif args.adapter:
        raise OptionError(f"--adapter: {args.plan} has no adapted: section (pass the plan `ilc adapt` wrote)")
    tasks = ["niah", *RULER_TASKS] if args.all else [t for group in args.task for t in
                                                     (RULER_TASKS if group == "ruler" else [group])]
    want_ppl = "ppl" in tasks or args.all
    return plan, [t for t in tasks if t != "ppl"], methods, config, want_ppl


def _eval(args) -> int:
    import json

    from .data import read_documents
    from .evaluate import format_perplexity, format_summary, plot_niah, run, run_perplexity, summarize, write_prompts
    from .models import load_model, weights_dir

    plan, tasks, methods, config, want_ppl = eval_request(args)
    haystack = read_documents([args.haystack]) if args.haystack else None
    model, tokenizer, source = load_model(args.model or plan.model.name, args.device)
    adapted_model = None
    if plan.adapted is not None:  # a second copy of the weights, with the adapter merged, runs the plan itself
        from ilc.runtime import remove_plan

        adapted_model = plan.apply(load_model(args.model or plan.model.name, args.device)[0], adapter=args.adapter)
        remove_plan(adapted_model)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if tasks:
        from .evaluate import build_samples

        samples = build_samples(tasks, tokenizer, config, haystack)
        write_prompts(samples, args.out, weights_dir(source))
        records = run(model, tokenizer, plan, methods, samples, args.out, config.max_new_tokens,
                      adapted_model=adapted_model)
        if args.peers:
            from .evaluate import merge_peers, read_peer_records

            peers = read_peer_records(args.peers, samples)
            if not peers:
                raise OptionError(f"--peers {args.peers}: no records for these prompts (run the peer runner on "
                                  f"{Path(args.out, 'prompts.jsonl')} first)")
            records, methods = merge_peers(records, methods, peers)
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
        ppl = run_perplexity(model, plan, methods, ids, args.out, adapted_model)
        text = format_perplexity(ppl, f"Perplexity by position, one {length}-token text "
                                      f"({', '.join(args.data) if args.data else args.haystack or 'embedded corpus'})")
        Path(args.out, "perplexity.md").write_text(text + "\n")
        print(text)
    return 0


def _tokens(text: str, name: str) -> int:
    text = text.strip().lower()
    try:
        return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
    except ValueError:
        raise OptionError(f"{name}: expected token counts like 2k,4k or 2048, got {text!r}") from None


def _number(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise OptionError(f"{name}: expected numbers separated by commas, got {text!r}") from None


def _generate(args) -> int:
    from ilc.runtime.plan import load_plan

    from .demo import compressed_generation

    check("prompt_tokens", args.prompt_tokens)
    check("new_tokens", args.new_tokens)
    plan = load_plan(args.plan)
    if args.prompt_tokens + args.new_tokens + 64 > plan.model.max_context:
        raise OptionError(f"--prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} exceed the "
                          f"model's context of {plan.model.max_context} tokens")
    compressed_generation(args.plan, args.model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    return 0


def _scorer_names() -> list[str]:
    from ilc.runtime.heads import SCORERS

    return list(SCORERS)


def _method_names() -> list[str]:
    from .evaluate import METHODS

    return list(METHODS)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit 2), not a usage block."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ilc", description="Inter-layer KV-cache compression (PoD) for HF causal LMs")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks on errors (also: ILC_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    r = help_range

    c = sub.add_parser("calibrate", help="measure attention on sample text and write a compression plan")
    c.add_argument("model", nargs="?", default="smollm2-135m",
                   help="embedded name (smollm2-135m), HF directory, .gguf file, or hub id in the local cache")
    c.add_argument("--data", nargs="+", help=".txt files, directories of them, or .jsonl with a 'text' field "
                   "(default: the embedded public-domain corpus)")
    c.add_argument("--out", default="plan.yaml", help="plan file to write (default: plan.yaml)")
    c.add_argument("--seq-len", type=int, default=2048,
                   help=f"tokens per calibration sample, {r('seq_len')} and at most the model's context (default 2048)")
    c.add_argument("--samples", type=int, default=8, help=f"at most this many prose samples, {r('samples')} (default 8)")
    c.add_argument("--query-rows", type=int, default=32,
                   help=f"query rows recorded per sample, {r('query_rows')} (default 32)")
    c.add_argument("--method", choices=["optimal", "paper"], default="optimal",
                   help="optimal: exact choice (mixed plans: Lagrangian DP per head); paper: the paper's greedy rule, "
                        "followers only (default optimal)")
    c.add_argument("--criterion", choices=["output", "jsd"],
                   help="similarity: output change under sharing, or 1-JSD of distant attention "
                        "(default: output for optimal, jsd for paper)")
    c.add_argument("--min-similarity", type=float, help=f"similarity floor for every follower, {r('min_similarity')} "
                   "(paper: delta; default: 0.5 for paper, 0.9 for optimal, unless --target-saving is given)")
    c.add_argument("--target-saving", type=float,
                   help=f"reach this KV saving with the least output error (optimal method), {r('target_saving')}; "
                        "below 0.5 with --kinds follower")
    c.add_argument("--target-context", type=int, help=f"context the target saving is measured at, "
                   f"{r('target_context')} (default: --seq-len, where the errors are measured; the saving grows "
                   "with context)")
    c.add_argument("--kinds", default="follower,streaming",
                   help="what a (layer, KV head) may become besides full: follower (PoD sharing), streaming "
                        "(sinks + own window only); default follower,streaming. --kinds follower gives PoD-only plans")
    c.add_argument("--keep", type=float, help=f"token selection (SnapKV-style, once at the end of prefill): the "
                   f"share of distant tokens every full head keeps, {r('keep')}; followers keep their anchor's "
                   "choice, streaming heads are unaffected (default: no selection)")
    c.add_argument("--scorer", default="snapkv", choices=_scorer_names(),
                   help="token selection's scoring rule (default snapkv)")
    c.add_argument("--selection-window", type=int, default=64, help=f"token selection: recent tokens always kept "
                   f"and the queries that score, {r('selection_window')} (default 64; at least the followers' window)")
    c.add_argument("--max-error", type=float, help=f"mixed plans: largest output error any head's option may cost, "
                   f"{r('max_error')} (default 0.1 without --target-saving, none with it)")
    c.add_argument("--retrieval-samples", type=int, default=4,
                   help=f"extra samples with planted facts recalled later and a copied passage, built from the same "
                        f"text, so that retrieval heads are priced as such, {r('retrieval_samples')} (default 4)")
    c.add_argument("--max-group-size", type=int, default=8,
                   help=f"layers per block at most, {r('max_group_size')} (default 8)")
    c.add_argument("--per-layer", action="store_true", help="all KV heads of a layer share the same blocks "
                   "(with --kinds follower)")
    c.add_argument("--sinks", type=int, help=f"sink tokens, {r('sinks')} (default: chosen from the attention curve)")
    c.add_argument("--window", type=int, help=f"follower recent window, {r('window')} and below --seq-len / 2 "
                   "(default: chosen from the attention curve)")
    c.add_argument("--window-mass", type=float, default=0.8,
                   help=f"share of attention mass the sinks + window must hold, {r('window_mass')} (default 0.8)")
    c.add_argument("--mode", choices=["scores", "keys"], default="scores",
                   help="scores: followers reuse the anchor's distant logits (training-free, default); "
                        "keys: own query on the anchor's keys (adapted models only)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--device-map", help="e.g. auto (accelerate) for models larger than one GPU")
    c.add_argument("--seed", type=int, default=0, help=f"seed of the retrieval samples, {r('seed')} (default 0)")
    c.set_defaults(func=_calibrate)

    a = sub.add_parser("adapt", help="train LoRA adapters so that the model keeps its quality under a plan "
                       "(self-distillation from the full model)")
    a.add_argument("model", nargs="?", default="smollm2-135m", help="the model the plan was calibrated for")
    a.add_argument("--plan", required=True, help="the plan to adapt the model to")
    a.add_argument("--data", nargs="+", help="training text: .txt files, directories, .jsonl (default: the embedded "
                   "corpus; use more text than the token budget needs)")
    a.add_argument("--out", required=True, help="output directory: adapter/, plan.yaml (adapted), checkpoint.pt")
    a.add_argument("--tokens", type=int, default=65536, help=f"training tokens, {r('tokens')} (default 65536)")
    a.add_argument("--seq-len", type=int, default=2048, help=f"tokens per training sequence, {r('seq_len')} "
                   "(default 2048; longer than the plan's window, so that sharing matters)")
    a.add_argument("--lr", type=float, default=1e-3,
                   help=f"learning rate, {r('lr')} (default 1e-3; constant after 4 warm-up steps)")
    a.add_argument("--rank", type=int, default=8, help=f"LoRA rank, {r('rank')} (default 8)")
    a.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="projections that get LoRA")
    a.add_argument("--layers", choices=["changed", "all"], default="changed",
                   help="changed: layers with follower or streaming heads and their anchors (default); all")
    a.add_argument("--mode", choices=["scores", "keys"], help="sharing mode to train (default: the plan's)")
    a.add_argument("--retrieval-share", type=float, default=0.5, help=f"share of samples with planted facts "
                   f"recalled later, {r('retrieval_share')} (default 0.5)")
    a.add_argument("--proximal-weight", type=float, default=0.1, help=f"loss weight of positions the plan does not "
                   f"change (within the proximal window), {r('proximal_weight')} (default 0.1)")
    a.add_argument("--lm-weight", type=float, default=0.0, help=f"weight of the next-token loss beside the KL, "
                   f"{r('lm_weight')} (default 0)")
    a.add_argument("--checkpoint-every", type=int, default=20, help=f"steps between checkpoints, "
                   f"{r('checkpoint_every')} (default 20)")
    a.add_argument("--resume", action="store_true", help="continue the run in --out (also with a larger --tokens)")
    a.add_argument("--merge", action="store_true", help="also write merged weights to OUT/merged")
    a.add_argument("--device", default="cpu")
    a.add_argument("--seed", type=int, default=0, help=f"seed of the LoRA init and the sample order, {r('seed')}")
    a.set_defaults(func=_adapt)

    i = sub.add_parser("inspect", help="explain a plan: kinds, blocks, windows, savings by context, plots")
    i.add_argument("plan")
    i.add_argument("--context", type=int, help=f"context length to price, {r('context')} (default: the model's maximum)")
    i.add_argument("--batch", type=int, default=1, help=f"sequences, {r('batch')} (default 1)")
    i.add_argument("--dtype-bytes", type=int, default=2, choices=[1, 2, 4],
                   help="bytes per cached element (default 2: bf16/fp16)")
    i.add_argument("--plot", help="write a PNG: kinds per head, similarity heatmaps with blocks, the window curve")
    i.set_defaults(func=_inspect)

    e = sub.add_parser("eval", help="score a plan against the full cache and baselines on long-context tasks")
    e.add_argument("plan")
    e.add_argument("--task", nargs="+", default=["niah"], choices=["niah", "ruler", "ppl", "multikey", "multivalue",
                   "vartrack", "commonwords", "qa"], help="tasks (ruler = all five RULER-style tasks; ppl = "
                   "perplexity by position on --data)")
    e.add_argument("--all", action="store_true", help="niah, every RULER-style task, and ppl")
    e.add_argument("--data", nargs="+", help="text for --task ppl (default: the haystack, else the embedded corpus)")
    e.add_argument("--lengths", default="2k,4k", help=f"context lengths, each {r('lengths')} and, with the answer, "
                   "within the model's context, e.g. 1k,2k,4k (default 2k,4k)")
    e.add_argument("--depths", default="0,25,50,75,100", help=f"NIAH depths in percent, each {r('depths')}")
    e.add_argument("--ruler-depths", default="25,50",
                   help=f"depths of the planted facts for RULER-style tasks, percent, each {r('depths')}")
    e.add_argument("--methods", help="comma list (default all): " + ", ".join(_method_names()))
    e.add_argument("--haystack", help="directory of texts (default: the embedded corpus)")
    e.add_argument("--model", help="model to load (default: the plan's model name)")
    e.add_argument("--adapter", help="an adapted plan's adapter directory (from `ilc adapt`): the plan runs on the "
                   "weights with it merged, the full model and the baselines on the base weights")
    e.add_argument("--device", default="cpu")
    e.add_argument("--limit", type=int, help=f"at most this many samples per task, {r('limit')}")
    e.add_argument("--max-new-tokens", type=int, default=32, help=f"answer tokens, {r('max_new_tokens')} (default 32)")
    e.add_argument("--out", default="eval-out", help="output directory (results.jsonl is resumed)")
    e.add_argument("--plot", help="write the NIAH heatmaps, one per method, to this PNG")
    e.add_argument("--peers", help="a results JSONL from the kvpress runner (`make peers`, then "
                   "benchmarks/peers/kvpress_runner.py on OUT/prompts.jsonl): its presses join the table and plot")
    e.set_defaults(func=_eval)

    g = sub.add_parser("generate", help="run compressed generation with a plan and print the bytes saved")
    g.add_argument("plan")
    g.add_argument("--model", default="smollm2-135m")
    g.add_argument("--prompt-tokens", type=int, default=2000,
                   help=f"needle prompt length, {r('prompt_tokens')} and within the model's context (default 2000)")
    g.add_argument("--new-tokens", type=int, default=24, help=f"tokens to generate, {r('new_tokens')} (default 24)")
    g.set_defaults(func=_generate)
    return p


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # subparsers are _Parser too (add_subparsers uses the parent's class)
    except SystemExit as exc:  # usage errors (one line, exit 2) and --help (exit 0)
        return int(exc.code or 0)
    debug = args.debug or os.environ.get("ILC_DEBUG") == "1"
    name = f"ilc {args.command}"

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{name}: warning: {_one_line(message)}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = one_line_warning
            return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{name}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as exc:  # OptionError, PlanError, CalibrationDataError, missing or unwritable files
        if debug:
            raise
        print(f"{name}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug or an environment problem: still one line, the traceback on request
        if debug:
            raise
        print(f"{name}: internal error: {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
