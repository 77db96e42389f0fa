"""NIAH alone on the 10 prompts of docs/bits (2k and 4k x 5 depths) for one seed: a plan file against the full
model, with optional overrides of the plan's token selection. For checking a choice made on seed 0's prompts on
held-apart ones (another seed: other needles, other haystack offsets).

Run: OMP_NUM_THREADS=1 python benchmarks/niah_check.py plans/smollm2-135m-90pct.yaml --seed 1 \\
         --haystack ../shared/data/pg_essays --out /tmp/niah-seed1 [--selection window=64]
"""

from __future__ import annotations

import argparse
import dataclasses

from ilc.data import read_documents
from ilc.eval.config import headline_samples
from ilc.eval.report import summarize
from ilc.eval.run import run
from ilc.models import load_model
from ilc.runtime import load_plan

SELECTION_FIELDS = {"keep": float, "scorer": str, "window": int, "pool": int}


def main(args):
    model, tok, _ = load_model()
    plan = load_plan(args.plan)
    if args.selection:
        fields = dict(kv.split("=") for kv in args.selection.split(","))
        plan = plan.with_options(selection=dataclasses.replace(
            plan.selection, **{k: SELECTION_FIELDS[k](v) for k, v in fields.items()}))
    docs = read_documents([args.haystack]) if args.haystack else None
    samples = [s for s in headline_samples(tok, (2048, 4096), (0.0, 0.25, 0.5, 0.75, 1.0), (args.seed,), docs)
               if s.task == "niah"]
    records = run(model, tok, plan, ["full", "plan"], samples, args.out, progress=False)
    for r in records:
        print(r["method"], r["length"], r["depth"], r["score"], repr(r["text"][-24:]))
    summary = summarize(records, ["full", "plan"])
    print(f"NIAH, seed {args.seed}: full model {summary['full']['niah']:.0f}, plan {summary['plan']['niah']:.0f} "
          f"({summary['plan']['kv_saved']:.1%} saved per prompt)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--haystack")
    ap.add_argument("--out", required=True)
    ap.add_argument("--selection", help="override the plan's selection fields, e.g. window=64,keep=0.3")
    main(ap.parse_args())
