"""Bad input to `ilc calibrate`, `adapt`, `inspect` and `generate` (cases a probe found) is refused before the work
it would spoil: one line naming the problem, exit 2 (or the exception, through the API), no model loaded where
the check can come first, and nothing written.

The commands run on a tiny random Llama: a model directory holding only its config.json (there are no weights to
load: `load_model` fails the test) and its plan saved to a file; the tokenizer is the tests' character tokenizer.
"""

import json
import re
import time
from pathlib import Path

import pytest
import yaml

import ilc.calibrate
import ilc.demo
import ilc.models
from ilc import cli
from ilc.data import CalibrationDataError, Document, retrieval_samples
from ilc.models import ModelSource, cache_root, converted_copy
from ilc.options import OptionError
from ilc.runtime import load_plan
from ilc.runtime.plan import Adaptation

from conftest import CharTokenizer, make_plan, tiny_llama

PLAN = Path(__file__).parent.parent / "plans" / "smollm2-135m.yaml"


def no_model_loaded(*args, **kwargs):
    pytest.fail("model loaded before validation")


@pytest.fixture
def env(tmp_path, monkeypatch):
    """tmp_path/model (config.json of a 512-token tiny Llama), tmp_path/plan.yaml (a plan for it that claims a
    2048-token context), tmp_path/full.yaml (every head full), tmp_path/late.yaml (attention changes only from
    position 16 on); no model loads, the tokenizer is CharTokenizer."""
    model_dir = tmp_path / "model"
    tiny_llama(max_pos=512).config.save_pretrained(model_dir)
    wide = tiny_llama(max_pos=2048)
    make_plan(wide, [[0, 1], [2, 3]], sinks=2, window=4).save(tmp_path / "plan.yaml")
    small = tiny_llama(max_pos=512)
    make_plan(small, [[0], [1], [2], [3]]).save(tmp_path / "full.yaml")
    make_plan(small, [[0, 1], [2, 3]], sinks=8, window=8).save(tmp_path / "late.yaml")
    for module in (ilc.models, ilc.calibrate, ilc.demo):
        monkeypatch.setattr(module, "load_model", no_model_loaded)
        monkeypatch.setattr(module, "load_tokenizer", lambda *a, **k: CharTokenizer())
    (tmp_path / "short.txt").write_text("A few words only. " * 17)  # 306 characters: one sample of 256
    (tmp_path / "cjk.txt").write_text("吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。" * 400)
    return tmp_path


def listing(folder: Path) -> dict:
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


# (argv with {t} = the test folder, text the one-line error must contain)
CLI_BAD = [
    # adapt: sequences no longer than sinks + the shortest window would train on nothing (loss exactly 0)
    (["adapt", "{t}/model", "--plan", "{t}/late.yaml", "--out", "{t}/out", "--seq-len", "16"],
     "--seq-len 16: the plan changes attention only from position 16 on"),
    (["adapt", "{t}/model", "--plan", "{t}/full.yaml", "--out", "{t}/out", "--seq-len", "256"],
     "keeps every head full"),
    # --seq-len against the model's own context (its config), before the weights
    (["adapt", "{t}/model", "--plan", "{t}/plan.yaml", "--out", "{t}/out", "--seq-len", "1024"],
     "--seq-len 1024 exceeds the model's context of 512"),
    (["calibrate", "{t}/model", "--out", "{t}/p.yaml", "--seq-len", "1024"],
     "--seq-len 1024 exceeds the model's context of 512"),
    # data too short for the samples, found with the tokenizer before the weights
    (["calibrate", "{t}/model", "--out", "{t}/p.yaml", "--seq-len", "512", "--data", "{t}/short.txt"],
     "fewer than one sample of --seq-len 512"),
    (["adapt", "{t}/model", "--plan", "{t}/plan.yaml", "--out", "{t}/out", "--seq-len", "256", "--data",
      "{t}/short.txt"], "packs into 1 sample(s) of --seq-len 256"),
    # text without lower-case words cannot name planted facts: said so, not "too short"
    (["calibrate", "{t}/model", "--out", "{t}/p.yaml", "--seq-len", "64", "--data", "{t}/cjk.txt"],
     "distinct lower-case word of 5 to 10 letters; the text has 0 such words"),
    (["adapt", "{t}/model", "--plan", "{t}/plan.yaml", "--out", "{t}/out", "--seq-len", "64", "--data",
      "{t}/cjk.txt"], "pass --retrieval-share 0"),
    # generate: the context of the model (not only the plan's claim) before the dense run
    (["generate", "{t}/plan.yaml", "--model", "{t}/model", "--prompt-tokens", "600"],
     "exceed the model's context of 512"),
    (["generate", "{t}/plan.yaml", "--model", "{t}/model", "--adapter", "{t}/model"], "has no adapted: section"),
    # output formats are checked when the command line is parsed
    (["inspect", PLAN, "--plot", "{t}/plotfile"], "argument --plot: "),
    (["inspect", PLAN, "--plot", "{t}/plot.xyz"], "format 'xyz' is not one matplotlib writes"),
    (["eval", PLAN, "--out", "{t}/out", "--plot", "{t}/niah"], "no suffix names the format"),
]


