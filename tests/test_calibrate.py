"""Calibration of a tiny random Llama built in code, end to end, plus the bad-input paths."""

import json

import numpy as np
import pytest
import torch

from ilc.calibrate import CalibrationSettings, calibrate, regroup
from ilc.options import OptionError
from ilc.data import CalibrationDataError, default_corpus, load_calibration_set
from ilc.eval.run import held_bytes
from ilc.runtime import load_plan
from ilc.runtime.heads import HeadKind

from conftest import CharTokenizer, tiny_llama


def run(tmp_path=None, **kw):
    model = tiny_llama(layers=6, heads=4, kv_heads=2, max_pos=2048)
    settings = CalibrationSettings(seq_len=256, samples=3, query_rows=8, max_group_size=4, **kw)
    return calibrate(settings, model, CharTokenizer(), "tiny", progress=False), model


@pytest.mark.parametrize("method", ["optimal", "paper"])
def test_tiny_calibration_produces_valid_plan(method, tmp_path):
    result, model = run(method=method, kinds=("follower",))
    plan = result.plan
    assert plan.num_layers == 6 and plan.num_kv_heads == 2
    assert 1 <= plan.sinks and plan.sinks + plan.window <= 256 // 2
    assert result.similarity.shape == (2, 6, 6)
    assert np.allclose(result.similarity[:, range(6), range(6)], 1.0)
    assert ((result.similarity >= 0) & (result.similarity <= 1)).all()
    floor = plan.criterion["min_similarity"]
    for h, blocks in enumerate(plan.blocks):
        for b in blocks:
            assert len(b.layers) <= 4
            for f in b.followers:
                assert result.similarity[h, b.anchor, f] >= floor - 1e-9
    assert plan.calibration["samples"] == 3 and plan.calibration["tokens"] == 3 * 256
    assert plan.kind_counts()["streaming"] == 0
    loaded = load_plan(plan.save(tmp_path / "p.yaml"))
    assert loaded.blocks == plan.blocks
    plan.apply(model)  # the plan fits the model it was calibrated on


def test_same_data_and_seed_give_byte_identical_plans(tmp_path):
    a, _ = run()
    b, _ = run()
    assert a.plan.to_yaml() == b.plan.to_yaml()


def test_target_saving_is_reached():
    result, _ = run(target_saving=0.2, target_context=2048, kinds=("follower",))
    assert result.plan.estimated_saving(2048) >= 0.2
    with pytest.raises(ValueError, match="out of reach"):
        run(target_saving=0.45, target_context=2048, kinds=("follower",))


def test_regroup_reuses_one_calibration():
    result, _ = run(target_saving=0.2, target_context=2048)
    pod = dict(kinds=("follower",), max_group_size=4)
    same = CalibrationSettings(seq_len=256, samples=3, query_rows=8, target_saving=0.2, max_group_size=4)
    assert regroup(result, same, 2048).blocks == result.plan.blocks
    higher = regroup(result, CalibrationSettings(seq_len=256, target_saving=0.3, **pod), 2048)
    assert higher.estimated_saving(2048) >= 0.3 and higher.sinks == result.plan.sinks
    assert higher.kind_counts()["streaming"] == 0 and "assignment" not in higher.criterion


def test_mixed_plan_reaches_targets_past_half_with_streaming_heads(tmp_path):
    """Sharing keys alone cannot save half the cache; streaming heads can. Every option's price is recorded."""
    result, model = run(target_saving=0.6)  # target context defaults to --seq-len (256)
    plan = result.plan
    assert plan.estimated_saving(256) >= 0.6 and plan.kind_counts()["streaming"] > 0
    assert result.streaming_error.shape == (2, 6, len(result.streaming_windows))
    assert ((result.streaming_error >= 0) & (result.streaming_error <= 1)).all()
    assert plan.criterion["assignment"] == "lagrangian-dp" and plan.criterion["target_context"] == 256
    text = plan.save(tmp_path / "p.yaml").read_text()
    assert "format: ilc-plan/2" in text and "kind: streaming" in text
    assert load_plan(tmp_path / "p.yaml") == plan
    plan.apply(model)
    lower = regroup(result, CalibrationSettings(seq_len=256, target_saving=0.3, max_group_size=4), 256)
    assert 0.3 <= lower.estimated_saving(256) < plan.estimated_saving(256)
    assert lower.criterion["total_error"] <= plan.criterion["total_error"]


