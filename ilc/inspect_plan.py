"""Explain a plan: kinds and blocks per KV head, windows, provenance, and what it saves at each context length.

`format_plan` returns the text `ilc inspect` prints; `plot_plan` draws the kind of every (layer, KV head), the
similarity heatmaps with block boundaries, and the proximal-coverage curve (needs the optional matplotlib extra).

The free-form sections (`criterion`, `calibration`, `distance_curve`, `similarity`) are whatever the file holds:
a section, or a value in it, that is not of the shape ilc writes is shown as written (shortened), never trusted.
Nothing here loops over more than the plan's head table once: per-head listings and plots show at most
`SHOWN_HEADS` / `PLOTTED_HEADS` heads and `SHOWN_LAYERS` layers, and the savings at every context come from the
counts of each (kind, window) pair, not from a pass over the table per context.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ilc.runtime.bits import DEFAULT_RESIDUAL, head_bytes
from ilc.runtime.heads import SCORERS, BlockKind, HeadKind, HeadSpec, Mode, dense_vectors
from ilc.runtime.plan import Plan

from .options import check_plot_path, check_ranges, check_writable, option, plot_path

KIND_LETTERS = {HeadKind.FULL: "F", HeadKind.FOLLOWER: "f", HeadKind.STREAMING: "s"}
KIND_COLORS = {HeadKind.FULL: "#4c72b0", HeadKind.FOLLOWER: "#dd8452", HeadKind.STREAMING: "#55a868"}

CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
SHOWN_HEADS = 32  # KV heads listed one per line (the rest are counted)
SHOWN_LAYERS = 128  # layers shown in the kind grid and blocks per line
PLOTTED_HEADS = 8  # similarity heatmaps drawn
LABELLED_CELLS = 4096  # streaming windows written into the kind plot up to this many (layer, head) cells
VERBATIM_CHARS = 300  # a section shown as written is cut after this many characters


@dataclass(frozen=True)
class InspectOptions:
    """`ilc inspect`'s options besides the plan."""

    context: int | None = option(None, "context length to price", shown_default="the model's maximum")
    batch: int = option(1, "sequences")
    dtype_bytes: int = option(2, "bytes per cached element (2: bf16/fp16)", choices=lambda: (1, 2, 4))
    plot: str | None = option(None, "write a plot (the suffix names the format, e.g. .png): kinds per head, "
                              "similarity heatmaps with blocks, the window curve", parse=plot_path)


class _Unexpected(Exception):
    """A free-form value is not of the shape ilc writes."""


def _number(value, optional: bool = True):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Unexpected
    return value


def _scalar(value):
    if value is not None and not isinstance(value, (str, int, float, bool)):
        raise _Unexpected
    return value


def _verbatim(value) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= VERBATIM_CHARS else f"{text[:VERBATIM_CHARS]}... ({len(text)} characters)"


def _section(name: str, value, render) -> list[str]:
    """render(value), or the section as written when it is not of the shape `render` expects."""
    try:
        if not isinstance(value, dict):
            raise _Unexpected
        return render(value)
    except _Unexpected:
        return [f"{name} (as written, not in ilc's layout): {_verbatim(value)}"]


@dataclass(frozen=True)
class _Footprint:
    """How many (layer, KV head) pairs hold each (kind, window, precision): enough to price the plan at any
    context."""

    plan: Plan
    counts: Counter  # (HeadKind, window, HeadPrecision) -> (layer, KV head) pairs

    @classmethod
    def of(cls, plan: Plan, table) -> "_Footprint":
        return cls(plan, Counter((spec.kind, spec.window, p) for layer, row in enumerate(table)
                                 for spec, p in zip(row, plan.layer_precisions(layer))))

    def kind_count(self, kind: HeadKind) -> int:
        return sum(n for (k, _, _), n in self.counts.items() if k == kind)

    def bytes(self, context: int, kind: HeadKind | None = None, dtype_bytes: int = 2) -> tuple[int, int]:
        """(dense, planned) K and V bytes of one sequence at `context` tokens, of every head or of one kind
        (`bits.head_bytes`: integers, scales and minimums as stored, floats at `dtype_bytes`)."""
        plan, planned, heads = self.plan, 0, 0
        residual = plan.precision.residual if plan.precision else DEFAULT_RESIDUAL
        for (k, window, precision), n in self.counts.items():
            if kind is None or k == kind:
                planned += n * head_bytes(HeadSpec(k, 0, window), precision, context, plan.sinks,
                                          plan.model.head_dim, residual, plan.selection, dtype_bytes)
                heads += n
        return dense_vectors(1, heads, context) * plan.model.head_dim * dtype_bytes, planned

    def saving(self, context: int) -> float:
        dense, planned = self.bytes(context)
        return 1.0 - planned / dense


