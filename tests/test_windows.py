"""Window choice on synthetic attention records with a known distance curve."""

import torch

from ilc.attention_stats import SampleRecord
from ilc.windows import choose_windows, coverage


def synthetic_record(t=512, rows=8, sink_share=0.3, recent=64, recent_share=0.5, layers=2, heads=2):
    """Rows put `sink_share` on position 0, `recent_share` uniformly on the last `recent` tokens, the rest uniformly
    over everything in between."""
    rs = torch.arange(t - rows, t)
    probs = torch.zeros(layers, heads, rows, t)
    for k, i in enumerate(rs.tolist()):
        probs[..., k, 0] = sink_share
        probs[..., k, i - recent + 1:i + 1] = recent_share / recent
        mid = slice(1, i - recent + 1)
        probs[..., k, mid] = (1 - sink_share - recent_share) / (i - recent)
    return SampleRecord(probs.half(), torch.zeros(layers, heads, rows), torch.zeros(layers, 1, t, 4).half(), rs)


def test_coverage_matches_construction():
    rec = synthetic_record()
    cov = coverage([rec], sinks=1, windows=[64, 512])
    assert abs(float(cov[0]) - 0.8) < 0.01  # sink 0.3 + recent 0.5
    assert abs(float(cov[1]) - 1.0) < 0.01


def test_choose_smallest_window_reaching_share_and_sinks_from_curve():
    rec = synthetic_record()
    choice = choose_windows([rec], seq_len=512, mass_share=0.79)
    assert choice.sinks == 4  # the mass sits on position 0; at least the StreamingLLM default of 4
    assert choice.window == 64 and not choice.capped
    assert choice.coverage >= 0.79


def test_window_capped_by_calibration_length():
    rec = synthetic_record(sink_share=0.05, recent_share=0.1)
    choice = choose_windows([rec], seq_len=512, mass_share=0.95)
    assert choice.capped and choice.window == 512 // 4


def test_explicit_windows_win():
    choice = choose_windows([synthetic_record()], seq_len=512, sinks=2, window=32)
    assert (choice.sinks, choice.window) == (2, 32)
