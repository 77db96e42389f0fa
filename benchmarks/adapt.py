"""Does `ilc adapt` close the quality gap of a training-free plan, and how fast? (docs/adapt.md)

Stage `train`: `ilc adapt` on SmolLM2 for a scores-mode plan and the same blocks in keys mode, at growing token
budgets (each budget resumes the previous one's run: the learning rate is constant after warm-up, so the run of a
larger budget passes through the smaller one). Stage `evaluate`: for the full model, StreamingLLM at the plan's
bytes, and each plan before and after adaptation, on the same inputs: KL to the full model and perplexity by
position on held-apart text (the embedded Austen corpus, never trained on), and NIAH + RULER-style prompts (the
sweep's prompts of seed 0, on the pg_essays haystack). Stage `table`: docs/adapt.md.

    python benchmarks/adapt.py train --budgets 16384,65536
    python benchmarks/adapt.py train --budgets 16384,65536,131072 --modes keys
    python benchmarks/adapt.py evaluate --budgets 16384,65536,131072
    python benchmarks/adapt.py table --budgets 16384,65536,131072    # the table of docs/adapt.md
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "plans" / "smollm2-135m-pod-30pct.yaml"
HAYSTACK = ROOT.parent / "shared" / "data" / "pg_essays"
MODES = ("scores", "keys")


def run_dir(runs: Path, mode: str, tokens: int) -> Path:
    return runs / f"{mode}-{tokens}"


def train(args) -> None:
    runs = Path(args.runs)
    previous = {}
    for tokens in args.budgets:  # every mode's smaller budget first, so that its evaluation can start
        for mode in args.modes:
            out = run_dir(runs, mode, tokens)
            if (out / "plan.yaml").exists():
                previous[mode] = out
                continue
            cmd = [sys.executable, "-m", "ilc.cli", "adapt", "smollm2-135m", "--plan", str(PLAN), "--data",
                   str(HAYSTACK), "--out", str(out), "--tokens", str(tokens), "--mode", mode, "--lr", str(args.lr),
                   "--checkpoint-every", "4"]
            if mode in previous and not out.exists():
                shutil.copytree(previous[mode], out)  # extend the smaller budget's run
            if out.exists():
                cmd.append("--resume")
            print(" ".join(cmd[1:]), flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True)
            (out / "wall_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
            previous[mode] = out


def variants(runs: Path, budgets: list[int]):
    """(name, method of `ilc eval`, run directory or None, mode): the baselines, then each mode before and after."""
    yield "full", "full", None, None
    yield "streaming-equal", "streaming-equal", None, None
    for mode in MODES:
        yield f"{mode}, training-free", "plan" if mode == "scores" else "plan-keys", None, mode
        for tokens in budgets:
            yield f"{mode}, adapted {tokens // 1024}k tokens", "plan", run_dir(runs, mode, tokens), mode


def held_apart(tok, length: int = 4096):
    """The embedded Austen chapters (never trained on: training reads the pg_essays), packed to `length`."""
    from ilc.data import default_corpus, pack

    return pack(default_corpus(), tok, length).samples


def log_probs(model, row):
    """Next-token log-probabilities [T, V] of one row of token ids."""
    import torch

    with torch.no_grad():
        return model(row[None]).logits[0].float().log_softmax(-1)


def position_stats(model, ids, reference):
    """(nll [n, T-1], KL(reference || model) [n, T]) per position of each row; `reference`: the full model's
    log-probabilities per row. One row's log-probabilities are held at a time."""
    import torch

    nll, kl = [], []
    for row, ref in zip(ids, reference):
        lp = log_probs(model, row)
        nll.append(-lp[:-1].gather(-1, row[1:, None])[:, 0])
        kl.append((ref.exp() * (ref - lp)).sum(-1))
    return torch.stack(nll), torch.stack(kl)