def test_streaming_error_vanishes_when_the_window_covers_every_row():
    result, _ = run(target_saving=0.3)
    windows = result.streaming_windows
    assert windows[-1] == 128  # up to half the sequence; sampled rows are in the second half
    errors = result.streaming_error.mean(axis=(0, 1))
    assert all(a >= b - 1e-9 for a, b in zip(errors, errors[1:])), "a larger window never costs more"
    assert errors[0] > 0.01


def test_retrieval_samples_are_mixed_in_and_recorded():
    with_retrieval, _ = run(target_saving=0.3)
    prose_only, _ = run(target_saving=0.3, retrieval_samples=0)
    assert with_retrieval.plan.calibration["retrieval_samples"] == 4
    assert prose_only.plan.calibration["retrieval_samples"] == 0
    assert not np.allclose(with_retrieval.streaming_error, prose_only.streaming_error)


def test_retrieval_samples_plant_facts_and_record_the_recall_rows():
    from ilc.data import retrieval_samples

    tok = CharTokenizer()
    samples = retrieval_samples(tok, default_corpus(), 1024, 2, rows=16, seed=3)
    assert len(samples) == 2
    for s in samples:
        assert s.ids.shape == (1024,) and 0 < len(s.rows) <= 16
        recalled = s.ids[s.rows.min():].tolist()
        planted = s.ids[: s.rows.min()].tolist()
        assert s.rows.min() > 1024 // 2  # recall and copy sit at the end, far from what they copy
        # what a recall row must predict (the next 3 tokens) was planted earlier in the sample
        for r in s.rows.tolist()[:4]:
            piece = s.ids[r + 1:r + 4].tolist()
            assert any(planted[i:i + 3] == piece for i in range(len(planted) - 3)), (r, piece)
        assert len(recalled) < 1024 // 2


def test_explicit_windows_and_per_layer():
    result, _ = run(sinks=2, window=16, per_layer=True, min_similarity=0.01, kinds=("follower",))
    plan = result.plan
    assert (plan.sinks, plan.window) == (2, 16)
    assert plan.heads_agree and plan.mean_blocks_per_head < 6


def test_bad_settings_and_data(tmp_path):
    tok = CharTokenizer()
    with pytest.raises(CalibrationDataError, match="fewer than one sample"):
        load_calibration_set(tok, None, 10**6)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationDataError, match="holds no .txt"):
        load_calibration_set(tok, [str(empty)], 64)
    (empty / "blank.txt").write_text("   \n")
    with pytest.raises(CalibrationDataError, match="all documents are empty"):
        load_calibration_set(tok, [str(empty)], 64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(CalibrationDataError, match="bad.jsonl:2: not valid JSON"):
        load_calibration_set(tok, [str(bad)], 4)
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CalibrationDataError, match="string 'text' field"):
        load_calibration_set(tok, [str(bad)], 4)
    with pytest.raises(CalibrationDataError, match="no such file"):
        load_calibration_set(tok, [str(tmp_path / "nope")], 4)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        calibrate(CalibrationSettings(seq_len=4096), tiny_llama(max_pos=512), tok, "tiny", progress=False)
    with pytest.raises(ValueError, match="--target-saving needs --method optimal"):
        run(method="paper", target_saving=0.2)


def test_jsonl_and_directory_inputs(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 100)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": "beta " * 50}) for _ in range(3)))
    data = load_calibration_set(CharTokenizer(), [str(tmp_path)], 64)
    assert data.documents == 4 and data.samples.shape[1] == 64


def test_default_corpus_is_real_prose_and_installed():
    docs = default_corpus()
    text = " ".join(d.text for d in docs)
    assert len(text) > 40_000 and "Elizabeth" in text and "Darcy" in text


