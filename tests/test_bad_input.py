"""Bad input never passes silently: every CLI option at each end of its range, and every case found by hand.

A rejection is one line on stderr that names the option, exit code 2, before any model is loaded, and leaves no
output file. Accepted edge values pass the same validation (checked without running the work).
"""

import warnings

import pytest
import torch
import yaml

from ilc import cli
from ilc.calibrate import CalibrationSettings
from ilc.options import OptionError
from ilc.runtime import PlanError, load_plan, plan_from_dict, remove_plan
from ilc.runtime.apply import QualityWarning

from conftest import make_plan, tiny_llama

PLAN = "plans/smollm2-135m.yaml"


def run_cli(argv, capsys, monkeypatch=None):
    if monkeypatch is not None:  # any model load here is a failure: validation must come first
        import ilc.calibrate
        import ilc.models

        for module in (ilc.models, ilc.calibrate):
            monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("model loaded before validation"))
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


# (argv after the command, text the one-line error must contain): values just outside each end of every range
CALIBRATE_BAD = [
    (["--seq-len", "15"], "--seq-len must be >= 16"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--query-rows", "0"], "--query-rows must be >= 1"),
    (["--min-similarity", "-5"], "--min-similarity must be in (0, 1)"),
    (["--min-similarity", "0"], "--min-similarity must be in (0, 1)"),
    (["--min-similarity", "2"], "--min-similarity must be in (0, 1)"),
    (["--min-similarity", "1"], "--min-similarity must be in (0, 1)"),
    (["--target-saving", "0"], "--target-saving must be in (0, 1)"),
    (["--target-saving", "1"], "--target-saving must be in (0, 1)"),
    (["--target-saving", "0.5", "--kinds", "follower"], "--target-saving must be below 0.5"),
    (["--target-context", "0"], "--target-context must be >= 1"),
    (["--max-group-size", "0"], "--max-group-size must be >= 1"),
    (["--sinks", "-1"], "--sinks must be >= 0"),
    (["--sinks", "1024"], "--sinks 1024 leaves no distant tokens"),
    (["--window", "0"], "--window must be >= 1"),
    (["--window", "1024"], "--window 1024 leaves no distant tokens"),
    (["--window-mass", "0"], "--window-mass must be in (0, 1)"),
    (["--window-mass", "2"], "--window-mass must be in (0, 1)"),
    (["--max-error", "-0.1"], "--max-error must be in [0, 1]"),
    (["--max-error", "1.5"], "--max-error must be in [0, 1]"),
    (["--keep", "0"], "--keep must be in (0, 1)"),
    (["--keep", "1"], "--keep must be in (0, 1)"),
    (["--selection-window", "0"], "--selection-window must be >= 1"),
    (["--keep", "0.1", "--target-saving", "0.3", "--kinds", "follower"], "--keep with --target-saving"),
    (["--max-error", "0.1", "--kinds", "follower"], "--max-error is for mixed plans"),
    (["--max-error", "0.1", "--min-similarity", "0.9"], "--max-error or --min-similarity"),
    (["--retrieval-samples", "-1"], "--retrieval-samples must be >= 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--kinds", "follower,sparse"], "--kinds must be a comma list"),
    (["--kinds", ","], "--kinds must be a comma list"),
    (["--per-layer"], "--per-layer groups whole layers"),
    (["--criterion", "jsd"], "--criterion jsd cannot price streaming heads"),
    (["--method", "paper", "--target-saving", "0.2"], "--target-saving needs --method optimal"),
    (["--method", "fast"], "argument --method: invalid choice"),
    (["--seq-len", "abc"], "argument --seq-len: invalid int value"),
    (["--data", "/nonexistent/corpus"], "/nonexistent/corpus: no such file or directory"),
    (["--device", "gpu0"], "--device 'gpu0' is not a torch device"),
    (["--device", "cuda:7"], "no such CUDA device"),
]

# accepted edge values: validation passes
CALIBRATE_EDGES = [
    ["--seq-len", "16", "--window", "7", "--sinks", "0"], ["--samples", "1"], ["--query-rows", "1"],
    ["--min-similarity", "0.01", "--kinds", "follower"], ["--min-similarity", "0.99", "--kinds", "follower"],
    ["--target-saving", "0.01"], ["--target-saving", "0.99"], ["--target-saving", "0.49", "--kinds", "follower"],
    ["--target-context", "1", "--target-saving", "0.1"], ["--max-group-size", "1"], ["--sinks", "0"],
    ["--window", "1"], ["--window-mass", "0.01"], ["--window-mass", "0.99"], ["--max-error", "0"],
    ["--max-error", "1"], ["--retrieval-samples", "0"], ["--seed", "0"], ["--kinds", "streaming"],
    ["--per-layer", "--kinds", "follower"],
]