def format_plan(plan: Plan, context: int | None = None, dtype_bytes: int = 2, batch: int = 1) -> str:
    m = plan.model
    context = context or m.max_context
    table = plan.head_table()
    footprint = _Footprint.of(plan, table)
    lines = _header_lines(plan)
    lines += _section("criterion", plan.criterion, _criterion_lines) if plan.criterion else []
    lines += _section("calibration", plan.calibration, _calibration_lines) if plan.calibration else []
    if isinstance(plan.criterion, dict):
        rule = {k: plan.criterion.get(k) for k in ("assignment", "kinds", "max_error", "total_error")}
        lines += _section("criterion (kinds)", rule, _kinds_rule_lines)
    lines += _selection_lines(plan) + _adapted_lines(plan)
    lines += ["", *_kind_grid_lines(plan, table, footprint), "", *_precision_lines(plan), *_block_lines(plan), ""]
    lines += _savings_lines(plan, footprint, context, batch, dtype_bytes)
    lines += ["", *_bytes_by_kind_lines(footprint, context, batch, dtype_bytes)]
    if context > m.max_context:
        lines.append(f"warning: --context {context} exceeds the model's limit of {m.max_context}")
    if plan.mode == Mode.KEYS:
        from ilc.runtime.apply import KEYS_MODE_WARNING

        lines.append(f"warning: {KEYS_MODE_WARNING}")
    return "\n".join(lines)


def _header_lines(plan: Plan) -> list[str]:
    m = plan.model
    coverage = plan.criterion.get("proximal_coverage") if isinstance(plan.criterion, dict) else None
    covers = (f" (covers {coverage:.0%} of attention mass)"
              if isinstance(coverage, (int, float)) and not isinstance(coverage, bool) else "")
    return [
        f"plan for {m.name} ({m.architecture}; {m.num_layers} layers, {m.num_attention_heads} query / "
        f"{m.num_kv_heads} KV heads, head_dim {m.head_dim}, context {m.max_context})",
        f"mode: {plan.mode}" + (f", skip distant attention when proximal mass >= {plan.skip_threshold}"
                                if plan.skip_threshold else ""),
        f"windows: {plan.sinks} sink tokens + {plan.window} recent tokens keep full per-layer K and V{covers}",
    ]


def _criterion_lines(c: dict) -> list[str]:
    if not isinstance(c.get("method"), str) or not isinstance(c.get("similarity"), str):
        raise _Unexpected
    floor = _number(c.get("min_similarity"))
    rule = f"min similarity {floor}" if floor is not None else ""
    if _number(c.get("target_saving")):
        rule = f"target saving {c['target_saving']:.0%} at {_scalar(c.get('target_context'))} tokens" + (
            f", {rule}" if rule else "")
    return [f"grouping: {c['method']} on {c['similarity']} similarity, {rule}, "
            f"max group {_scalar(c.get('max_group_size'))}{', per layer' if c.get('per_layer') else ''}"]


def _calibration_lines(cal: dict) -> list[str]:
    if "data" not in cal or "seq_len" not in cal:
        raise _Unexpected
    get = lambda key: _scalar(cal.get(key))  # noqa: E731
    retrieval = f" + {get('retrieval_samples')} retrieval samples" if get("retrieval_samples") else ""
    return [f"calibrated on: {get('data')} [{get('data_digest')}], {get('samples')} x {get('seq_len')} tokens"
            f"{retrieval}, {get('query_rows')} query rows per sample, transformers {get('transformers_version')}, "
            f"ilc {get('ilc_version')}"]