def test_keep_adds_selection_priced_into_the_target(tmp_path):
    """--keep: full heads are priced as selection leaves them, so a 90% target is met with fewer streaming heads
    than selection-free pricing would need; the plan records the selection and its bytes are the formula's."""
    result, model = run(target_saving=0.6)
    settings = dict(seq_len=256, max_group_size=4, selection_window=16, selection_pool=7, free_selection=True)
    with_sel = regroup(result, CalibrationSettings(target_saving=0.75, keep=0.1, **settings), 256)
    assert with_sel.selection is not None
    assert (with_sel.selection.keep, with_sel.selection.window, with_sel.selection.pool) == (0.1, 16, 7)
    assert with_sel.kind_counts()["follower"] == 0  # a 16-token selection window is below the followers' window
    assert with_sel.criterion["kinds"] == ["streaming"]  # recorded as priced: followers were not an option
    assert with_sel.estimated_saving(256) >= 0.75 - 1e-9
    half = regroup(result, CalibrationSettings(target_saving=0.6, keep=0.5, **settings), 256)
    assert half.kind_counts()["streaming"] < result.plan.kind_counts()["streaming"]  # selection did part of it
    assert load_plan(with_sel.save(tmp_path / "sel.yaml")) == with_sel
    with pytest.raises(OptionError, match="--keep"):
        CalibrationSettings(target_saving=0.3, keep=0.1, kinds=("follower",)).validate()
    with pytest.raises(OptionError, match="keep"):
        CalibrationSettings(keep=1.5).validate()
    with pytest.raises(OptionError, match="--selection-pool must be odd"):
        CalibrationSettings(keep=0.5, selection_pool=16).validate()


def test_precision_is_priced_and_chosen_beside_kinds(tmp_path):
    """--precision: every head's bits are priced from recorded keys and values and the DP picks kinds and bits
    together; the plan's bytes reach the target (scales counted) and a real cache holds what the plan says."""
    model = tiny_llama(layers=6, heads=4, kv_heads=2, head_dim=32, max_pos=2048)
    settings = dict(seq_len=512, samples=2, query_rows=8, max_group_size=4, residual=32)
    names = ("K8V8", "K4cV4", "K2V2")
    result = calibrate(CalibrationSettings(target_saving=0.8, precision=names, **settings), model, CharTokenizer(),
                       "tiny", progress=False)
    plan, err = result.plan, result.precision_error
    shared = {k: e for k, e in err.items() if isinstance(k, str)}  # the rest: streaming heads, (name, window)
    assert set(shared) == set(names) and err["K8V8"].mean() < err["K4cV4"].mean() < err["K2V2"].mean()
    assert set(err) - set(shared) == {(n, 256) for n in names}  # the windows past residual + 4 groups (32 + 128)
    assert err["K8V8", 256].mean() < err["K4cV4", 256].mean() < err["K2V2", 256].mean()
    sixteen = regroup(result, CalibrationSettings(target_saving=0.8, precision=names, streams_16bit=True,
                                                  **settings), 512)
    assert plan.criterion["total_error"] <= sixteen.criterion["total_error"]  # more options, never worse
    assert plan.criterion["streaming_precisions"] == ["K16V16", *names]
    assert sixteen.criterion["streaming_precisions"] == ["K16V16"]
    assert not any(sixteen.precision.of(layer, h).quantized for layer, row in enumerate(sixteen.head_table())
                   for h, spec in enumerate(row) if spec.kind == HeadKind.STREAMING)
    assert plan.quantized and plan.estimated_saving(512) >= 0.8 - 1e-9
    assert plan.criterion["precisions"] == ["K16V16", *names] and plan.precision.residual == 32
    assert load_plan(plan.save(tmp_path / "q.yaml")) == plan
    none = regroup(result, CalibrationSettings(target_saving=0.8, **settings), 512)
    assert none.precision is None and not none.quantized
    with pytest.raises(ValueError, match="priced no K4V4"):
        regroup(result, CalibrationSettings(target_saving=0.8, precision=("K4V4",), **settings), 512)
    held, dense = held_bytes(plan, 512, dtype=torch.float16)
    sides = sum((p.key_bits < 16) + (p.value_bits < 16) for row in plan.precision.heads for p in row)
    tails = sides * (32 + 32) * 32 * 2  # at most each quantized side's allocated 16-bit tail (residual + group)
    assert held <= plan.kv_bytes(512)[1] + tails and 1 - held / dense >= 0.75
    with pytest.raises(OptionError, match="--precision"):
        CalibrationSettings(precision=("K3V3",)).validate()
    with pytest.raises(OptionError, match="--precision"):
        CalibrationSettings(precision=("K8V8",), kinds=("follower",)).validate()
    with pytest.raises(OptionError, match="--streams-16bit .* give --precision"):
        CalibrationSettings(streams_16bit=True).validate()