def evaluate(args) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ilc.eval.config import headline_samples

    from ilc.data import read_documents
    from ilc.eval.methods import applied
    from ilc.eval.report import summarize
    from ilc.eval.run import run
    from ilc.models import load_model
    from ilc.runtime import load_plan, remove_plan

    runs = Path(args.runs)
    base_plan = load_plan(PLAN)
    model, tok, _ = load_model("smollm2-135m")
    samples = headline_samples(tok, (2048, 4096), (0.0, 0.25, 0.5, 0.75, 1.0), (0,), read_documents([HAYSTACK]))
    ids = held_apart(tok)
    reference = [log_probs(model, row) for row in ids]
    start = base_plan.sinks + base_plan.window
    for name, method, run_path, mode in variants(runs, args.budgets):
        out = runs / "eval" / name.replace(", ", "-").replace(" ", "-")
        if (out / "row.json").exists():
            continue
        if run_path is not None and not (run_path / "plan.yaml").exists():
            print(f"{name}: not trained yet ({run_path}); run the train stage, then this one again", flush=True)
            continue
        model, tok, _ = load_model("smollm2-135m")
        plan = base_plan
        if run_path is not None:
            plan = load_plan(run_path / "plan.yaml")
            plan.apply(model, adapter=run_path / "adapter")  # merges the adapter into the weights
            remove_plan(model)
        t0 = time.time()
        with applied(method, model, plan, ids.shape[1]):
            nll, kl = position_stats(model, ids, reference)
        records = run(model, tok, plan, [method], samples, out, progress=False)
        summary = summarize(records, [method])[method]
        bucket = lambda t, lo, hi: float(t[:, lo:hi].mean())  # noqa: E731
        row = dict(name=name, method=method, mode=mode, run=str(run_path) if run_path else None,
                   tokens=plan.adapted.tokens if plan.adapted else 0,
                   kl_trained_len=bucket(kl, start, 2048), kl_longer=bucket(kl, 2048, ids.shape[1]),
                   ppl={f"{lo}-{hi}": math.exp(bucket(nll, lo, hi)) for lo, hi in ((0, start), (start, 2048),
                                                                                 (2048, ids.shape[1] - 1))},
                   niah=summary["niah"], ruler=summary["ruler"], kv_saved=summary["kv_saved"],
                   per_task=summary["per_task"], seconds=time.time() - t0)
        if run_path is not None:
            log = [json.loads(line) for line in (run_path / "log.jsonl").read_text().splitlines()]
            row["train_loss_first_last"] = [log[0]["loss"], sum(r["loss"] for r in log[-10:]) / len(log[-10:])]
            row["train_wall_s"] = sum(float((d / "wall_seconds.txt").read_text()) for d in _lineage(runs, mode,
                                                                                                   row["tokens"]))
        (out / "row.json").write_text(json.dumps(row, indent=1))
        print(json.dumps({k: row[k] for k in ("name", "kl_trained_len", "kl_longer", "niah", "ruler", "kv_saved")}),
              flush=True)


def _lineage(runs: Path, mode: str, tokens: int) -> list[Path]:
    """The run directories whose training a run of `tokens` continued (each budget resumes the previous)."""
    return [d for d in sorted(runs.glob(f"{mode}-*"), key=lambda d: int(d.name.split("-")[1]))
            if d.name.split("-")[1].isdigit() and int(d.name.split("-")[1]) <= tokens]


def table(args) -> None:
    runs = Path(args.runs)
    rows = []
    for name, *_ in variants(runs, args.budgets):
        path = runs / "eval" / name.replace(", ", "-").replace(" ", "-") / "row.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
    full = next(r for r in rows if r["name"] == "full")
    buckets = list(full["ppl"])
    lines = ["| variant | trained tokens | training time | KL to full, tokens " + " | KL, tokens ".join(
                 ["660-2048", "2048-4096"]) + " | " + " | ".join(f"ppl {b}" for b in buckets)
             + " | NIAH | RULER | KV saved |",
             "|---|---|---|---|---|" + "---|" * len(buckets) + "---|---|---|"]
    for r in rows:
        train = f"{r['train_wall_s'] / 60:.0f} min ({r['tokens'] / r['train_wall_s']:.0f} tok/s)" \
            if r.get("train_wall_s") else ""
        kl = [max(0.0, r[k]) for k in ("kl_trained_len", "kl_longer")]  # an exact match can round to -1e-10
        lines.append(f"| {r['name']} | {r['tokens'] or ''} | {train} | {kl[0]:.4f} | {kl[1]:.4f} | " + " | ".join(f"{r['ppl'][b]:.2f}" for b in buckets)
                     + f" | {r['niah']:.0f} | {r['ruler']:.1f} | {r['kv_saved']:.1%} |")
    text = "\n".join(lines)
    print(text)
    (runs / "table.md").write_text(text + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=["train", "evaluate", "table"])
    p.add_argument("--budgets", default="16384,65536")
    p.add_argument("--runs", default=str(ROOT / "out" / "adapt-bench"))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--modes", default=",".join(MODES), help="modes to train (default: both)")
    args = p.parse_args()
    args.budgets = [int(x) for x in args.budgets.split(",")]
    args.modes = [m for m in args.modes.split(",") if m]
    {"train": train, "evaluate": evaluate, "table": table}[args.stage](args)


if __name__ == "__main__":
    main()