def _kinds_rule_lines(c: dict) -> list[str]:
    if not c.get("assignment"):
        return []
    kinds = c.get("kinds", [])
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise _Unexpected
    max_error, total = _number(c.get("max_error")), _number(c.get("total_error"))
    return [f"kinds: {', '.join(kinds)} or full, chosen by {_scalar(c['assignment'])}"
            + (f", max error per head {max_error}" if max_error is not None else "")
            + (f"; total output error {total}" if total is not None else "")]


_SELECTION_LOSS = {"priced": "; its loss was priced per head in calibration",
                   "free": "; its loss was not priced (free in the choice of heads)"}


def _selection_lines(plan: Plan) -> list[str]:
    if not plan.selection:
        return []
    sel = plan.selection
    pooling = SCORERS[sel.scorer].pooling
    pooled = f", {pooling}-pooled over {sel.pool} tokens" if pooling and sel.pool > 1 else ""
    return [f"selection: {sel.scorer} at the end of prefill: full heads keep {plan.sinks} sinks + the last "
            f"{sel.window} tokens + the best {sel.keep:.0%} of the others (scored by the last {sel.observation} "
            f"prompt queries{pooled}); followers keep their anchor's tokens, streaming heads are unaffected; tokens "
            "after the prompt are all kept" + _SELECTION_LOSS.get(plan.criterion.get("selection_loss"), "")
            + _keep_choice(plan.criterion.get("keep_choice"))]


def _keep_choice(tried) -> str:
    if not tried:
        return ""
    if not isinstance(tried, dict) or not all(_number(v) is not None for v in tried.values()):
        raise _Unexpected
    return ("; the share chosen by calibration (--choose-keep), total error per share tried: "
            + ", ".join(f"{float(k):g}: {_number(v)}" for k, v in tried.items()))


def _adapted_lines(plan: Plan) -> list[str]:
    if not plan.adapted:
        return []
    a = plan.adapted
    return [f"adapted: LoRA rank {a.rank} on {', '.join(a.targets)} of {len(a.layers)} layers, {a.mode} mode, "
            f"{a.tokens} tokens ({a.steps} steps), distillation loss {a.loss_initial:.4f} -> {a.loss_final:.4f}; "
            f"runs only with adapter {a.adapter} (plan.apply(model, adapter=DIR), or the merged weights)"]


def _more(shown: int, total: int, what: str) -> list[str]:
    return [f"  ... {total - shown} more {what}"] if total > shown else []


def _kind_grid_lines(plan: Plan, table, footprint: _Footprint) -> list[str]:
    layers = min(plan.num_layers, SHOWN_LAYERS)
    heads = min(plan.num_kv_heads, SHOWN_HEADS)
    more_layers = " ..." if plan.num_layers > layers else ""
    lines = ["kind per layer and KV head (F full, f follower, s streaming):",
             "  layer   " + " ".join(f"{i % 10}" for i in range(layers)) + more_layers]
    for h in range(heads):
        lines.append(f"  head {h:<3}" + " ".join(KIND_LETTERS[table[i][h].kind] for i in range(layers)) + more_layers)
    lines += _more(heads, plan.num_kv_heads, "KV heads")
    counts = ", ".join(f"{footprint.kind_count(kind)} {kind.label}" for kind in HeadKind)
    return lines + [f"  {counts} (layer, KV head) pairs"]


def _precision_lines(plan: Plan) -> list[str]:
    """Bits of keys and values per (layer, KV head), with the counts per precision; none without ``precision:``."""
    if plan.precision is None:
        return []
    p = plan.precision
    layers, heads = min(plan.num_layers, SHOWN_LAYERS), min(plan.num_kv_heads, SHOWN_HEADS)
    digit = lambda bits: "-" if bits == 16 else str(bits)  # noqa: E731
    lines = [f"bits per layer and KV head (keys then values; - = 16-bit): sinks and the last {p.residual} tokens "
             f"stay 16-bit, integers in groups of {p.group} with a 16-bit scale and minimum each",
             "  layer   " + " ".join(f"{i % 10:<2}" for i in range(layers))]
    for h in range(heads):
        lines.append(f"  head {h:<3}" + " ".join(digit(p.of(i, h).key_bits) + digit(p.of(i, h).value_bits)
                                                 for i in range(layers)))
    lines += _more(heads, plan.num_kv_heads, "KV heads")
    counts = ", ".join(f"{n} {name}" for name, n in p.counts().items())
    return lines + [f"  {counts} (layer, KV head) pairs (c: keys grouped per channel)", ""]


