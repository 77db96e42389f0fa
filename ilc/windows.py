"""Choose the proximal windows (sinks + recent) from the calibration's attention-by-distance curve.

Proximal tokens keep full per-layer K and V, so a larger window costs savings and buys accuracy. The default
takes the smallest sink count that holds most of the mass on the first positions, then the smallest recent
window whose coverage (share of all attention mass falling on sinks or window) reaches `mass_share`,
capped at a quarter of the calibration length so that distant tokens remain to measure and to share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_stats import SampleRecord

SINK_CANDIDATES = (1, 2, 4, 8, 16, 32)
MIN_SINKS = 4  # StreamingLLM's default; cheap (a few tokens per layer)


@dataclass(frozen=True)
class WindowChoice:
    sinks: int
    window: int
    coverage: float  # share of attention mass on proximal tokens at this choice
    capped: bool  # the target share was not reached below the cap
    curve: dict  # for the plan and `ilc inspect`


def _prefix(record: SampleRecord) -> torch.Tensor:
    return record.probs.float().cumsum(-1)  # [L, Hq, R, T]


def position_mass(records: list[SampleRecord], upto: int = 64) -> torch.Tensor:
    """Mean attention mass on absolute positions 0..upto-1."""
    return torch.stack([r.probs[..., :upto].float().mean(dim=(0, 1, 2)) for r in records]).mean(0)


def coverage(records: list[SampleRecord], sinks: int, windows: list[int]) -> torch.Tensor:
    """Share of attention mass on proximal tokens (j < sinks or i - j < window) for each window; [len(windows)]."""
    out = []
    for r in records:
        p = _prefix(r)
        rows = r.rows
        total = []
        for w in windows:
            lo = torch.clamp(rows - w + 1, min=sinks)  # window part starts at max(sinks, i - w + 1)
            at_i = p[..., torch.arange(len(rows)), rows]  # == 1 for causal rows
            before_lo = torch.where(lo > 0, p[..., torch.arange(len(rows)), (lo - 1).clamp(min=0)], torch.zeros(()))
            window_mass = (at_i - before_lo).clamp(min=0)
            sink_mass = p[..., sinks - 1] if sinks > 0 else torch.zeros_like(window_mass)
            mass = sink_mass + window_mass
            total.append(mass.mean())
        out.append(torch.stack(total))
    return torch.stack(out).mean(0)


def distance_curve(records: list[SampleRecord], max_distance: int | None = None) -> torch.Tensor:
    """Mean attention mass by distance i - j (0 = the query's own token), shape [T]."""
    t = records[0].probs.shape[-1]
    acc = torch.zeros(t)
    for r in records:
        dist = r.rows[:, None] - torch.arange(t)[None, :]  # [R, T]
        valid = dist >= 0
        p = r.probs.float().mean(dim=(0, 1))  # [R, T]
        acc.index_add_(0, dist[valid], p[valid])
    acc /= sum(len(r.rows) for r in records)
    return acc[:max_distance] if max_distance else acc


def choose_windows(records: list[SampleRecord], seq_len: int, sinks: int | None = None,
                   window: int | None = None, mass_share: float = 0.8) -> WindowChoice:
    """Pick (sinks, window) from the records unless given; see the module docstring."""
    if not 0 < mass_share < 1:
        raise ValueError(f"--window-mass must be in (0, 1), got {mass_share}")
    pos = position_mass(records)
    if sinks is None:
        head = float(pos[: SINK_CANDIDATES[-1]].sum())
        sinks = next(s for s in SINK_CANDIDATES if float(pos[:s].sum()) >= 0.9 * head)
        sinks = max(sinks, MIN_SINKS)
    cap = max(16, seq_len // 4)
    grid = sorted({*range(16, cap + 1, 16), cap})
    report_grid = [w for w in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192) if w <= seq_len // 2]
    wanted = sorted({*grid, *report_grid, *([window] if window is not None else [])})
    by_window = dict(zip(wanted, coverage(records, sinks, wanted).tolist()))  # one pass over the records
    capped = False
    if window is None:
        reached = [w for w in grid if by_window[w] >= mass_share]
        window = reached[0] if reached else cap
        capped = not reached
    chosen = by_window[window]
    report_cov = [by_window[w] for w in report_grid]
    curve = {
        "sink_mass": {s: round(float(pos[:s].sum()), 4) for s in (1, 4, 16, 64) if s <= len(pos)},
        "coverage_by_window": {w: round(c, 4) for w, c in zip(report_grid, report_cov)},
        "mass_share_target": mass_share,
    }
    return WindowChoice(sinks, window, chosen, capped, curve)
