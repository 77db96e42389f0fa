"""What `ilc eval` writes for people: the summary per method (`summary.md`, `summary.json`), the perplexity table
and the NIAH heatmaps (`--plot`)."""

from __future__ import annotations

import math
from pathlib import Path

from .tasks import TASKS

def summarize(records: list[dict], methods: list[str]) -> dict:
    """Mean score x 100 per method and task group (niah, ruler), KV saved, times."""
    out = {}
    mean = lambda xs: 100 * sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    for m in methods:
        rows = [r for r in records if r["method"] == m]
        if not rows:
            continue
        group = lambda name: [r["score"] for r in rows if TASKS[r["task"]].group == name]  # noqa: E731
        out[m] = dict(
            niah=mean(group("niah")), ruler=mean(group("ruler")), samples=len(rows),
            kv_saved=1 - sum(r["kv_bytes"] for r in rows) / sum(r["dense_bytes"] for r in rows),
            prefill_s=sum(r["prefill_s"] for r in rows) / len(rows),
            decode_ms=sum(r["decode_ms"] for r in rows) / len(rows),
            per_task={t: mean([r["score"] for r in rows if r["task"] == t]) for t in sorted({r["task"] for r in rows})},
        )
    return out


def format_summary(summary: dict, title: str) -> str:
    full = summary.get("full", {})
    lines = [title, "", "| method | NIAH | RULER | KV saved | prefill s | decode ms/token | per task |",
             "|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        delta = "" if m == "full" or not full else f" ({s['niah'] - full['niah']:+.1f} / {s['ruler'] - full['ruler']:+.1f})"
        tasks = ", ".join(f"{t} {v:.0f}" for t, v in s["per_task"].items())
        lines.append(f"| {m}{delta} | {s['niah']:.1f} | {s['ruler']:.1f} | {s['kv_saved']:.1%} | {s['prefill_s']:.2f} | "
                     f"{s['decode_ms']:.0f} | {tasks} |")
    lines.append("")
    lines.append("Scores are mean x 100 (RULER string match); (+x / +y) = difference to the full model on NIAH / RULER. "
                 "KV saved = 1 - bytes held / dense bytes for the same tokens, measured after each run.")
    if any(m.startswith("kvpress-") for m in summary):
        lines.append("kvpress-PRESS-NN: NVIDIA kvpress's press at compression ratio NN%, query-agnostic (the context is "
                     "compressed before the question is seen, kvpress's default); -aware: the question is inside the "
                     "compressed context. ilc's methods see the whole prompt (selection scores with its last queries, "
                     "which include the question). Presses that only mask keys (KVzip) keep a dense cache.")
    return "\n".join(lines)


def format_perplexity(ppl: dict, title: str) -> str:
    buckets = list(next(iter(ppl.values())))
    lines = [title, "", "| method | " + " | ".join(f"tokens {b}" for b in buckets) + " |",
             "|---|" + "---|" * len(buckets)]
    for m, row in ppl.items():
        lines.append(f"| {m} | " + " | ".join(f"{row[b]:.2f}" for b in buckets) + " |")
    return "\n".join(lines)


def plot_niah(records: list[dict], methods: list[str], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    niah = [r for r in records if r["task"] == "niah"]
    lengths = sorted({r["length"] for r in niah})
    depths = sorted({r["depth"] for r in niah})
    shown = [m for m in methods if any(r["method"] == m for r in niah)]
    fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown) + 1, 3.2), squeeze=False)
    for ax, m in zip(axes[0], shown):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for r in niah:
            if r["method"] == m:
                grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["score"]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        saved = [1 - r["kv_bytes"] / r["dense_bytes"] for r in niah if r["method"] == m]
        ax.set_title(f"{m}\n{sum(saved) / len(saved):.0%} KV saved", fontsize=9)
        ax.set_xlabel("context")
    axes[0][0].set_ylabel("needle depth")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