def _block_lines(plan: Plan) -> list[str]:
    lines = ["blocks per KV head (anchor layer first; [min follower similarity]; sN = streaming, window N):"]
    for h, blocks in enumerate(plan.blocks[:SHOWN_HEADS]):
        parts = [_span(b.layers) + (f" s{b.window}" if b.kind == BlockKind.STREAMING else "")
                 + (f" [{b.similarity:.2f}]" if b.similarity is not None else "") for b in blocks[:SHOWN_LAYERS]]
        lines.append(f"  head {h}: {len(blocks)} blocks, {sum(len(b.followers) for b in blocks)} followers: "
                     + " | ".join(parts) + (" | ..." if len(blocks) > SHOWN_LAYERS else ""))
    lines += _more(min(len(plan.blocks), SHOWN_HEADS), len(plan.blocks), "KV heads")
    return lines + [f"mean blocks per KV head: {plan.mean_blocks_per_head:.1f} of {plan.num_layers} layers"]


def _span(layers) -> str:
    return f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def _savings_lines(plan: Plan, footprint: _Footprint, context: int, batch: int, dtype_bytes: int) -> list[str]:
    lines = [f"{'context':>8} {'dense KV':>10} {'planned KV':>11} {'saved':>6}   (batch {batch}, "
             f"{dtype_bytes} bytes/element)"]
    for n in sorted({*[x for x in CONTEXTS if x <= max(context, 1024)], context}):
        dense, planned = footprint.bytes(n, dtype_bytes=dtype_bytes)
        mark = " <- --context" if n == context else ""
        lines.append(f"{n:>8} {_mib(batch * dense):>10} {_mib(batch * planned):>11} "
                     f"{1 - planned / dense:>6.1%}{mark}")
    lines.append(f"(saving grows with context towards {footprint.saving(10**9):.1%}: proximal tokens are always "
                 "kept)" + (" (with selection: right after a prompt of that length)" if plan.selection else ""))
    return lines


def _bytes_by_kind_lines(footprint: _Footprint, context: int, batch: int, dtype_bytes: int) -> list[str]:
    scales = " (integers with their scales)" if footprint.plan.quantized else ""
    lines = [f"bytes by kind at {context} tokens{scales}:"]
    for kind in HeadKind:
        count = footprint.kind_count(kind)
        if count:
            dense, held = footprint.bytes(context, kind, dtype_bytes)
            lines.append(f"  {kind.label:<10} {count:>4} heads {_mib(batch * held):>11} held of "
                         f"{_mib(batch * dense):>11} dense")
    return lines


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


