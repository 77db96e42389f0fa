"""The headline curve: quality against KV memory on SmolLM2, mixed plans vs PoD-only plans vs StreamingLLM.

Calibrates once (embedded corpus, 4k tokens, prose + retrieval samples; every option of every head priced). For
each target saving (a share of the KV bytes at 4k) it builds the mixed plan (full / follower / streaming per head)
and the PoD-only plan (followers only; out of reach past ~36%), and evaluates them and StreamingLLM at the mixed
plan's bytes on the same prompts (`ilc.eval.config.headline_samples`), plus the full model and uniform blocks of 2 once, and
perplexity by position on one 4k text. KV bytes are measured after each run (2k/4k prompts) and on a real cache
after a 4k and an 8k prefill. A last row repeats the 30% mixed plan calibrated on prose only (no retrieval
samples). Every step resumes from its results.jsonl.

Run: python benchmarks/eval_sweep.py --out docs/eval-sweep --haystack ../shared/data/pg_essays
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import emit_table
from ilc.eval.baselines import equal_memory_window, streaming_plan, uniform_plan
from ilc.calibrate import CalibrationSettings, calibrate, regroup
from ilc.data import pack, read_documents
from ilc.eval.config import headline_samples
from ilc.eval.records import write_prompts
from ilc.eval.report import summarize
from ilc.eval.run import held_bytes, run, run_perplexity
from ilc.models import load_model, weights_dir

TARGETS = (0.2, 0.3, 0.4, 0.5, 0.6)
SEQ_LEN = 4096


def evaluate(model, tok, plan, methods, samples, out_dir, ppl_ids):
    recs = run(model, tok, plan, methods, samples, out_dir, progress=False)
    s = summarize(recs, methods)
    ppl_path = Path(out_dir, "perplexity.json")
    ppl = json.loads(ppl_path.read_text()) if ppl_path.exists() else run_perplexity(model, plan, methods, ppl_ids,
                                                                                   out_dir)
    for m in methods:
        s[m]["ppl"] = ppl[m]["all"]
    return s


def row(name, plan, s, kinds=""):
    b4, d4 = held_bytes(plan, 4096)
    b8, d8 = held_bytes(plan, 8192)
    return dict(name=name, kinds=kinds, saved_eval=s["kv_saved"], saved_4k=1 - b4 / d4, saved_8k=1 - b8 / d8,
                niah=s["niah"], ruler=s["ruler"], ppl=s["ppl"])


def main(out: str, lengths, depths, seeds, haystack: str | None, targets):
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok, src = load_model()
    base = calibrate(CalibrationSettings(seq_len=SEQ_LEN), model, tok, src.name, progress=False)
    docs = read_documents([haystack]) if haystack else None
    samples = headline_samples(tok, lengths, depths, seeds, docs)
    write_prompts(samples, out_dir, weights_dir(src))  # for the kvpress runner (benchmarks/peers)
    ppl_ids = pack(docs or [], tok, max(lengths), 1).samples if docs else None
    rows = []
    full = evaluate(model, tok, base.plan, ["full", "uniform-2"], samples, out_dir / "full", ppl_ids)
    rows.append(dict(name="full model", kinds="", saved_eval=0.0, saved_4k=0.0, saved_8k=0.0, niah=full["full"]["niah"],
                     ruler=full["full"]["ruler"], ppl=full["full"]["ppl"]))
    rows.append(row("uniform blocks of 2", uniform_plan(base.plan, 2), full["uniform-2"]))
    print(*rows, sep="\n", flush=True)
    for target in targets:
        tag = int(round(target * 100))
        mixed = regroup(base, CalibrationSettings(seq_len=SEQ_LEN, target_saving=target), SEQ_LEN)
        mixed.save(out_dir / f"plan-mixed-{tag}.yaml")
        s = evaluate(model, tok, mixed, ["plan", "streaming-equal"], samples, out_dir / f"mixed-{tag}", ppl_ids)
        counts = mixed.kind_counts()
        kinds = f"{counts['full']}/{counts['follower']}/{counts['streaming']}"
        rows.append(row(f"mixed {tag}%", mixed, s["plan"], kinds))
        rows.append(row(f"StreamingLLM at mixed {tag}% bytes", streaming_plan(mixed, equal_memory_window(mixed, 4096)),
                        s["streaming-equal"]))
        try:
            pod = regroup(base, CalibrationSettings(seq_len=SEQ_LEN, target_saving=target, kinds=("follower",)),
                          SEQ_LEN)
        except ValueError as exc:
            rows.append(dict(name=f"PoD-only {tag}%", unreachable=str(exc).split(";")[0]))
        else:
            pod.save(out_dir / f"plan-pod-{tag}.yaml")
            p = evaluate(model, tok, pod, ["plan"], samples, out_dir / f"pod-{tag}", ppl_ids)
            counts = pod.kind_counts()
            rows.append(row(f"PoD-only {tag}%", pod, p["plan"], f"{counts['full']}/{counts['follower']}/0"))
        print(*rows[-3:], sep="\n", flush=True)
    prose = calibrate(CalibrationSettings(seq_len=SEQ_LEN, retrieval_samples=0, target_saving=0.3), model, tok,
                      src.name, progress=False).plan
    prose.save(out_dir / "plan-mixed-30-prose-only.yaml")
    s = evaluate(model, tok, prose, ["plan"], samples, out_dir / "mixed-30-prose-only", ppl_ids)
    counts = prose.kind_counts()
    rows.append(row("mixed 30%, calibrated on prose only", prose, s["plan"],
                    f"{counts['full']}/{counts['follower']}/{counts['streaming']}"))
    write(rows, out_dir, lengths, depths, seeds)


def selection_rows(out: str, lengths, depths, seeds, haystack: str | None, targets, keeps, scorer: str = "snapkv"):
    """PoD + token selection: for each target, the mixed plan with selection (`keeps`: share of distant tokens full
    heads keep) and selection alone at the same bytes (`selection-equal`), on the sweep's prompts (records and
    plans under out/selection-*; `benchmarks/peers_table.py` puts them beside kvpress)."""
    from ilc.eval.baselines import equal_memory_selection, selection_plan

    out_dir = Path(out)
    model, tok, src = load_model()
    base = calibrate(CalibrationSettings(seq_len=SEQ_LEN), model, tok, src.name, progress=False)
    docs = read_documents([haystack]) if haystack else None
    samples = headline_samples(tok, lengths, depths, seeds, docs)
    ppl_ids = pack(docs or [], tok, max(lengths), 1).samples if docs else None
    for target, keep in zip(targets, keeps):
        tag = int(round(target * 100))
        plan = regroup(base, CalibrationSettings(seq_len=SEQ_LEN, target_saving=target, keep=keep, scorer=scorer,
                                                 free_selection=True), SEQ_LEN)  # as docs/eval-sweep's plans were
        plan.save(out_dir / f"plan-selection-{tag}.yaml")
        s = evaluate(model, tok, plan, ["plan", "selection-equal"], samples, out_dir / f"selection-{tag}", ppl_ids)
        alone = selection_plan(plan, equal_memory_selection(plan, SEQ_LEN))
        print(row(f"mixed + selection {tag}%", plan, s["plan"], str(plan.kind_counts())),
              row(f"selection alone at its bytes (keep {alone.selection.keep:.3f})", alone, s["selection-equal"]),
              sep="\n", flush=True)


def add_plan(out: str, path: str, name: str, lengths, depths, seeds, haystack: str | None):
    """Evaluate one more plan file on the sweep's prompts and add its row to the sweep's table and curve."""
    from ilc.runtime import load_plan

    out_dir = Path(out)
    rows = json.loads((out_dir / "sweep.json").read_text())
    plan = load_plan(path)
    model, tok, _ = load_model()
    docs = read_documents([haystack]) if haystack else None
    samples = headline_samples(tok, lengths, depths, seeds, docs)
    ppl_ids = pack(docs or [], tok, max(lengths), 1).samples if docs else None
    s = evaluate(model, tok, plan, ["plan"], samples, out_dir / f"added-{Path(path).stem}", ppl_ids)
    counts = plan.kind_counts()
    rows = [r for r in rows if r["name"] != name] + [row(name, plan, s["plan"], f"{counts['full']}/"
                                                          f"{counts['follower']}/{counts['streaming']}")]
    write(rows, out_dir, lengths, depths, seeds)


def write(rows, out_dir: Path, lengths, depths, seeds):
    n_niah = len(lengths) * len(depths) * len(seeds)
    lines = [f"NIAH: {n_niah} prompts ({len(lengths)} lengths x {len(depths)} depths x {len(seeds)} needles); "
             f"RULER-style: 5 tasks x {len(lengths)} lengths; perplexity: one {max(lengths)}-token text. "
             "KV saved: measured after each eval run (mean over its prompts), and on a real cache after a 4k / 8k "
             "prefill. Kinds: full / follower / streaming (layer, KV head) pairs.", "",
             "| method | kinds | KV saved (eval prompts) | saved at 4k | saved at 8k | NIAH | RULER | perplexity |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "unreachable" in r:
            lines.append(f"| {r['name']} | | out of reach: {r['unreachable']} | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['kinds']} | {r['saved_eval']:.1%} | {r['saved_4k']:.1%} | "
                     f"{r['saved_8k']:.1%} | {r['niah']:.1f} | {r['ruler']:.1f} | {r['ppl']:.2f} |")
    emit_table(lines, out_dir / "sweep.md")
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out_dir / "curve.png", lengths)


def plot(rows, path: Path, lengths):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = rows[0]
    series = {"mixed plan (full / follower / streaming per head)": ("mixed ", "o-"),
              "PoD-only plan": ("PoD-only", "^-"), "StreamingLLM, same bytes as mixed": ("StreamingLLM", "s--"),
              "uniform blocks": ("uniform", "x:")}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "niah", "NIAH"), (axes[1], "ruler", "RULER-style")):
        for name, (prefix, style) in series.items():
            pts = sorted((100 * r["saved_4k"], r[key]) for r in rows if r["name"].startswith(prefix)
                         and "unreachable" not in r and "prose" not in r["name"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        ax.axhline(full[key], color="gray", linestyle=":", label="full cache")
        ax.set_xlabel("KV bytes saved at 4k (%, measured)")
        ax.set_ylabel(f"{label} score")
        ax.set_ylim(-5, 105)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M-Instruct, {'/'.join(str(n) for n in lengths)}-token prompts, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/eval-sweep")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--depths", default="10,30,50,70,90", help="NIAH depths in percent")
    ap.add_argument("--seeds", default="0,1,2", help="one needle per seed")
    ap.add_argument("--targets", default=",".join(str(int(t * 100)) for t in TARGETS), help="percent")
    ap.add_argument("--haystack", help="directory of texts (default: the embedded corpus)")
    ap.add_argument("--add-plan", help="only evaluate this plan file on the sweep's prompts and add it as a row")
    ap.add_argument("--name", help="the added plan's row name (default: the file name)")
    ap.add_argument("--selection", help="only run PoD + token selection at these targets (percent, e.g. 50,75,90) "
                    "and selection alone at the same bytes; add them as rows")
    ap.add_argument("--keep", default="0.3,0.2,0.1", help="with --selection: share of distant tokens kept, per target")
    a = ap.parse_args()
    grid = (tuple(int(x) for x in a.lengths.split(",")), tuple(float(x) / 100 for x in a.depths.split(",")),
            tuple(int(x) for x in a.seeds.split(",")))
    if a.selection:
        selection_rows(a.out, *grid, a.haystack, [float(x) / 100 for x in a.selection.split(",")],
                       [float(x) for x in a.keep.split(",")])
    elif a.add_plan:
        add_plan(a.out, a.add_plan, a.name or Path(a.add_plan).name, *grid, a.haystack)
    else:
        main(a.out, *grid, a.haystack, tuple(float(x) / 100 for x in a.targets.split(",")))
