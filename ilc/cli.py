"""`ilc`: the command line. `calibrate` writes a plan, `inspect` explains one, `adapt` trains the model to run it,
`eval` scores one, `generate` runs one, `serve` serves one with vLLM.

Every option is checked against its range (`ilc.options`) and every output path for writability before any model
is loaded. Errors print one line and exit 2; Ctrl-C exits 130; `--debug` (or ILC_DEBUG=1) shows tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .options import OptionError, add_options, check_device, check_writable, from_args, help_range, plot_path

EXIT_USAGE, EXIT_INTERRUPTED, EXIT_INTERNAL = 2, 130, 1


def calibration_settings(args):
    """The `CalibrationSettings` of parsed `ilc calibrate` arguments, validated (no work done)."""
    from .calibrate import CalibrationSettings

    settings = from_args(CalibrationSettings, args)
    settings.validate()
    return settings


def _calibrate(args) -> int:
    from .calibrate import calibrate
    from .inspect_plan import format_plan

    settings = calibration_settings(args)
    check_device(args.device)
    check_writable(args.out, "--out")
    result = calibrate(settings)  # reads the data and the model's context before the weights
    out = result.plan.save(args.out)
    print(format_plan(result.plan))
    print(f"\nwrote {out} in {result.seconds:.1f} s")
    return 0


def adapt_config(args):
    """The `AdaptConfig` of parsed `ilc adapt` arguments, validated (no work done)."""
    from .adapt import AdaptConfig

    config = from_args(AdaptConfig, args)
    config.validate()
    return config


def _adapt(args) -> int:
    """Checked before the weights load: the options, --out, the plan (and that it changes something within
    --seq-len), --seq-len against the model's context, and the training text (packed with the model's tokenizer)."""
    from ilc.runtime.plan import load_plan

    from .adapt import adapt, check_out_dir, check_plan, training_samples
    from .data import default_corpus, read_documents
    from .models import load_model, load_tokenizer, model_context

    config = adapt_config(args)
    check_device(args.device)
    check_writable(args.out, "--out", directory=True)
    check_out_dir(Path(args.out), args.resume)
    plan = load_plan(args.plan)
    check_plan(plan, config)
    config.validate(model_context(args.model))
    docs = read_documents(args.data) if args.data else default_corpus()
    samples = training_samples(load_tokenizer(args.model), docs, config)
    model, tokenizer, _ = load_model(args.model, args.device)
    result = adapt(model, tokenizer, plan, config, args.out, docs=docs, resume=args.resume, merge=args.merge,
                   samples=samples)
    a = result.plan.adapted
    print(f"adapted {a.steps} steps ({a.tokens} tokens, {result.tokens_per_second:.0f} tokens/s this run): "
          f"loss {a.loss_initial:.4f} -> {a.loss_final:.4f}; wrote {result.out}/plan.yaml and {result.out}/adapter")
    return 0


def _inspect(args) -> int:
    from ilc.runtime.plan import load_plan

    from .inspect_plan import InspectOptions, check_options, format_plan, plot_plan

    options = from_args(InspectOptions, args)
    check_options(options)
    plan = load_plan(args.plan)
    print(format_plan(plan, context=options.context, dtype_bytes=options.dtype_bytes, batch=options.batch))
    if options.plot:
        print(f"wrote {plot_plan(plan, options.plot)}")
    return 0


def eval_request(args):
    """(plan, tasks, methods, EvalConfig, wants perplexity) of parsed `ilc eval` arguments, validated; the --peers
    file and the records to resume in --out are checked too (no model, no sample; --plot's format: the parser)."""
    from ilc.runtime.plan import load_plan

    from .eval.config import EvalConfig
    from .eval.methods import METHODS
    from .eval.records import read_records
    from .eval.tasks import RULER_TASKS, TASKS

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
    if args.peers:
        read_records(args.peers, "--peers")
    read_records(Path(args.out, "results.jsonl"), "resumed records")
    plan = load_plan(args.plan)
    config.validate(plan.model.max_context)
    methods = _adapted_methods(args, plan, methods)
    chosen = [*TASKS, "ppl"] if args.all else args.task  # ruler: every RULER-style task; ppl: perplexity
    tasks = [t for g in chosen for t in (RULER_TASKS if g == "ruler" else [g])]
    return plan, [t for t in tasks if t != "ppl"], methods, config, "ppl" in tasks


def _adapted_methods(args, plan, methods: list[str]) -> list[str]:
    """An adapted plan needs its adapter and runs in the mode it was adapted for (unless --methods says)."""
    from .eval.methods import METHODS

    if plan.adapted is None:
        if args.adapter:
            raise OptionError(f"--adapter: {args.plan} has no adapted: section (pass the plan `ilc adapt` wrote)")
        return methods
    from ilc.runtime.adapter import adapter_fingerprint

    if args.adapter and adapter_fingerprint(args.adapter) != plan.adapted.adapter:
        raise OptionError(f"--adapter {args.adapter} is not the adapter {args.plan} was adapted with")
    if not args.adapter:
        raise OptionError(f"{args.plan} is an adapted plan: pass --adapter DIR (the adapter `ilc adapt` wrote); "
                          "the full model and the baselines run on the base weights")
    if args.methods:
        return methods
    return [m for m in methods if not (METHODS[m].mode and METHODS[m].mode != plan.adapted.mode)]


def _eval(args) -> int:
    """Everything that can be refused is checked before the model loads (options, --peers, resumed records, the
    prompts: each task's minimum length, the haystack's size), the plan against the model right after it loads."""
    from .data import read_documents
    from .eval.config import build_samples
    from .models import load_tokenizer

    plan, tasks, methods, config, want_ppl = eval_request(args)
    haystack = read_documents([args.haystack]) if args.haystack else None
    name = args.model or plan.model.name
    tokenizer = load_tokenizer(name)
    samples = build_samples(tasks, tokenizer, config, haystack) if tasks else []
    peers = _eval_peers(args, samples) if tasks and args.peers else []
    ppl_ids = _perplexity_text(args, tokenizer, config, haystack) if want_ppl else None
    model, adapted_model, model_dir = _eval_models(args, plan, name)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if tasks:
        _eval_tasks(args, plan, tasks, methods, config, samples, peers, (model, tokenizer, adapted_model), model_dir)
    if want_ppl:
        _eval_perplexity(args, plan, methods, config, ppl_ids, model, adapted_model)
    return 0


def _eval_peers(args, samples) -> list[dict]:
    from .eval.records import read_peer_records

    peers = read_peer_records(args.peers, samples)
    if not peers:
        raise OptionError(f"--peers {args.peers}: no records for these prompts (run the peer runner on "
                          f"{Path(args.out, 'prompts.jsonl')} first)")
    return peers


def _perplexity_text(args, tokenizer, config, haystack):
    """The one text perplexity runs on: the longest length's worth of --data, else the haystack or the corpus."""
    from .data import default_corpus, pack, read_documents

    docs = read_documents(args.data) if args.data else (haystack or default_corpus())
    return pack(docs, tokenizer, max(config.lengths), 1).samples


def _eval_models(args, plan, name: str):
    """(model, adapted model or None, weights directory), the plan checked against the model's fingerprints before
    any method runs."""
    from ilc.runtime import check_plan_matches, remove_plan

    from .models import load_model, weights_dir

    model, _, source = load_model(name, args.device)
    check_plan_matches(plan, model)
    if plan.adapted is None:
        return model, None, weights_dir(source)
    # a second copy of the weights, with the adapter merged, runs the plan itself
    adapted_model = plan.apply(load_model(name, args.device)[0], adapter=args.adapter)
    remove_plan(adapted_model)
    return model, adapted_model, weights_dir(source)


def _eval_tasks(args, plan, tasks, methods, config, samples, peers, models, model_dir) -> None:
    import json

    from .eval.records import merge_peers, write_prompts
    from .eval.report import format_summary, plot_niah, summarize
    from .eval.run import run

    model, tokenizer, adapted_model = models
    write_prompts(samples, args.out, model_dir)
    records = run(model, tokenizer, plan, methods, samples, args.out, config.max_new_tokens,
                  adapted_model=adapted_model)
    if peers:
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


def _eval_perplexity(args, plan, methods, config, ids, model, adapted_model) -> None:
    from .eval.report import format_perplexity
    from .eval.run import run_perplexity

    ppl = run_perplexity(model, plan, methods, ids, args.out, adapted_model)
    text = format_perplexity(ppl, f"Perplexity by position, one {max(config.lengths)}-token text "
                                  f"({', '.join(args.data) if args.data else args.haystack or 'embedded corpus'})")
    Path(args.out, "perplexity.md").write_text(text + "\n")
    print(text)


def _tokens(text: str, name: str) -> int:
    text = text.strip().lower()
    try:
        return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
    except (ValueError, OverflowError):  # OverflowError: infk, 1e999k
        raise OptionError(f"{name}: expected token counts like 2k,4k or 2048, got {text!r}") from None


def _number(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise OptionError(f"{name}: expected numbers separated by commas, got {text!r}") from None


def _generate(args) -> int:
    from .demo import GenerateOptions, compressed_generation

    compressed_generation(args.plan, from_args(GenerateOptions, args))  # checks the request before the model loads
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit 2), not a usage block."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `ilc` parser. The options of a command that has a settings dataclass come from its fields (type, default,
    help, choices; ranges from `ilc.options.RANGES`), choices from the registries they name."""
    p = _Parser(prog="ilc", description="Inter-layer KV-cache compression (PoD) for HF causal LMs")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks on errors (also: ILC_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_calibrate_parser, _adapt_parser, _inspect_parser, _eval_parser, _generate_parser, _serve_parser):
        add(sub)
    return p


def _calibrate_parser(sub) -> None:
    from .calibrate import CalibrationSettings

    c = sub.add_parser("calibrate", help="measure attention on sample text and write a compression plan")
    add_options(c, CalibrationSettings)
    c.add_argument("--out", default="plan.yaml", help="plan file to write; default plan.yaml")
    c.set_defaults(func=_calibrate)


def _adapt_parser(sub) -> None:
    from .adapt import AdaptConfig
    from .models import DEFAULT_DEVICE, DEFAULT_MODEL

    a = sub.add_parser("adapt", help="train LoRA adapters so that the model keeps its quality under a plan "
                       "(self-distillation from the full model)")
    a.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"the model the plan was calibrated for; default {DEFAULT_MODEL}")
    a.add_argument("--plan", required=True, help="the plan to adapt the model to")
    a.add_argument("--data", nargs="+", help="training text: .txt files, directories, .jsonl (use more text than the "
                   "token budget needs); default: the embedded corpus")
    a.add_argument("--out", required=True, help="output directory: adapter/, plan.yaml (adapted), checkpoint.pt")
    add_options(a, AdaptConfig)
    a.add_argument("--resume", action="store_true", help="continue the run in --out (also with a larger --tokens)")
    a.add_argument("--merge", action="store_true", help="also write merged weights to OUT/merged")
    a.add_argument("--device", default=DEFAULT_DEVICE, help=f"torch device; default {DEFAULT_DEVICE}")
    a.set_defaults(func=_adapt)


def _inspect_parser(sub) -> None:
    from .inspect_plan import InspectOptions

    i = sub.add_parser("inspect", help="explain a plan: kinds, blocks, windows, savings by context, plots")
    i.add_argument("plan")
    add_options(i, InspectOptions)
    i.set_defaults(func=_inspect)


def _eval_parser(sub) -> None:
    from .eval.methods import METHODS
    from .eval.tasks import TASKS
    from .models import DEFAULT_DEVICE

    r = help_range
    groups = sorted({t.group for t in TASKS.values()} - set(TASKS))
    e = sub.add_parser("eval", help="score a plan against the full cache and baselines on long-context tasks")
    e.add_argument("plan")
    e.add_argument("--task", nargs="+", default=["niah"], choices=[*TASKS, *groups, "ppl"],
                   help="tasks; " + "; ".join(f"{g} = every {g} task ("
                                              + ", ".join(n for n, t in TASKS.items() if t.group == g) + ")"
                                              for g in groups)
                   + "; ppl = perplexity by position on --data; default niah")
    e.add_argument("--all", action="store_true", help="every task, and ppl")
    e.add_argument("--data", nargs="+", help="text for --task ppl (default: the haystack, else the embedded corpus)")
    e.add_argument("--lengths", default="2k,4k", help=f"context lengths, each {r('lengths')} and, with the answer, "
                   "within the model's context, e.g. 1k,2k,4k (default 2k,4k)")
    e.add_argument("--depths", default="0,25,50,75,100", help=f"NIAH depths in percent, each {r('depths')} "
                   "(default 0,25,50,75,100)")
    e.add_argument("--ruler-depths", default="25,50", help=f"depths of the planted facts for RULER-style tasks, "
                   f"percent, each {r('depths')} (default 25,50)")
    e.add_argument("--methods", help="comma list (default all): " + ", ".join(METHODS))
    e.add_argument("--haystack", help="directory of texts (default: the embedded corpus)")
    e.add_argument("--model", help="model to load (default: the plan's model name)")
    e.add_argument("--adapter", help="an adapted plan's adapter directory (from `ilc adapt`): the plan runs on the "
                   "weights with it merged, the full model and the baselines on the base weights")
    e.add_argument("--device", default=DEFAULT_DEVICE, help=f"torch device; default {DEFAULT_DEVICE}")
    e.add_argument("--limit", type=int, help=f"at most this many samples per task, {r('limit')} (default: all)")
    e.add_argument("--max-new-tokens", type=int, default=32, help=f"answer tokens, {r('max_new_tokens')} (default 32)")
    e.add_argument("--out", default="eval-out", help="output directory (results.jsonl is resumed; default eval-out)")
    e.add_argument("--plot", type=plot_path, help="write the NIAH heatmaps, one per method, to this file (the "
                   "suffix names the format, e.g. .png)")
    e.add_argument("--peers", help="a results JSONL from the kvpress runner (`make peers`, then "
                   "benchmarks/peers/kvpress_runner.py on OUT/prompts.jsonl): its presses join the table and plot")
    e.set_defaults(func=_eval)


def _generate_parser(sub) -> None:
    from .demo import GenerateOptions

    g = sub.add_parser("generate", help="run compressed generation with a plan and print the bytes saved")
    g.add_argument("plan")
    add_options(g, GenerateOptions)
    g.set_defaults(func=_generate)


def _serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve a plan with vLLM's OpenAI-compatible server (needs `make vllm`); "
                       "options ilc does not know go to `vllm serve`, e.g. --port 8000")
    s.add_argument("plan")
    s.add_argument("--model", help="Hugging Face directory or embedded name (default: the plan's model)")
    s.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="tensor-parallel ranks; every head group of every layer must split evenly (default 1)")
    s.set_defaults(func=_serve)


def _serve(args) -> int:
    from .serve import serve_argv

    argv = serve_argv(args.plan, args.model, args.tensor_parallel_size, args.vllm_args)
    print("ilc serve: " + " ".join(argv[1:]), flush=True)
    os.execv(argv[0], argv)
    return 0  # not reached: vLLM replaced this process


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)  # subparsers are _Parser too (the parent's class)
        if extra and args.command != "serve":  # only `serve` passes options on (to vLLM)
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.vllm_args = extra
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
