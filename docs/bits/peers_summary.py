"""Summary of docs/bits/peers.jsonl: per method, NIAH and RULER (the other tasks) means x100, savings, prefill."""

import json
import sys
from collections import defaultdict
from pathlib import Path

path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("peers.jsonl"))
latest = {}
for line in path.read_text().splitlines():
    try:
        r = json.loads(line)
    except json.JSONDecodeError:
        continue
    latest[r["key"]] = r
rows = defaultdict(list)
for r in latest.values():
    rows[r["method"]].append(r)
print("| method | n | target saved | nominal saved | measured saved | NIAH x100 | RULER x100 | prefill s | decode ms |")
print("|---|---|---|---|---|---|---|---|---|")
mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
for m, rs in rows.items():
    niah = [r["score"] for r in rs if r["task"] == "niah"]
    ruler = [r["score"] for r in rs if r["task"] != "niah"]
    measured = 1 - sum(r["kv_bytes"] for r in rs) / sum(r["dense_bytes"] for r in rs)
    s = rs[0]["settings"]
    note = " (masks only: bytes not saved)" if s.get("masks_only") else ""
    print(f"| {m} | {len(rs)} | {s.get('target_saved', float('nan')):.1%} | {mean([r['nominal_saved'] for r in rs]):.1%} "
          f"| {measured:.1%}{note} | {100 * mean(niah):.0f} ({len(niah)}) | {100 * mean(ruler):.0f} ({len(ruler)}) "
          f"| {mean([r['prefill_s'] for r in rs]):.1f} | {mean([r['decode_ms'] for r in rs]):.0f} |")
