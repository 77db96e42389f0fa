"""The `ilc` command line: inspect output and plot, and clear errors with exit code 2."""

from pathlib import Path

import pytest
from transformers import GPT2Config, LlamaConfig, MistralConfig

from ilc.cli import main
from ilc.runtime import UnsupportedModelError, check_supported

PLAN = Path(__file__).parent.parent / "plans" / "smollm2-135m.yaml"


def test_inspect_prints_blocks_windows_and_savings(capsys):
    assert main(["inspect", str(PLAN), "--context", "32768"]) == 0
    out = capsys.readouterr().out
    assert "plan for smollm2-135m" in out and "4 sink tokens + 656 recent tokens" in out
    assert "head 0:" in out and "head 2:" in out
    assert "<- --context" in out and "exceeds the model's limit of 8192" in out


def test_inspect_shows_bits_per_head_and_bytes_with_scales(tmp_path, capsys):
    from ilc.runtime import load_plan
    from ilc.runtime.bits import HeadPrecision, uniform_precision

    plan = load_plan(PLAN)
    quantized = plan.with_options(precision=uniform_precision(plan.head_table(), HeadPrecision.parse("K4cV2")))
    assert main(["inspect", str(quantized.save(tmp_path / "q.yaml")), "--context", "4096"]) == 0
    out = capsys.readouterr().out
    full = plan.kind_counts()["full"]
    assert "bits per layer and KV head" in out and f"{full} K4cV2" in out and "42" in out
    assert "integers with their scales" in out
    saved = f"{quantized.estimated_saving(4096):.1%} <- --context"
    assert saved in out and quantized.estimated_saving(4096) > plan.estimated_saving(4096) + 0.3


def test_inspect_explains_the_plans_token_selection(capsys):
    plan = PLAN.parent / "smollm2-135m-90pct.yaml"
    assert main(["inspect", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "the best 25% of the others (scored by the last 16 prompt queries, avg-pooled over 31 tokens)" in out
    assert "its loss was priced per head in calibration" in out


def test_inspect_plot_writes_png(tmp_path):
    png = tmp_path / "plan.png"
    assert main(["inspect", str(PLAN), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_corrupt_plan_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: ilc-plan/1\nmodel: {name: x\n")
    assert main(["inspect", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_calibrate_unknown_model_is_a_clear_error(tmp_path, capsys):
    assert main(["calibrate", str(tmp_path / "missing-model"), "--out", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err
    assert "neither an embedded model" in err and not (tmp_path / "p.yaml").exists()


def test_unsupported_architectures_fail_with_the_supported_list():
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2' is not supported.*llama"):
        check_supported(GPT2Config())
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        check_supported(MistralConfig(sliding_window=1024, max_position_embeddings=32768))
    check_supported(LlamaConfig())
    check_supported(MistralConfig(sliding_window=None))
