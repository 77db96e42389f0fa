"""Pricing token selection per head (ilc.selection_loss) on records of a tiny model, and in calibration."""

import numpy as np
import pytest
import torch

from conftest import CharTokenizer, tiny_llama
from ilc.attention_stats import record_sample, recording
from ilc.calibrate import KEEP_CANDIDATES, CalibrationSettings, calibrate, regroup
from ilc.inspect_plan import format_plan
from ilc.options import OptionError
from ilc.runtime import load_plan
from ilc.runtime.heads import Selection
from ilc.runtime.selection import choose_tokens, selection_shape
from ilc.selection_loss import selection_error


def tiny():
    return tiny_llama(layers=3, heads=4, kv_heads=2, head_dim=32, init_range=0.2)


def sample(seed: int, length: int = 192) -> torch.Tensor:
    return torch.randint(3, 90, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def records():
    model = tiny()
    with recording(model):
        return [record_sample(model, sample(s), torch.tensor([120, 150, 190]), with_keys=True, observe=16)
                for s in range(2)]


def test_observed_queries_are_each_rows_prompt_end():
    """Each row's observation queries are those of the 16 positions before it (its prompt's last)."""
    model = tiny()
    with recording(model):
        wide = record_sample(model, sample(0, 64), torch.arange(24, 50), with_keys=True)
        narrow = record_sample(model, sample(0, 64), torch.tensor([40, 50]), with_keys=True, observe=16)
    assert narrow.observed.shape == (3, 4, 2, 16, 32)
    assert torch.allclose(narrow.observed[:, :, 0].float(), wide.queries[:, :, :16], atol=1e-2)
    assert torch.allclose(narrow.observed[:, :, 1].float(), wide.queries[:, :, 10:26], atol=1e-2)


def test_less_kept_costs_more_and_nothing_dropped_costs_nothing(records):
    selections = [Selection(keep, window=16, pool=5) for keep in (0.05, 0.3, 0.9)]
    joint = selection_error(records, 2, selections)  # the shares priced together, as --choose-keep does
    errs = [joint[s] for s in selections]
    assert all(np.allclose(joint[s], selection_error(records, 2, [s])[s]) for s in selections)  # = each alone
    assert errs[0].shape == (2, 3) and (errs[0] > 0).all()
    assert errs[0].mean() > errs[1].mean() > errs[2].mean() >= 0
    model = tiny()
    with recording(model):  # sinks + window hold the whole 18-token prompt of the row
        short = record_sample(model, sample(0), torch.tensor([18]), with_keys=True, observe=16)
    sel = Selection(0.05, window=16, pool=5)
    assert np.all(selection_error([short], 2, [sel])[sel] == 0)


def test_priced_choice_is_the_runtimes():
    """The priced error is the row's attention error over exactly what the runtime's choose_tokens keeps from the
    observed queries (plus the row itself), recomputed here by hand; keeping the most recent instead differs."""
    model, sel, start = tiny(), Selection(0.6, window=16, pool=5), torch.zeros(1, dtype=torch.long)
    with recording(model):
        r = record_sample(model, sample(3), torch.tensor([120]), with_keys=True, observe=16)
    shape = selection_shape(120, start, 0, 2, sel)
    k, v = r.keys[1].float(), r.values[1].float()  # [Hkv, T, D]
    observed = r.observed[1, :, 0].float().unflatten(0, (2, 2))[None]  # [1, Hkv, g, w, D]

    def error(chosen):  # [Hkv, K] kept slots -> [Hkv] relative output error of row 120
        kept = torch.zeros(2, 192, dtype=torch.bool).scatter(1, chosen, True)
        kept[:, 120] = True
        values = v.repeat_interleave(2, 0)  # [Hq, T, D]
        logits = torch.einsum("hd,htd->ht", r.queries[1, :, 0], k.repeat_interleave(2, 0)) * r.scaling
        full = torch.einsum("ht,htd->hd", logits[:, :121].softmax(-1), values[:, :121])
        mine = torch.einsum("ht,htd->hd", logits.masked_fill(~kept.repeat_interleave(2, 0), float("-inf")).softmax(-1),
                            values)
        return ((mine - full).norm(dim=-1) / full.norm(dim=-1)).reshape(2, 2).mean(-1)

    chosen = choose_tokens(shape, k[None, :, :120], observed, r.scaling, start, sel)[0]
    recent = choose_tokens(shape, k[None, :, :120], None, r.scaling, start, sel)[0]
    priced = torch.tensor(selection_error([r], 2, [sel])[sel][:, 1], dtype=torch.float32)
    assert torch.allclose(priced, error(chosen).clamp(0, 1), atol=1e-5) and priced.max() > 0
    assert priced.max() < 1 and not torch.allclose(priced, error(recent).clamp(0, 1), atol=1e-3)


def test_refusals(records):
    with pytest.raises(ValueError, match="re-reads the prompt"):
        selection_error(records, 2, [Selection(0.2, scorer="replay", window=16)])
    with pytest.raises(ValueError, match="observed queries"):
        selection_error(records, 2, [Selection(0.2, window=32)])  # 16 were recorded
    with pytest.raises(ValueError, match="differ only in keep"):
        selection_error(records, 2, [Selection(0.2, window=16), Selection(0.3, window=16, pool=3)])
    with pytest.raises(OptionError, match="--free-selection"):
        CalibrationSettings(free_selection=True).validate()


def test_calibration_prices_selection_and_the_plan_says_so():
    """--keep: selection's measured loss is added to every layer it touches, so the chosen plan's priced error is
    at least the free one's; --free-selection reproduces the older pricing; another selection must be calibrated."""
    model = tiny_llama(layers=6, heads=4, kv_heads=2, max_pos=2048)
    settings = dict(seq_len=256, samples=3, query_rows=8, max_group_size=4, selection_window=16, selection_pool=7)
    result = calibrate(CalibrationSettings(target_saving=0.75, keep=0.1, **settings), model, CharTokenizer(), "tiny",
                       progress=False)
    (priced, err), = result.selection_error.items()
    assert priced == Selection(0.1, window=16, pool=7) and err.shape == (2, 6) and err.max() > 0
    plan = result.plan
    free = regroup(result, CalibrationSettings(target_saving=0.75, keep=0.1, free_selection=True, **settings), 256)
    assert plan.criterion["selection_loss"] == "priced" and free.criterion["selection_loss"] == "free"
    assert "its loss was priced per head" in format_plan(plan) and "not priced" in format_plan(free)
    assert plan.criterion["total_error"] >= free.criterion["total_error"]
    assert plan.estimated_saving(256) >= 0.75 - 1e-9 and plan.selection == priced
    assert regroup(result, CalibrationSettings(target_saving=0.75, keep=0.1, **settings), 256) == plan
    with pytest.raises(ValueError, match="priced no selection"):
        regroup(result, CalibrationSettings(target_saving=0.75, keep=0.2, **settings), 256)
    replay = regroup(result, CalibrationSettings(target_saving=0.75, keep=0.1, scorer="replay", **settings), 256)
    assert replay.criterion["selection_loss"] == "free"  # the replay scorer is not priced
    capped = regroup(result, CalibrationSettings(keep=0.1, max_error=0.01, **settings), 256)  # no target: a cap
    assert capped.criterion["selection_loss"] == "priced" and capped.kind_counts()["full"] > 0  # selection caps nothing


def test_choose_keep_picks_the_share_with_the_least_priced_error(tmp_path):
    """--choose-keep prices every candidate share and keeps the one whose plan reaches the target with the least
    total error: the plan equals the one --keep with that share writes, and records every share's error."""
    model = tiny_llama(layers=6, heads=4, kv_heads=2, max_pos=2048)
    settings = dict(seq_len=256, samples=3, query_rows=8, max_group_size=4, selection_window=16, selection_pool=7)
    result = calibrate(CalibrationSettings(target_saving=0.75, choose_keep=True, **settings), model, CharTokenizer(),
                       "tiny", progress=False)
    plan, tried = result.plan, result.plan.criterion["keep_choice"]
    assert set(result.selection_error) == {Selection(k, window=16, pool=7) for k in KEEP_CANDIDATES}
    assert plan.selection.keep in KEEP_CANDIDATES and tried[plan.selection.keep] == min(tried.values())
    assert len(set(tried.values())) > 1  # the shares price differently
    fixed = regroup(result, CalibrationSettings(target_saving=0.75, keep=plan.selection.keep, **settings), 256)
    assert (fixed.blocks, fixed.precision, fixed.selection) == (plan.blocks, plan.precision, plan.selection)
    assert fixed.criterion["total_error"] == tried[plan.selection.keep]
    again = regroup(result, CalibrationSettings(target_saving=0.75, choose_keep=True, **settings), 256)
    assert again == plan and load_plan(plan.save(tmp_path / "k.yaml")) == plan
    assert "the share chosen by calibration (--choose-keep)" in format_plan(plan)
    with pytest.raises(ValueError, match="out of reach at every share"):
        regroup(result, CalibrationSettings(target_saving=0.995, choose_keep=True, **settings), 256)
    for bad, message in ((dict(keep=0.2), "not both"), (dict(target_saving=None), "--target-saving"),
                         (dict(free_selection=True), "--free-selection"), (dict(scorer="replay"), "--scorer replay")):
        with pytest.raises(OptionError, match=message):
            CalibrationSettings(**{"target_saving": 0.75, "choose_keep": True, **bad}).validate()