# ------------------------------------------------------------------------------------------------------- plots
def plot_plan(plan: Plan, path: str | Path) -> Path:
    """Kinds per head, a similarity heatmap per KV head (the first `PLOTTED_HEADS`) with block boundaries, and the
    proximal-coverage curve, in the format `path`'s suffix names; writes exactly `path`."""
    check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = min(plan.num_kv_heads, PLOTTED_HEADS)
    table = plan.head_table()
    fig, axes = plt.subplots(1, heads + 2, figsize=(4.2 * (heads + 2), 4.2))
    _plot_kinds(plan, table, axes[0], plt)
    image = None
    for h in range(heads):
        image = _plot_similarity(plan, h, axes[1 + h], plt)
    if image is not None:
        fig.colorbar(image, ax=axes[heads], fraction=0.046, pad=0.04, label="similarity")
    _plot_coverage(plan, axes[-1])
    similarity = plan.criterion.get("similarity") if isinstance(plan.criterion, dict) else None
    shown = f" (first {heads} of {plan.num_kv_heads} KV heads)" if heads < plan.num_kv_heads else ""
    saving = _Footprint.of(plan, table).saving(plan.model.max_context)
    fig.suptitle(f"{plan.model.name}: {similarity if isinstance(similarity, str) else '?'} similarity "
                 f"(saves {saving:.0%} at {plan.model.max_context} tokens){shown}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _similarity_matrix(plan: Plan, h: int):
    """The banded similarity of KV head `h` as an [L, L] array (NaN where the plan has no number)."""
    import numpy as np

    n = plan.num_layers
    mat = np.full((n, n), np.nan)
    per_head = plan.similarity.get("per_head") if isinstance(plan.similarity, dict) else None
    rows = per_head[h] if isinstance(per_head, list) and h < len(per_head) else None
    if not isinstance(rows, list):
        return mat
    for a, row in enumerate(rows[:n]):
        mat[a, a] = 1.0
        if isinstance(row, list):
            for k, v in enumerate(row[:n - a - 1]):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    mat[a, a + 1 + k] = v
    return mat


def _plot_similarity(plan: Plan, h: int, ax, plt):
    image = ax.imshow(_similarity_matrix(plan, h), vmin=0, vmax=1, cmap="viridis", origin="upper")
    for b in plan.blocks[h]:
        if b.kind == BlockKind.STREAMING:
            continue
        lo, hi = b.layers[0] - 0.5, b.layers[-1] + 0.5
        ax.add_patch(plt.Rectangle((lo, lo), hi - lo, hi - lo, fill=False, edgecolor="red", linewidth=1.2))
    ax.set_title(f"KV head {h}: {len(plan.blocks[h])} blocks")
    ax.set_xlabel("follower layer")
    ax.set_ylabel("anchor layer")
    return image


def _coverage_points(plan: Plan) -> list[tuple[int, float]]:
    """(window, coverage) of the plan's distance curve, the entries that are numbers."""
    cov = plan.distance_curve.get("coverage_by_window") if isinstance(plan.distance_curve, dict) else None
    if not isinstance(cov, dict):
        return []
    points = []
    for w, value in cov.items():
        window = w if isinstance(w, int) else int(w) if isinstance(w, str) and w.isdigit() else None
        if window and not isinstance(window, bool) and isinstance(value, (int, float)) and not isinstance(value, bool):
            points.append((window, value))
    return sorted(points)


def _plot_coverage(plan: Plan, ax) -> None:
    points = _coverage_points(plan)
    if points:
        ax.plot([w for w, _ in points], [c for _, c in points], marker="o")
        ax.set_xscale("log", base=2)
        ax.axvline(plan.window, color="red", linestyle="--", label=f"window {plan.window}")
        ax.legend()
    ax.set_title(f"attention mass on {plan.sinks} sinks + recent window")
    ax.set_xlabel("recent window (tokens)")
    ax.set_ylim(0, 1)


def _plot_kinds(plan: Plan, table, ax, plt) -> None:
    """The kind of every (layer, KV head), streaming heads labelled with their window."""
    import numpy as np
    from matplotlib.colors import ListedColormap

    grid = np.array([[int(spec.kind) for spec in row] for row in table]).T  # [heads, layers]
    ax.imshow(grid, cmap=ListedColormap([KIND_COLORS[k] for k in HeadKind]), vmin=0, vmax=len(HeadKind) - 1,
              aspect="auto")
    if grid.size <= LABELLED_CELLS:
        for layer, row in enumerate(table):
            for h, spec in enumerate(row):
                if spec.kind == HeadKind.STREAMING:
                    ax.text(layer, h, str(spec.window), ha="center", va="center", fontsize=5, rotation=90)
    ax.set_yticks(range(0, plan.num_kv_heads, max(1, plan.num_kv_heads // 16)))
    ax.set_xlabel("layer")
    ax.set_ylabel("KV head")
    counts = _Footprint.of(plan, table)
    handles = [plt.Rectangle((0, 0), 1, 1, color=KIND_COLORS[k]) for k in HeadKind]
    ax.legend(handles, [f"{k.label} ({counts.kind_count(k)})" for k in HeadKind], fontsize=7,
              loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(HeadKind))
    ax.set_title("kind per head (streaming: window)")


def check_options(options: InspectOptions) -> None:
    """Every option in its range and the plot's format writable, before the plan is read (OptionError)."""
    check_ranges(options)
    if options.plot:
        check_plot_path(options.plot)
        check_writable(options.plot, "--plot")
