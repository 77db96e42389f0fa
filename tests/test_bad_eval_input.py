"""Bad input to `ilc eval` is refused before the work it would spoil: one line naming the problem, exit 2.

Each case runs the command line on a tiny random Llama (its plan saved to a file) with SmolLM2's tokenizer: the
prompts are built from the tokenizer alone, before any model loads, so a check that can come first runs with a
`load_model` that fails the test. Nothing under the test's folder is written or changed by a refused run.
"""

import json

import pytest
from transformers import AutoTokenizer

import ilc.eval.run
import ilc.models
from ilc import cli
from ilc.eval.config import EvalConfig, build_samples
from ilc.eval.records import read_records
from ilc.eval.tasks import TASKS, make_sample
from ilc.models import ModelSource, converted_copy, resolve
from ilc.options import OptionError

from conftest import make_plan, tiny_llama

REAL_GENERATE = ilc.eval.run.generate_greedy


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(converted_copy(resolve("smollm2-135m")))


def tiny(tokenizer, seed=0):
    return tiny_llama(layers=4, heads=4, kv_heads=2, vocab=len(tokenizer), max_pos=1024, seed=seed)


@pytest.fixture
def setup(tokenizer, tmp_path, monkeypatch):
    """A plan file for the tiny model; `load_tokenizer` gives SmolLM2's tokenizer, `load_model` fails the test
    (`models["load"]` replaces it) and so does any generation (`models["generate"]`)."""
    plan_path = make_plan(tiny(tokenizer), [[0, 1], [2, 3]], sinks=4, window=64).save(tmp_path / "plan.yaml")
    models = {"load": lambda *a, **k: pytest.fail("model loaded before validation"),
              "generate": lambda *a, **k: pytest.fail("a method ran before validation")}
    monkeypatch.setattr(ilc.models, "load_tokenizer", lambda *a, **k: tokenizer)
    monkeypatch.setattr(ilc.models, "load_model", lambda *a, **k: models["load"](*a, **k))
    monkeypatch.setattr(ilc.eval.run, "generate_greedy", lambda *a, **k: models["generate"](*a, **k))
    return plan_path, models


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_eval(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip()


def record(**kw):
    base = dict(key="full|niah|128|0.5|0", method="full", task="niah", length=128, depth=0.5, seed=0, answers=["1"],
                score=1.0, settings={"method": "full", "prompt": "sha256:0000000000000000"}, text="1", kv_bytes=10,
                dense_bytes=10, tokens=120, prefill_s=0.1, decode_ms=1.0)
    return json.dumps({**base, **kw})


# (argv, {file name under tmp_path: content written first}, text the one-line error must contain)
BAD = [
    (["--lengths", "64"], {}, "a 64-token prompt is too short for niah: it needs at least 70 tokens"),
    (["--task", "multikey", "--lengths", "128"], {}, "a 128-token prompt is too short for multikey: it needs at least"),
    (["--task", "ruler", "--lengths", "256", "--ruler-depths", "50"], {}, "too short for commonwords"),
    (["--lengths", "infk"], {}, "--lengths: expected token counts like 2k,4k or 2048, got 'infk'"),
    (["--lengths", "1e999k"], {}, "--lengths: expected token counts like 2k,4k or 2048, got '1e999k'"),
    (["--lengths", "nank"], {}, "--lengths: expected token counts"),
    (["--haystack", "{tmp}/hay", "--lengths", "512"], {"hay/a.txt": "A short haystack. " * 20},
     "the haystack has 100 tokens; a 512-token niah prompt needs 443 of them"),
    (["--plot", "{tmp}/niah.xyz"], {}, "niah.xyz: format 'xyz' is not one matplotlib writes; use .png"),
    (["--plot", "{tmp}/niah"], {}, "argument --plot: {tmp}/niah: no suffix names the format"),
    (["--peers", "{tmp}/peers.jsonl"], {"peers.jsonl": record() + "\n" + '{"key": "x", "score": 1, "settings": {}}\n'},
     "--peers {tmp}/peers.jsonl line 2: not an eval record: missing method, task"),
    (["--peers", "{tmp}/peers.jsonl"], {"peers.jsonl": "\n" + "not json\n"},
     "--peers {tmp}/peers.jsonl line 2: not JSON"),
    (["--peers", "{tmp}/peers.jsonl"], {"peers.jsonl": record(task="summarize") + "\n"},
     "line 1: not an eval record: unknown task 'summarize'"),
    ([], {"out/results.jsonl": record() + "\n" + record(score="high") + "\n"},
     "resumed records {tmp}/out/results.jsonl line 2: not an eval record: score is str"),
    ([], {"out/results.jsonl": record() + "\n" + record(kv_bytes=None, dense_bytes=0) + "\n"},
     "results.jsonl line 2: not an eval record: kv_bytes is NoneType"),
    ([], {"out/results.jsonl": '{"key": "a", "score": 1} trailing\n'}, "results.jsonl line 1: not JSON (Extra data)"),
    ([], {"out/results.jsonl": "[1, 2]\n"}, "line 1: not an eval record: expected a JSON object, got list"),
    ([], {"out/results.jsonl": record(dense_bytes=0) + "\n"}, "dense_bytes > 0"),
]


@pytest.mark.parametrize("argv, files, message", BAD)
def test_eval_refuses_bad_input_before_any_model_loads(argv, files, message, setup, tmp_path, capsys):
    plan_path, _ = setup
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = snapshot(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = run_eval(["eval", str(plan_path), "--out", str(tmp_path / "out"), "--lengths", "128", *argv], capsys)
    assert code == 2 and message.replace("{tmp}", str(tmp_path)) in err and len(err.splitlines()) == 1, err
    assert snapshot(tmp_path) == before


def test_a_plan_for_other_weights_is_refused_before_any_method_runs(setup, tokenizer, tmp_path, capsys):
    """The model loads (the plan names it), its fingerprints are checked at once: no sample is run."""
    plan_path, models = setup
    models["load"] = lambda *a, **k: (tiny(tokenizer, seed=1), tokenizer, None)  # same config, other weights
    before = snapshot(tmp_path)
    code, err = run_eval(["eval", str(plan_path), "--out", str(tmp_path / "out"), "--lengths", "128"], capsys)
    assert code == 2 and "was calibrated on other weights" in err and len(err.splitlines()) == 1, err
    assert snapshot(tmp_path) == before


def test_good_input_runs_end_to_end_and_resumes(setup, tokenizer, tmp_path, capsys):
    """The same command line with valid input: every check passes, the run writes its files, a rerun reuses them."""
    plan_path, models = setup
    model = tiny(tokenizer)
    models["load"] = lambda *a, **k: (model, tokenizer, ModelSource("tiny", tmp_path))
    models["generate"] = REAL_GENERATE
    argv = ["eval", str(plan_path), "--out", str(tmp_path / "out"), "--lengths", "128", "--depths", "50",
            "--methods", "full,plan", "--max-new-tokens", "2", "--plot", str(tmp_path / "niah.png"), "--task", "niah",
            "ppl"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    assert len(read_records(out / "results.jsonl")) == 2 and (out / "summary.md").exists()
    assert list(json.loads((out / "perplexity.json").read_text())) == ["full", "plan"]
    assert (tmp_path / "niah.png").read_bytes()[:4] == b"\x89PNG"
    lines = (out / "results.jsonl").read_text()
    models["generate"] = lambda *a, **k: pytest.fail("a resumed record was run again")
    assert cli.main(argv) == 0 and (out / "results.jsonl").read_text() == lines


@pytest.mark.parametrize("task", TASKS)
def test_a_prompt_is_never_longer_than_its_length(tokenizer, task):
    """Every task at short lengths: refused with its minimum (an OptionError naming the task), or within the length;
    the minimum it names is enough for that sample's facts."""
    for length in (64, 96, 128, 192, 256, 320, 384):
        try:
            sample = make_sample(task, tokenizer, length, 0.5, seed=0)
        except OptionError as exc:
            assert f"too short for {task}: it needs at least" in str(exc)
            continue
        assert sample.input_ids.shape[1] <= length == sample.length
    with pytest.raises(OptionError, match=f"too short for {task}"):
        build_samples([task], tokenizer, EvalConfig(lengths=(64,), depths=(0.5,), ruler_depths=(0.5,)), None)


def test_lines_cut_short_are_skipped_and_nothing_else(tmp_path):
    """Every prefix of a record (what an interrupted write leaves) is skipped, wherever it sits in the file; a
    line with something after its end, or a broken one, is an error naming its line."""
    path = tmp_path / "results.jsonl"
    line = record(text='a "quoted" \\ answer \u00e9', seed=None, decode_ms=-1.5e-05)
    for cut in range(1, len(line)):
        path.write_text(record() + "\n" + line[:cut] + "\n" + record(key="b") + "\n")
        assert [r["key"] for r in read_records(path)] == ["full|niah|128|0.5|0", "b"], line[:cut]
    for bad in ('{"key" "x"}', '{"key": "x", "score": 1}}', '{"key": tru e', "plain text"):
        path.write_text(record() + "\n" + bad + "\n")
        with pytest.raises(OptionError, match="results.jsonl line 2: not JSON"):
            read_records(path)
