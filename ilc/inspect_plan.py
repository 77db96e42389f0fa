"""Explain a plan: kinds and blocks per KV head, windows, provenance, and what it saves at each context length.

`format_plan` returns the text `ilc inspect` prints; `plot_plan` draws the kind of every (layer, KV head), the
similarity heatmaps with block boundaries, and the proximal-coverage curve (needs the optional matplotlib extra).
"""

from __future__ import annotations

from pathlib import Path

from ilc.runtime.heads import KIND_NAMES, HeadKind, stored_vectors
from ilc.runtime.plan import Plan

KIND_LETTERS = {HeadKind.FULL: "F", HeadKind.FOLLOWER: "f", HeadKind.STREAMING: "s"}

CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


def _span(layers) -> str:
    return f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def format_plan(plan: Plan, context: int | None = None, dtype_bytes: int = 2, batch: int = 1) -> str:
    m = plan.model
    c = plan.criterion
    cal = plan.calibration
    context = context or m.max_context
    lines = [
        f"plan for {m.name} ({m.architecture}; {m.num_layers} layers, {m.num_attention_heads} query / "
        f"{m.num_kv_heads} KV heads, head_dim {m.head_dim}, context {m.max_context})",
        f"mode: {plan.mode}" + (f", skip distant attention when proximal mass >= {plan.skip_threshold}"
                                if plan.skip_threshold else ""),
        f"windows: {plan.sinks} sink tokens + {plan.window} recent tokens keep full per-layer K and V"
        + (f" (covers {c['proximal_coverage']:.0%} of attention mass)" if "proximal_coverage" in c else ""),
    ]
    if c:
        rule = (f"min similarity {c.get('min_similarity')}" if c.get("min_similarity") is not None else "")
        if c.get("target_saving"):
            rule = f"target saving {c['target_saving']:.0%} at {c['target_context']} tokens" + (f", {rule}" if rule
                                                                                                 else "")
        lines.append(f"grouping: {c.get('method')} on {c.get('similarity')} similarity, {rule}, "
                     f"max group {c.get('max_group_size')}{', per layer' if c.get('per_layer') else ''}")
    if cal:
        retrieval = f" + {cal['retrieval_samples']} retrieval samples" if cal.get("retrieval_samples") else ""
        lines.append(f"calibrated on: {cal.get('data')} [{cal.get('data_digest')}], {cal.get('samples')} x "
                     f"{cal.get('seq_len')} tokens{retrieval}, {cal.get('query_rows')} query rows per sample, "
                     f"transformers {cal.get('transformers_version')}, ilc {cal.get('ilc_version')}")
    if c.get("assignment"):
        lines.append(f"kinds: {', '.join(c.get('kinds', []))} or full, chosen by {c['assignment']}"
                     + (f", max error per head {c['max_error']}" if c.get("max_error") is not None else "")
                     + (f"; total output error {c['total_error']}" if c.get("total_error") is not None else ""))
    if plan.selection:
        sel = plan.selection
        lines.append(f"selection: {sel.scorer} at the end of prefill: full heads keep {plan.sinks} sinks + the last "
                     f"{sel.window} tokens + the best {sel.keep:.0%} of the others (scored by the last "
                     f"{sel.observation} prompt queries); followers keep their anchor's tokens, streaming heads are "
                     "unaffected; tokens after the prompt are all kept")
    if plan.adapted:
        a = plan.adapted
        lines.append(f"adapted: LoRA rank {a.rank} on {', '.join(a.targets)} of {len(a.layers)} layers, {a.mode} mode, "
                     f"{a.tokens} tokens ({a.steps} steps), distillation loss {a.loss_initial:.4f} -> "
                     f"{a.loss_final:.4f}; runs only with adapter {a.adapter} "
                     "(plan.apply(model, adapter=DIR), or the merged weights)")
    lines.append("")
    lines.append("kind per layer and KV head (F full, f follower, s streaming):")
    table = plan.head_table()
    lines.append("  layer   " + " ".join(f"{i % 10}" for i in range(m.num_layers)))
    for h in range(m.num_kv_heads):
        lines.append(f"  head {h:<3}" + " ".join(KIND_LETTERS[table[i][h].kind] for i in range(m.num_layers)))
    lines.append("  " + ", ".join(f"{n} {name}" for name, n in plan.kind_counts().items()) + " (layer, KV head) pairs")
    lines.append("")
    lines.append("blocks per KV head (anchor layer first; [min follower similarity]; sN = streaming, window N):")
    for h, blocks in enumerate(plan.blocks):
        parts = [_span(b.layers) + (f" s{b.window}" if b.kind == "streaming" else "")
                 + (f" [{b.similarity:.2f}]" if b.similarity is not None else "") for b in blocks]
        lines.append(f"  head {h}: {len(blocks)} blocks, {sum(len(b.followers) for b in blocks)} followers: "
                     + " | ".join(parts))
    lines.append(f"mean blocks per KV head: {plan.mean_blocks_per_head:.1f} of {m.num_layers} layers")
    lines.append("")
    lines.append(f"{'context':>8} {'dense KV':>10} {'planned KV':>11} {'saved':>6}   (batch {batch}, "
                 f"{dtype_bytes} bytes/element)")
    shown = sorted({*[x for x in CONTEXTS if x <= max(context, 1024)], context})
    for n in shown:
        dense, planned = plan.kv_bytes(n, batch=batch, dtype_bytes=dtype_bytes)
        mark = " <- --context" if n == context else ""
        lines.append(f"{n:>8} {_mib(dense):>10} {_mib(planned):>11} {plan.estimated_saving(n):>6.1%}{mark}")
    ceiling = plan.estimated_saving(10**9)
    lines.append(f"(saving grows with context towards {ceiling:.1%}: proximal tokens are always kept)"
                 + (" (with selection: right after a prompt of that length)" if plan.selection else ""))
    lines.append("")
    lines.append(f"bytes by kind at {context} tokens:")
    per_vector = batch * m.head_dim * dtype_bytes
    for kind, name in KIND_NAMES.items():
        specs = [spec for row in table for spec in row if spec.kind == kind]
        held = sum(stored_vectors(spec, context, plan.sinks, plan.selection) for spec in specs) * per_vector
        dense = 2 * context * len(specs) * per_vector
        if specs:
            lines.append(f"  {name:<10} {len(specs):>4} heads {_mib(held):>11} held of {_mib(dense):>11} dense")
    if context > m.max_context:
        lines.append(f"warning: --context {context} exceeds the model's limit of {m.max_context}")
    if plan.mode == "keys":
        from ilc.runtime.apply import KEYS_MODE_WARNING

        lines.append(f"warning: {KEYS_MODE_WARNING}")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def plot_plan(plan: Plan, path: str | Path) -> Path:
    """Similarity heatmap per KV head with block boundaries, and the proximal-coverage curve, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        raise SystemExit("ilc inspect --plot needs matplotlib: pip install 'ilc[plot]'") from None
    n = plan.num_layers
    sim = plan.similarity.get("per_head")
    heads = plan.num_kv_heads
    fig, axes = plt.subplots(1, heads + 2, figsize=(4.2 * (heads + 2), 4.2))
    _plot_kinds(plan, axes[0], plt, np)
    axes = axes[1:]
    for h in range(heads):
        ax = axes[h]
        mat = np.full((n, n), np.nan)
        if sim:
            for a, row in enumerate(sim[h]):
                mat[a, a] = 1.0
                for k, v in enumerate(row):
                    mat[a, a + 1 + k] = v
        image = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", origin="upper")
        for b in plan.blocks[h]:
            if b.kind == "streaming":
                continue
            lo, hi = b.layers[0] - 0.5, b.layers[-1] + 0.5
            ax.add_patch(plt.Rectangle((lo, lo), hi - lo, hi - lo, fill=False, edgecolor="red", linewidth=1.2))
        ax.set_title(f"KV head {h}: {len(plan.blocks[h])} blocks")
        ax.set_xlabel("follower layer")
        ax.set_ylabel("anchor layer")
    fig.colorbar(image, ax=axes[heads - 1], fraction=0.046, pad=0.04, label="similarity")
    ax = axes[-1]
    cov = plan.distance_curve.get("coverage_by_window", {})
    if cov:
        ws = sorted(int(w) for w in cov)
        ax.plot(ws, [cov[w] if w in cov else cov[str(w)] for w in ws], marker="o")
        ax.set_xscale("log", base=2)
        ax.axvline(plan.window, color="red", linestyle="--", label=f"window {plan.window}")
        ax.legend()
    ax.set_title(f"attention mass on {plan.sinks} sinks + recent window")
    ax.set_xlabel("recent window (tokens)")
    ax.set_ylim(0, 1)
    fig.suptitle(f"{plan.model.name}: {plan.criterion.get('similarity', '?')} similarity "
                 f"(saves {plan.estimated_saving(plan.model.max_context):.0%} at {plan.model.max_context} tokens)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_kinds(plan: Plan, ax, plt, np) -> None:
    """The kind of every (layer, KV head), streaming heads labelled with their window."""
    from matplotlib.colors import ListedColormap

    table = plan.head_table()
    grid = np.array([[int(spec.kind) for spec in row] for row in table]).T  # [heads, layers]
    ax.imshow(grid, cmap=ListedColormap(["#4c72b0", "#dd8452", "#55a868"]), vmin=0, vmax=2, aspect="auto")
    for layer, row in enumerate(table):
        for h, spec in enumerate(row):
            if spec.kind == HeadKind.STREAMING:
                ax.text(layer, h, str(spec.window), ha="center", va="center", fontsize=5, rotation=90)
    ax.set_yticks(range(plan.num_kv_heads))
    ax.set_xlabel("layer")
    ax.set_ylabel("KV head")
    counts = plan.kind_counts()
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#4c72b0", "#dd8452", "#55a868")]
    ax.legend(handles, [f"{k} ({counts[k]})" for k in ("full", "follower", "streaming")], fontsize=7,
              loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
    ax.set_title("kind per head (streaming: window)")