@pytest.mark.parametrize("argv, message", CALIBRATE_BAD)
def test_calibrate_rejects_out_of_range_options_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    out = tmp_path / "plan.yaml"
    code, err = run_cli(["calibrate", "--out", str(out), *argv], capsys, monkeypatch)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", CALIBRATE_EDGES)
def test_calibrate_accepts_the_edges_of_every_range(argv):
    args = cli.build_parser().parse_args(["calibrate", *argv])
    settings = cli.calibration_settings(args)
    assert isinstance(settings, CalibrationSettings)


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "0"], "--lengths must be >= 64"),
    (["--lengths", "63"], "--lengths must be >= 64"),
    (["--lengths", "10k"], "exceed the model's context of 8192"),
    (["--lengths", "8k"], "exceed the model's context of 8192"),
    (["--lengths", "two"], "--lengths: expected token counts"),
    (["--depths", "-1"], "--depths / --ruler-depths must be in [0, 100]"),
    (["--depths", "101"], "--depths / --ruler-depths must be in [0, 100]"),
    (["--ruler-depths", "150"], "--depths / --ruler-depths must be in [0, 100]"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be in [1, 4096]"),
    (["--max-new-tokens", "5000"], "--max-new-tokens must be in [1, 4096]"),
    (["--methods", "full,h2o"], "--methods: unknown h2o"),
    (["--haystack", "/nonexistent"], "--haystack /nonexistent: no such directory"),
    (["--peers", "/nonexistent.jsonl"], "--peers /nonexistent.jsonl: no such file"),
    (["--device", "tpu"], "--device 'tpu' is not a torch device"),
])
def test_eval_rejects_bad_options_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    out = tmp_path / "results"
    code, err = run_cli(["eval", PLAN, "--out", str(out), *argv], capsys, monkeypatch)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_eval_accepts_the_edges_of_every_range(tmp_path):
    args = cli.build_parser().parse_args(["eval", PLAN, "--out", str(tmp_path / "o"), "--lengths", "64,8000",
                                          "--max-new-tokens", "1", "--depths", "0,100", "--ruler-depths", "0,100",
                                          "--limit", "1"])
    plan, tasks, methods, config, _ = cli.eval_request(args)
    assert config.lengths == (64, 8000) and config.max_new_tokens == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, argv, message", [
    ("inspect", ["--context", "0"], "--context must be >= 1"),
    ("inspect", ["--batch", "0"], "--batch must be >= 1"),
    ("inspect", ["--dtype-bytes", "3"], "argument --dtype-bytes: invalid choice"),
    ("generate", ["--prompt-tokens", "63"], "--prompt-tokens must be >= 64"),
    ("generate", ["--prompt-tokens", "9000"], "exceed the model's context of 8192"),
    ("generate", ["--new-tokens", "0"], "--new-tokens must be in [1, 4096]"),
])
def test_inspect_and_generate_reject_bad_options(command, argv, message, capsys, monkeypatch):
    code, err = run_cli([command, PLAN, *argv], capsys, monkeypatch)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_unwritable_outputs_are_refused_before_the_work(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    for argv in (["calibrate", "--out", str(blocker / "plan.yaml")],
                 ["eval", PLAN, "--out", str(blocker / "results")],
                 ["inspect", PLAN, "--plot", str(blocker / "p.png")],
                 ["calibrate", "--out", str(tmp_path)]):
        code, err = run_cli(argv, capsys, monkeypatch)
        assert code == 2 and ("cannot be written" in err or "is a directory" in err), err
        assert len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_plan_problems_are_plan_errors_naming_the_file(tmp_path, capsys):
    binary = tmp_path / "plan.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(PlanError, match="plan.bin: not a plan"):
        load_plan(binary)
    code, err = run_cli(["inspect", str(binary)], capsys)
    assert code == 2 and "plan.bin: not a plan" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("path, key, hint", [
    (("windows",), "windoww", "did you mean 'window'"),
    (("sharing",), "skip_treshold", "did you mean 'skip_threshold'"),
    (("model",), "num_layer", "did you mean 'num_layers'"),
    ((), "calibraton", "did you mean 'calibration'"),
    ((), "notes", "extensions"),
])
def test_unknown_plan_keys_are_rejected_with_a_hint(path, key, hint):
    raw = yaml.safe_load(open(PLAN))
    section = raw
    for p in path:
        section = section[p]
    section[key] = 100
    with pytest.raises(PlanError, match=f"p.yaml: .*unknown key '{key}'.*{hint}"):
        plan_from_dict(raw, source="p.yaml")


def test_extensions_are_kept_and_round_trip(tmp_path):
    raw = yaml.safe_load(open(PLAN))
    raw["extensions"] = {"x-serving": {"engine": "vllm", "blocks": [1, 2]}}
    plan = plan_from_dict(raw, source="p.yaml")
    assert load_plan(plan.save(tmp_path / "p.yaml")).extensions == raw["extensions"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(skip_threshold=1.5), "skip_threshold: expected a number in \\(0, 1\\]"),
    (dict(skip_threshold=0.0), "skip_threshold"),
    (dict(skip_threshold=-1), "skip_threshold"),
    (dict(skip_threshold=True), "skip_threshold"),
    (dict(mode="both"), "mode: expected one of"),
    (dict(kernels="yes"), "kernels: expected None, True or False"),
])
def test_runtime_options_follow_the_plan_format_rules(tiny, kwargs, message):
    plan = make_plan(tiny, [[0, 1], [2, 3]])
    with pytest.raises(PlanError, match=message):
        plan.apply(tiny, **kwargs)
    with pytest.raises(PlanError, match=message):
        plan.new_cache(tiny, **kwargs)
    assert getattr(tiny, "_ilc_applied", None) is None and tiny.config._attn_implementation == "sdpa"


