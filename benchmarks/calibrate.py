"""Calibration cost against sequence length on SmolLM2-135M (CPU), with baselines measured in the same run.

For each length, in a fresh process (so peak RSS is that run's): 
- `forward`: a plain SDPA forward over the same samples (the floor: calibration must at least run the model);
- `ilc`: `ilc calibrate` (sampled-row statistics, windows, similarity, grouping);
- `eager`: the naive path, eager attention with output_attentions=True (T x T maps; only up to 2k).
Prints time and peak RSS with ratios to `forward`.

Run: python benchmarks/calibrate.py --out docs/calibration.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import emit_table

SAMPLES = 2
CHILD = r"""
import json, resource, sys, time, torch
from pathlib import Path
from ilc.models import load_model
from ilc.data import load_calibration_set
kind, seq_len, data = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model, tok, src = load_model()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = [data] if data != "-" else None
t = time.perf_counter()
if kind == "ilc":
    from ilc.calibrate import CalibrationSettings, calibrate
    calibrate(CalibrationSettings(seq_len=seq_len, samples=%d, data=data), model, tok, src.name, progress=False)
else:
    cs = load_calibration_set(tok, data, seq_len, %d)
    if kind == "eager":
        model.set_attn_implementation("eager")
    with torch.no_grad():
        for s in cs.samples:
            model(s[None], use_cache=False, output_attentions=(kind == "eager"))
print(json.dumps(dict(seconds=time.perf_counter() - t, peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      weights_gib=rss0 / 2**20)))
""" % (SAMPLES, SAMPLES)


def run(kind: str, seq_len: int, data: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(seq_len), data], capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(lengths, out):
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pg_essays"
    data = str(shared) if shared.is_dir() else "-"
    lines = [f"SmolLM2-135M-Instruct, fp32, CPU ({__import__('os').cpu_count()} cores), {SAMPLES} samples per length, "
             f"data: {'pg_essays' if data != '-' else 'embedded corpus'}. Peak = process max RSS (weights included).",
             "", "| seq len | forward s | ilc calibrate s | ratio | forward peak GiB | ilc peak GiB | eager+output_attentions "
             "s / peak GiB |", "|---|---|---|---|---|---|---|"]
    for n in lengths:
        f, c = run("forward", n, data), run("ilc", n, data)
        e = run("eager", n, data) if n <= 2048 else {}
        eager = f"{e['seconds']:.1f} / {e['peak_gib']:.2f}" if "seconds" in e else "not run (T x T maps: ~69 GB at 8k)"
        lines.append(f"| {n} | {f['seconds']:.1f} | {c['seconds']:.1f} | {c['seconds'] / f['seconds']:.2f} | "
                     f"{f['peak_gib']:.2f} | {c['peak_gib']:.2f} | {eager} |")
        print(lines[-1], flush=True)
    emit_table(lines, out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--out")
    a = ap.parse_args()
    main([int(x) for x in a.lengths.split(",")], a.out)
