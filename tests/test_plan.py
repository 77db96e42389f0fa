"""The plan file: round trip, compact form, determinism, and every rejection path names its field."""

import copy
import subprocess
import sys

import pytest
import yaml

from ilc.runtime import PlanError, load_plan, plan_from_dict
from ilc.runtime.heads import HeadKind, HeadSpec

from conftest import make_plan, mixed_plan, tiny_llama


@pytest.fixture
def plan(tiny):
    return make_plan(tiny, [[0, 1], [2, 3]], sinks=2, window=8)


def test_round_trip_and_compact_form(plan, tmp_path):
    path = plan.save(tmp_path / "p.yaml")
    text = path.read_text()
    assert "all_heads" in text and "per_head:" not in text.split("similarity:")[0]
    loaded = load_plan(path)
    assert loaded == plan
    assert loaded.to_yaml() == text  # byte-identical when written again


def test_per_head_blocks_round_trip(tiny, tmp_path):
    plan = make_plan(tiny, None, per_head=[[[0, 1, 2, 3]], [[0], [1, 2], [3]]])
    loaded = load_plan(plan.save(tmp_path / "p.yaml"))
    assert loaded.blocks == plan.blocks and not loaded.heads_agree
    assert loaded.anchor_table() == [[0, 0], [0, 1], [0, 1], [0, 3]]


def test_savings_formula(plan):
    # 4 layers, 2 KV heads, one follower per block -> 2 followers per head; proximal = 10 tokens
    dense, planned = plan.kv_tokens(110)
    assert dense == 2 * 4 * 2 * 110 and planned == dense - 4 * (110 - 10)
    assert plan.estimated_saving(10) == 0.0
    assert abs(plan.estimated_saving(10**9) - 0.25) < 1e-6  # (L - m) / (2L) = 2 / 8


def test_version_1_files_load_unchanged_in_meaning():
    """The committed ilc-plan/1 plan: shared blocks only, followers use the plan window, same savings formula."""
    plan = load_plan("plans/smollm2-135m-paper.yaml")
    raw = yaml.safe_load(open("plans/smollm2-135m-paper.yaml"))
    assert raw["format"] == "ilc-plan/1" and plan.kind_counts()["streaming"] == 0
    table = plan.head_table()
    for h, blocks in enumerate(plan.blocks):
        for b in blocks:
            assert table[b.anchor][h].kind == HeadKind.FULL
            assert all(table[f][h] == HeadSpec(HeadKind.FOLLOWER, b.anchor, plan.window) for f in b.followers)
    followers = sum(len(b.followers) for blocks in plan.blocks for b in blocks)
    dense, planned = plan.kv_tokens(8192)
    assert planned == dense - followers * (8192 - plan.sinks - plan.window)  # paper section 4.4
    raw["sharing"]["blocks"]["per_head"][0][0].update(kind="streaming", window=4)
    with pytest.raises(PlanError, match=r"unknown keys \['kind', 'window'\]"):
        plan_from_dict(raw, source="old.yaml")


def test_mixed_plan_round_trip_kinds_and_savings(tmp_path):
    plan = mixed_plan(tiny_llama(layers=5, heads=6, kv_heads=3), sinks=3, window=5)
    loaded = load_plan(plan.save(tmp_path / "m.yaml"))
    assert loaded == plan and "kind: streaming, window: 7" in (tmp_path / "m.yaml").read_text()
    assert [s.kind for s in plan.head_table()[3]] == [HeadKind.STREAMING, HeadKind.FOLLOWER, HeadKind.STREAMING]
    counts = plan.kind_counts()
    dense, planned = plan.kv_tokens(100)
    # full heads keep 2N, followers N + (sinks + window), streaming heads 2 (sinks + own window)
    streaming = 2 * ((3 + 4) + (3 + 2) + (3 + 2) + (3 + 7) + (3 + 7))
    assert planned == 2 * 100 * counts["full"] + counts["follower"] * (100 + 8) + streaming
    assert abs(plan.estimated_saving(10**9) - (counts["follower"] / 2 + counts["streaming"]) / 15) < 1e-6