@pytest.mark.parametrize("argv, message", CLI_BAD)
def test_bad_cli_input_is_refused_before_any_work(argv, message, env, capsys):
    before = listing(env)
    code, err = run_cli([a.format(t=env) if isinstance(a, str) else a for a in argv], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert listing(env) == before


def test_generate_refuses_an_adapted_plan_without_its_adapter(env, capsys):
    plan = load_plan(env / "plan.yaml")
    adapted = plan.with_options(adapted=Adaptation(
        adapter="sha256:0123456789abcdef", base_weights=plan.model.weights_fingerprint, mode="scores", tokens=512,
        steps=2, rank=4, targets=("q_proj",), layers=(1,), loss_initial=1.0, loss_final=0.5))
    path = adapted.save(env / "adapted.yaml")
    before = listing(env)
    code, err = run_cli(["generate", path, "--model", env / "model"], capsys)
    assert code == 2 and "is an adapted plan: pass --adapter DIR" in err, err
    code, err = run_cli(["generate", path, "--model", env / "model", "--adapter", env / "model"], capsys)
    assert code == 2 and "no adapter_config.json" in err, err
    assert listing(env) == before


@pytest.mark.parametrize("value, message", [("", "ILC_CACHE is set but empty"), ("FILE", "not a directory")])
def test_a_bad_ilc_cache_is_refused_before_any_conversion(value, message, tmp_path, monkeypatch):
    (tmp_path / "FILE").write_text("a file")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # never read: the cache is checked first
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ILC_CACHE", value)
    before = listing(tmp_path)
    with pytest.raises(OptionError, match=message):
        cache_root()
    with pytest.raises(OptionError, match=message):
        converted_copy(ModelSource("m", tmp_path, "m.gguf"))
    assert listing(tmp_path) == before


def test_an_unwritable_cache_is_refused_before_any_conversion(tmp_path, monkeypatch):
    (tmp_path / "blocker").write_text("not a directory")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("ILC_CACHE", str(tmp_path / "blocker" / "cache"))
    with pytest.raises(OptionError, match="cannot be written"):
        converted_copy(ModelSource("m", tmp_path, "m.gguf"))


def test_retrieval_samples_say_what_is_missing():
    cjk = [Document("cjk", "吾輩は猫である。名前はまだ無い。" * 100_000)]  # 1.6 M characters, no lower-case words
    with pytest.raises(CalibrationDataError, match="the text has 0 such words, 6 are needed"):
        retrieval_samples(CharTokenizer(), cjk, 256, 2)
    prose = [Document("p", "several lowercase words: garden window letter carriage morning evening " * 3)]
    with pytest.raises(CalibrationDataError, match=r"the text has \d+ tokens; retrieval samples of --seq-len 4096 "
                                                   "need at least 2048"):
        retrieval_samples(CharTokenizer(), prose, 4096, 2)


def test_inspect_plot_writes_exactly_the_file_it_names(tmp_path, capsys):
    out = tmp_path / "plan.svg"
    assert cli.main(["inspect", str(PLAN), "--plot", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["plan.svg"] and out.read_text().lstrip().startswith("<?xml")


MISSHAPEN = {
    "criterion": {"proximal_coverage": "most", "target_saving": "half", "min_similarity": [1], "method": {"a": 1},
                  "assignment": "lagrangian-dp", "kinds": 5, "max_error": "x", "total_error": None},
    "calibration": {"retrieval_samples": [4], "data": {"nested": True}, "seq_len": "long"},
    "distance_curve": {"coverage_by_window": {"sixteen": "half", "32": 0.5, "64": None}},
    "similarity": {"span": "x", "per_head": [[["a", None, 0.5]], "row", 3]},
}


def test_inspect_shows_misshapen_free_form_sections_as_written(tmp_path, capsys):
    raw = yaml.safe_load(PLAN.read_text())
    raw.update(MISSHAPEN)
    path = tmp_path / "odd.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert cli.main(["inspect", str(path), "--plot", str(tmp_path / "odd.png")]) == 0
    out = capsys.readouterr().out
    assert "criterion (as written, not in ilc's layout): " in out and '"proximal_coverage": "most"' in out
    assert "calibration (as written, not in ilc's layout): " in out
    assert "criterion (kinds) (as written" in out
    assert "windows: 4 sink tokens + 656 recent tokens keep full per-layer K and V\n" in out  # no coverage shown
    assert (tmp_path / "odd.png").read_bytes()[:4] == b"\x89PNG"
    raw["criterion"] = {"note": "x" * 5000}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert cli.main(["inspect", str(path)]) == 0
    assert re.search(r"xxx\.\.\. \(\d+ characters\)", capsys.readouterr().out)


def test_inspect_output_and_time_do_not_grow_with_the_head_count(tmp_path, capsys):
    """A small file may declare many heads: inspect lists a bounded number and prices every context from one pass."""
    raw = yaml.safe_load(PLAN.read_text())
    raw["model"].update(num_kv_heads=512, num_attention_heads=512, num_layers=64)
    raw["sharing"]["blocks"] = {"all_heads": [{"layers": list(range(a, a + 4))} for a in range(0, 64, 4)]}
    raw["similarity"] = {}
    path = tmp_path / "wide.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert path.stat().st_size < 10_000
    started = time.perf_counter()
    assert cli.main(["inspect", str(path), "--plot", str(tmp_path / "wide.png")]) == 0
    assert time.perf_counter() - started < 60
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 120 and "... 480 more KV heads" in out
    assert "8192 full, 24576 follower, 0 streaming (layer, KV head) pairs" in out


def test_every_range_is_used_by_an_option():
    """RANGES is the one table of ranges: every entry checks some option (no dead entries)."""
    import dataclasses

    from ilc.adapt import AdaptConfig
    from ilc.calibrate import CalibrationSettings
    from ilc.demo import GenerateOptions
    from ilc.inspect_plan import InspectOptions
    from ilc.options import RANGES

    used = {f.name for cls in (CalibrationSettings, AdaptConfig, InspectOptions, GenerateOptions)
            for f in dataclasses.fields(cls)}
    used |= {"lengths", "depths", "limit", "max_new_tokens"}  # `ilc eval` (EvalConfig.validate)
    assert set(RANGES) <= used, set(RANGES) - used
    help_text = {}
    for command in ("calibrate", "adapt", "inspect", "generate"):
        sub = cli.build_parser()._subparsers._group_actions[0].choices[command]
        help_text.update({a.dest: a.help for a in sub._actions if a.help})
    for name, rng in RANGES.items():
        if name in help_text:
            assert rng.text() in help_text[name], name  # --help states the range ...
    assert "default 2048" in help_text["seq_len"] and "default 0.8" in help_text["window_mass"]  # ... and the default


def test_settings_from_the_command_line_equal_the_dataclass_defaults():
    from ilc.adapt import AdaptConfig
    from ilc.calibrate import CalibrationSettings

    args = cli.build_parser().parse_args(["calibrate"])
    assert cli.calibration_settings(args) == CalibrationSettings()
    args = cli.build_parser().parse_args(["adapt", "--plan", "p.yaml", "--out", "o"])
    assert cli.adapt_config(args) == AdaptConfig()
    args = cli.build_parser().parse_args(["calibrate", "--kinds", " streaming, follower ,", "--data", "a", "b"])
    settings = cli.calibration_settings(args)
    assert settings.kinds == ("streaming", "follower") and settings.data == ["a", "b"]
    assert json.dumps(settings.kinds) == '["streaming", "follower"]'  # plain strings, as the plan records them