def test_applying_a_plan_changes_nothing_another_model_can_see():
    from transformers import LlamaForCausalLM

    first = tiny_llama()
    second = LlamaForCausalLM(first.config).eval()  # built from the very same config object
    assert second.config is first.config
    x = torch.randint(3, 90, (1, 24))
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = second.generate(x, **gen)
    plan = make_plan(first, [[0, 1], [2, 3]])
    plan.apply(first, strict=False)
    assert second.config._attn_implementation == "sdpa"
    assert torch.equal(second.generate(x, **gen), want)  # plain generate on the other model still works
    plan.apply(second, strict=False)
    remove_plan(second)
    assert first.config._attn_implementation == "ilc_pod" and first.generate(x, **gen).shape == (1, 28)


def test_a_cache_for_another_plan_is_refused(tiny):
    a = make_plan(tiny, [[0, 1], [2, 3]])
    b = make_plan(tiny, [[0, 1, 2, 3]])
    b.apply(tiny)
    x = torch.randint(3, 90, (1, 12))
    with pytest.raises(PlanError, match="built for another plan"):
        tiny(x, past_key_values=a.new_cache())
    with pytest.raises(PlanError, match="runs another plan"):
        a.new_cache(tiny)
    with pytest.raises(PlanError, match="another plan \\(or mode\\)"):
        tiny(x, past_key_values=b.new_cache(mode="keys"))
    tiny(x, past_key_values=b.new_cache(tiny))  # the applied plan's own cache is accepted


def test_keys_mode_on_unadapted_weights_warns(tiny, tmp_path, capsys):
    plan = make_plan(tiny, [[0, 1], [2, 3]], mode="keys")
    with pytest.warns(QualityWarning, match="keys mode .* needs weights adapted"):
        plan.apply(tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_plan(tiny, [[0, 1], [2, 3]]).apply(tiny)  # scores mode: no warning
    keys = load_plan(PLAN).with_options(mode="keys").save(tmp_path / "k.yaml")
    code, _ = run_cli(["inspect", str(keys)], capsys)
    assert code == 0
    code = cli.main(["inspect", str(keys)])
    assert "warning: keys mode" in capsys.readouterr().out


def test_ctrl_c_exits_130_with_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_inspect", interrupted)
    code, err = run_cli(["inspect", PLAN], capsys)
    assert code == 130 and err == "ilc inspect: interrupted; nothing was written"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--debug", "inspect", PLAN])

    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "_inspect", broken)
    code, err = run_cli(["inspect", PLAN], capsys)
    assert code == 1 and err == ("ilc inspect: internal error: RuntimeError: boom second line "
                                 "(run with --debug for the traceback)")
    monkeypatch.setenv("ILC_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["inspect", PLAN])


def test_api_validates_before_work():
    with pytest.raises(OptionError, match="--seq-len must be >= 16"):
        CalibrationSettings(seq_len=8).validate()
    from ilc.eval.config import EvalConfig, build_samples

    with pytest.raises(OptionError, match="--lengths must be >= 64"):
        build_samples(["niah"], None, EvalConfig(lengths=(0,)), None)
    with pytest.raises(OptionError, match="exceed the model's context of 4096"):
        EvalConfig(lengths=(4096,)).validate(4096)