def _raw(plan):
    return yaml.safe_load(plan.to_yaml())


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r.update(format="ilc-plan/9"), "format"),
    (lambda r: r.pop("model"), "model: missing"),
    (lambda r: r["model"].update(num_layers="four"), "model.num_layers: expected int"),
    (lambda r: r["model"].update(num_kv_heads=0), "model.num_kv_heads: must be >= 1"),
    (lambda r: r["model"].update(num_attention_heads=5), "not a multiple"),
    (lambda r: r["windows"].update(window=0), "windows.window: must be >= 1"),
    (lambda r: r["windows"].pop("sinks"), "windows.sinks: missing"),
    (lambda r: r["sharing"].update(mode="both"), "sharing.mode"),
    (lambda r: r["sharing"].update(skip_threshold=1.5), "skip_threshold"),
    (lambda r: r["sharing"].update(blocks={}), "missing all_heads or per_head"),
    (lambda r: r["sharing"]["blocks"].update(per_head=[]), "either all_heads or per_head"),
    (lambda r: r["sharing"]["blocks"].update(all_heads=[{"layers": [0, 2]}, {"layers": [1, 3]}]), "consecutive"),
    (lambda r: r["sharing"]["blocks"].update(all_heads=[{"layers": [0, 1]}, {"layers": [3]}]), "should start"),
    (lambda r: r["sharing"]["blocks"].update(all_heads=[{"layers": [0, 1, 2]}]), "model has 4 layers"),
    (lambda r: r["sharing"]["blocks"].update(all_heads=[{"layers": [0, 1, 2, 3], "similarity": 3}]), "not in [0, 1]"),
    (lambda r: r["sharing"]["blocks"].update(all_heads=[{"layers": [0, 1, 2, 3], "anchor": 0}]), "unknown keys"),
    (lambda r: r["sharing"]["blocks"].update(all_heads=[{"layers": ["a"]}]), "list of integers"),
    (lambda r: r["sharing"]["blocks"].update(all_heads=[7]), "expected a list of layers"),
    (lambda r: r["sharing"]["blocks"].update(all_heads=[{"layers": [0, 1, 2, 3], "kind": "sparse"}]),
     "all_heads[0].kind: expected one of"),
    (lambda r: r["sharing"]["blocks"].update(all_heads=[{"layers": [0, 1, 2, 3], "kind": "streaming"}]),
     "a streaming block needs a window"),
    (lambda r: r["sharing"]["blocks"].update(all_heads=[{"layers": [0, 1, 2, 3], "kind": "streaming",
                                                         "window": 0}]), "a streaming block needs a window"),
    (lambda r: r["sharing"]["blocks"].update(all_heads=[{"layers": [0, 1, 2, 3], "window": 8}]),
     "only streaming blocks have their own window"),
    (lambda r: r["sharing"]["blocks"].update(all_heads=[{"layers": [0, 1, 2, 3], "kind": "streaming",
                                                         "window": "big"}]), "window: expected an integer"),
])
def test_rejections_name_the_field(plan, mutate, message):
    raw = copy.deepcopy(_raw(plan))
    mutate(raw)
    with pytest.raises(PlanError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan_from_dict(raw, source="p.yaml")


def test_per_head_count_mismatch(plan):
    raw = _raw(plan)
    raw["sharing"]["blocks"] = {"per_head": [[{"layers": [0, 1, 2, 3]}]]}
    with pytest.raises(PlanError, match="1 KV heads given, model has 2"):
        plan_from_dict(raw)


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: ilc-plan/1\nmodel: [unclosed\n")
    with pytest.raises(PlanError, match="not valid YAML"):
        load_plan(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(PlanError, match="expected a mapping"):
        load_plan(bad)
    with pytest.raises(PlanError, match="no such plan file"):
        load_plan(tmp_path / "missing.yaml")


def test_save_is_atomic(plan, tmp_path):
    path = plan.save(tmp_path / "sub" / "p.yaml")
    assert path.exists() and not (tmp_path / "sub" / "p.yaml.tmp").exists()


def test_runtime_imports_without_compiler_dependencies():
    code = ("import sys\nfor m in ('scipy', 'networkx'): sys.modules[m] = None\n"
            "import ilc.runtime, ilc.kernels\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
