"""Quality against memory for SmolLM2: one calibration, several grouping settings, needle retrieval.

Calibrates once (default corpus, 4k tokens), regroups the same similarity matrices under each setting, and asks
each plan (and the full model) for a 7-digit needle at 2k/4k tokens and two depths of a haystack
(`../shared/data/pg_essays` if present, else the embedded corpus). Prints a markdown table.

Run: python benchmarks/needle_sweep.py --out docs/quality.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import emit_table
from ilc.calibrate import CalibrationSettings, calibrate, regroup
from ilc.data import default_corpus, read_documents
from ilc.models import load_model
from ilc.eval.tasks import make_sample
from ilc.eval.tasks import score as answer_score
from ilc.runtime import remove_plan

SETTINGS = [
    ("optimal, output >= 0.9 (default)", dict(min_similarity=0.9)),
    ("optimal, output >= 0.8", dict(min_similarity=0.8)),
    ("optimal, output >= 0.7", dict(min_similarity=0.7)),
    ("optimal, output >= 0.5", dict(min_similarity=0.5)),
    ("optimal, target 30% at 8k", dict(target_saving=0.3)),
    ("paper greedy, JSD >= 0.5", dict(method="paper", criterion="jsd")),
]


def main(out: str | None, seq_len: int):
    model, tok, src = load_model()
    base = calibrate(CalibrationSettings(seq_len=seq_len), model, tok, src.name, progress=False)
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pg_essays"
    hay, hay_name = (read_documents([shared]), "pg_essays") if shared.is_dir() else (default_corpus(), "embedded")
    prompts = [make_sample("niah", tok, n, d, 0, hay) for n in (2000, 4000) for d in (0.25, 0.5)]  # the NIAH task

    def score(plan):
        hits = 0
        if plan is not None:
            plan.apply(model)
        for p in prompts:
            n = p.input_ids.shape[1]
            with torch.no_grad():
                o = model.generate(p.input_ids, attention_mask=torch.ones_like(p.input_ids), max_new_tokens=28,
                                   do_sample=False, pad_token_id=tok.eos_token_id)
            hits += answer_score(tok.decode(o[0, n:], skip_special_tokens=True), p.answers, p.rule) == 1.0
        remove_plan(model)
        return hits

    lines = [f"SmolLM2-135M-Instruct, fp32 CPU. Calibration: embedded corpus, {base.plan.calibration['samples']} x "
             f"{seq_len} tokens, windows {base.plan.sinks} + {base.plan.window}. Needles: the NIAH task of `ilc eval` "
             f"(seed 0) in {hay_name} at 2k/4k tokens x depth 25%/50% (4 prompts), greedy, 28 new tokens.", "",
             "| plan | KV saved at 4k | at 8k | blocks per KV head | needles found |", "|---|---|---|---|---|",
             f"| full model (no compression) | 0% | 0% | 30 | {score(None)}/4 |"]
    print(lines[-1], flush=True)
    for name, kw in SETTINGS:
        settings = CalibrationSettings(seq_len=seq_len, **kw)
        if settings.criterion not in (None, "output"):  # another similarity: calibrate again
            plan = calibrate(settings, model, tok, src.name, progress=False).plan
        else:  # same records and similarity: regroup only
            plan = regroup(base, settings, 8192)
        t = time.time()
        hits = score(plan)
        lines.append(f"| {name} | {plan.estimated_saving(4096):.1%} | {plan.estimated_saving(8192):.1%} | "
                     f"{plan.mean_blocks_per_head:.1f} | {hits}/4 |")
        print(lines[-1], f"({time.time() - t:.0f} s)", flush=True)
    emit_table(lines, out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--seq-len", type=int, default=4096)
    a = ap.parse_args()
    main(a.out, a.seq_len)
