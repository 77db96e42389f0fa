"""ilc plans beside NVIDIA kvpress presses on the same prompts: one table (docs/eval-peers.md) and one plot.

Reads what `benchmarks/eval_sweep.py` (ilc plans, per-run results.jsonl under --sweep) and
`benchmarks/peers/kvpress_runner.py` (--sweep/peers.jsonl) recorded, keeps the prompts of --seeds (the CPU-sized
subset both ran), and reports each method that has a record for every one of them. KV saved is measured on the
cache after each run; kvpress presses that only mask keys (KVzip) hold a dense cache, so their nominal ratio is
given beside it.

Run: python benchmarks/peers_table.py --sweep docs/eval-sweep --seeds 0 --out docs/eval-peers.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import emit_table

ILC_RUNS = {  # run directory under the sweep -> {method in that run: (label, family)}
    "full": {"full": ("full model", "full")},
    **{f"mixed-{t}": {"plan": (f"ilc mixed {t}%", "ilc mixed plan"),
                      "streaming-equal": (f"StreamingLLM at mixed {t}% bytes (ilc runtime)", "StreamingLLM (ilc)")}
       for t in (20, 30, 40, 50, 60, 75)},
    **{f"selection-{t}": {"plan": (f"ilc mixed + selection {t}%", "ilc mixed + selection"),
                          "selection-equal": (f"ilc selection alone at mixed + selection {t}% bytes",
                                              "ilc selection alone (SnapKV rule)")}
       for t in (50, 75, 90)},
}


def read_jsonl(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def collect(sweep: Path, seeds: set[int]) -> list[dict]:
    prompts = {p["prompt"]: p for p in read_jsonl(sweep / "prompts.jsonl") if p["seed"] in seeds}
    groups: dict[str, dict] = {}
    for run, methods in ILC_RUNS.items():
        for rec in read_jsonl(sweep / run / "results.jsonl"):
            if rec.get("method") in methods and rec["settings"]["prompt"] in prompts:
                label, family = methods[rec["method"]]
                g = groups.setdefault(label, dict(family=family, setting="query-aware (whole prompt)", recs={}))
                g["recs"][rec["settings"]["prompt"]] = rec
    for rec in read_jsonl(sweep / "peers.jsonl"):
        st = rec.get("settings", {})
        if st.get("prompt") not in prompts:
            continue
        setting = "query-agnostic" if st["setting"] == "agnostic" else "query-aware"
        family = f"kvpress {st['press']} ({setting})"
        label = f"kvpress {st['press']} {round(100 * st['compression_ratio'])}% ({setting})"
        g = groups.setdefault(label, dict(family=family, setting=setting, recs={}, masks_only=st.get("masks_only")))
        g["recs"][st["prompt"]] = rec
    rows = []
    for label, g in groups.items():
        recs = list(g["recs"].values())
        if len(recs) != len(prompts):
            continue  # incomplete: not every prompt of the subset has run yet
        mean = lambda xs: 100 * sum(xs) / len(xs)  # noqa: E731
        niah = [r["score"] for r in recs if r["task"] == "niah"]
        ruler = [r["score"] for r in recs if r["task"] != "niah"]
        saved = 1 - sum(r["kv_bytes"] for r in recs) / sum(r["dense_bytes"] for r in recs)
        nominal = sum(r.get("nominal_saved", 0) for r in recs) / len(recs) if g.get("masks_only") else None
        rows.append(dict(label=label, family=g["family"], setting=g["setting"], saved=saved, nominal=nominal,
                         niah=mean(niah), ruler=mean(ruler), prefill_s=sum(r["prefill_s"] for r in recs) / len(recs),
                         n=len(recs)))
    rows.sort(key=lambda r: (r["family"] != "full", r["family"], r["nominal"] or r["saved"]))
    return rows, len(prompts)


def write(rows: list[dict], n_prompts: int, out: Path, seeds) -> None:
    lines = [f"{n_prompts} prompts (the sweep's prompts of seed {','.join(map(str, sorted(seeds)))}: NIAH at 2k and "
             "4k x 5 depths, and the 5 RULER-style tasks at 2k and 4k), SmolLM2-135M-Instruct, float32, 2 CPU cores "
             "(kvpress single-threaded). KV saved: measured on the cache after each run (kvpress: the compressed "
             "context plus the uncompressed question). Prefill: seconds per prompt, including the press's scoring.",
             "", "| method | setting | KV saved (measured) | NIAH | RULER | prefill s |", "|---|---|---|---|---|---|"]
    for r in rows:
        saved = f"{r['saved']:.1%}" + (f" (masks {r['nominal']:.1%}; cache stays dense)" if r["nominal"] else "")
        lines.append(f"| {r['label']} | {r['setting']} | {saved} | {r['niah']:.1f} | {r['ruler']:.1f} | "
                     f"{r['prefill_s']:.1f} |")
    emit_table(lines, out)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next((r for r in rows if r["family"] == "full"), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    families = sorted({r["family"] for r in rows if r["family"] != "full"})
    for ax, key, label in ((axes[0], "niah", "NIAH"), (axes[1], "ruler", "RULER-style")):
        for fam in families:
            pts = sorted((100 * (r["nominal"] or r["saved"]), r[key]) for r in rows if r["family"] == fam)
            style = "o-" if fam.startswith("ilc") else ("s--" if "agnostic" in fam else "^:")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=fam)
        if full:
            ax.axhline(full[key], color="gray", linestyle=":", label="full cache")
        ax.set_xlabel("KV saved (%; kvpress masks-only presses: nominal)")
        ax.set_ylabel(f"{label} score")
        ax.set_ylim(-5, 105)
    axes[0].legend(fontsize=6)
    fig.suptitle("ilc plans vs kvpress presses, same prompts (SmolLM2-135M-Instruct, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", default="docs/eval-sweep")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="docs/eval-peers.md")
    a = ap.parse_args()
    seeds = {int(x) for x in a.seeds.split(",")}
    rows, n = collect(Path(a.sweep), seeds)
    write(rows, n, Path(a.out), seeds)
