"""The headline curve: quality against KV memory for SmolLM2, PoD plans vs StreamingLLM at equal memory.

Calibrates once (embedded corpus, 4k tokens), builds plans for target savings of 20/30/35/40/50% at 8k (the
same similarity matrices, regrouped; 50% is out of reach by construction: sharing keys saves less than half),
and evaluates each plan and StreamingLLM at the plan's bytes on the same NIAH and RULER-style samples as
`ilc eval`, plus the full model once. Writes a table and a PNG.

Run: python benchmarks/eval_sweep.py --out docs/eval-sweep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import emit_table
from ilc.data import read_documents
from ilc.calibrate import CalibrationSettings, calibrate, regroup
from ilc.evaluate import RULER_TASKS, EvalConfig, build_samples, run, summarize
from ilc.models import load_model

TARGETS = (0.2, 0.3, 0.35, 0.4, 0.5)


def main(out: str, lengths: tuple[int, ...], depths: tuple[float, ...], haystack: str | None, full_dir: str | None):
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok, src = load_model()
    base = calibrate(CalibrationSettings(seq_len=4096), model, tok, src.name, progress=False)
    config = EvalConfig(lengths=lengths, depths=depths, ruler_depths=(0.25,))
    docs = read_documents([haystack]) if haystack else None
    samples = build_samples(["niah", *RULER_TASKS], tok, config, docs)
    full_records = run(model, tok, base.plan, ["full"], samples, full_dir or out_dir / "full", progress=False)
    full = summarize(full_records, ["full"])["full"]
    rows = [("full model", 0.0, full["niah"], full["ruler"], "", "")]
    print(rows[-1], flush=True)
    for target in TARGETS:
        settings = CalibrationSettings(seq_len=4096, target_saving=target)
        try:
            plan = regroup(base, settings, 8192)
        except ValueError as exc:
            rows.append((f"target {target:.0%}", None, None, None, str(exc).split(":")[0], ""))
            print(rows[-1], flush=True)
            continue
        plan.save(out_dir / f"plan-{int(target * 100)}.yaml")
        recs = run(model, tok, plan, ["plan", "streaming-equal"], samples, out_dir / f"t{int(target * 100)}",
                   progress=False)
        s = summarize(recs, ["plan", "streaming-equal"])
        p, st = s["plan"], s["streaming-equal"]
        rows.append((f"target {target:.0%}", p["kv_saved"], p["niah"], p["ruler"], st["niah"], st["ruler"]))
        print(rows[-1], flush=True)
    write(rows, out_dir, full, lengths)


def write(rows, out_dir: Path, full: dict, lengths):
    lines = ["| plan | KV saved (measured) | PoD NIAH | PoD RULER | StreamingLLM same bytes NIAH | "
             "StreamingLLM same bytes RULER |", "|---|---|---|---|---|---|"]
    for name, saved, niah, ruler, sn, sr in rows:
        if saved is None:
            lines.append(f"| {name} | out of reach | | | | |")
        else:
            fmt = lambda x: f"{x:.1f}" if isinstance(x, float) else x  # noqa: E731
            lines.append(f"| {name} | {saved:.1%} | {fmt(niah)} | {fmt(ruler)} | {fmt(sn)} | {fmt(sr)} |")
    emit_table(lines, out_dir / "sweep.md")
    (out_dir / "sweep.json").write_text(json.dumps(rows))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows[1:] if r[1] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, k, label in ((axes[0], 2, "NIAH"), (axes[1], 3, "RULER-style")):
        ax.plot([100 * r[1] for r in pts], [r[k] for r in pts], "o-", label="PoD plan (scores mode)")
        ax.plot([100 * r[1] for r in pts], [r[k + 2] for r in pts], "s--", label="StreamingLLM, same bytes")
        ax.axhline(full["niah" if k == 2 else "ruler"], color="gray", linestyle=":", label="full cache")
        ax.set_xlabel("KV saved at the eval lengths (%)")
        ax.set_ylabel(f"{label} score")
        ax.set_ylim(-5, 105)
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct, {'/'.join(str(n) for n in lengths)} tokens, CPU")
    fig.tight_layout()
    fig.savefig(out_dir / "curve.png", dpi=90)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/eval-sweep")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--depths", default="25,50")
    ap.add_argument("--haystack", help="directory of texts (default: the embedded corpus)")
    ap.add_argument("--full-from", help="reuse the full model's records from this `ilc eval` output directory")
    a = ap.parse_args()
    main(a.out, tuple(int(x) for x in a.lengths.split(",")), tuple(float(x) / 100 for x in a.depths.split(",")),
         a.haystack, a.full_from)
