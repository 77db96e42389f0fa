"""Calibration of a tiny random Llama built in code, end to end, plus the bad-input paths."""

import json

import numpy as np
import pytest

from ilc.calibrate import CalibrationSettings, calibrate, regroup
from ilc.data import CalibrationDataError, default_corpus, load_calibration_set
from ilc.runtime import load_plan

from conftest import tiny_llama


class CharTokenizer:
    """Enough of a tokenizer for calibration: bytes -> ids below the tiny vocab."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 90) for c in text]}


def run(tmp_path=None, **kw):
    model = tiny_llama(layers=6, heads=4, kv_heads=2, max_pos=2048)
    settings = CalibrationSettings(seq_len=256, samples=3, query_rows=8, max_group_size=4, **kw)
    return calibrate(settings, model, CharTokenizer(), "tiny", progress=False), model


@pytest.mark.parametrize("method", ["optimal", "paper"])
def test_tiny_calibration_produces_valid_plan(method, tmp_path):
    result, model = run(method=method)
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
    loaded = load_plan(plan.save(tmp_path / "p.yaml"))
    assert loaded.blocks == plan.blocks
    plan.apply(model)  # the plan fits the model it was calibrated on


def test_same_data_and_seed_give_byte_identical_plans(tmp_path):
    a, _ = run()
    b, _ = run()
    assert a.plan.to_yaml() == b.plan.to_yaml()


def test_target_saving_is_reached():
    result, _ = run(target_saving=0.2, target_context=2048)
    assert result.plan.estimated_saving(2048) >= 0.2
    with pytest.raises(ValueError, match="out of reach"):
        run(target_saving=0.45, target_context=2048)


def test_regroup_reuses_one_calibration():
    result, _ = run(target_saving=0.2, target_context=2048)
    same = CalibrationSettings(seq_len=256, samples=3, query_rows=8, max_group_size=4, target_saving=0.2)
    assert regroup(result, same, 2048).blocks == result.plan.blocks
    higher = regroup(result, CalibrationSettings(seq_len=256, max_group_size=4, target_saving=0.3), 2048)
    assert higher.estimated_saving(2048) >= 0.3 and higher.sinks == result.plan.sinks


def test_explicit_windows_and_per_layer():
    result, _ = run(sinks=2, window=16, per_layer=True, min_similarity=0.0)
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
