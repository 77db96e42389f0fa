"""Bad input to the runtime (plan files, caches, adapters, options) is refused with one line naming the problem,
before any work, and loses nothing: the cases a probe found beyond tests/test_bad_input.py."""

import json
import os
import pickle
import time

import pytest
import torch
import yaml

from ilc.runtime import PlanError, load_plan, plan_from_dict, remove_plan
from ilc.runtime.adapter import adapter_fingerprint
from ilc.runtime.plan import MAX_PLAN_BYTES

from conftest import make_plan, mixed_plan, tiny_llama

PLAN = "plans/smollm2-135m.yaml"


def plan_text(**edits) -> str:
    """The committed default plan as text, with `windows.window: 128` style replacements applied to its lines."""
    text = open(PLAN).read()
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


def load_text(tmp_path, text: str, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return load_plan(path)


# (edit of the committed plan's text, what the one-line error must contain)
PLAN_FILE_BAD = [
    # a duplicated key would silently take the last value (here: switch the mode to keys)
    ({"  mode: scores\n": "  mode: scores\n  mode: keys\n"}, "duplicate key 'mode'"),
    ({"  sinks: 4\n": "  sinks: 4\n  sinks: 8\n"}, "duplicate key 'sinks'"),
    # YAML 1.1 surprises: sexagesimal and yes/no are not numbers or booleans here
    ({"  window: ": "  window: 1:30 #"}, "windows.window: expected int, got '1:30'"),
    ({"  window: ": "  window: yes #"}, "windows.window: expected int, got 'yes'"),
    # integers bounded by what the model holds
    ({"  sinks: 4\n": "  sinks: 1000000000000000000000000000000\n"}, "windows.sinks: 1000000000000000000000000000000 exceeds 8192"),
    ({"  sinks: 4\n": f"  sinks: {2**63}\n"}, f"windows.sinks: {2**63} exceeds 8192"),
    ({"  sinks: 4\n": "  sinks: 1e30\n"}, "windows.sinks: expected int, got 1e+30"),
    ({"  max_context: 8192\n": "  max_context: 100000000000000000000\n"}, "model.max_context: must be <= 2147483647"),
    ({"  max_context: 8192\n": "  max_context: 1e20\n"}, "model.max_context: expected int, got 1e+20"),
    ({"  num_kv_heads: 3\n": "  num_kv_heads: 1000000\n"}, "model.num_kv_heads: must be <= 1024"),
    ({"  num_layers: 30\n": "  num_layers: 100000000\n"}, "model.num_layers: must be <= 1024"),
    ({"  num_kv_heads: 3\n": "  num_kv_heads: 18\n"}, "model.num_kv_heads: 18 exceeds 9"),
]


@pytest.mark.parametrize("edits,message", PLAN_FILE_BAD, ids=[m for _, m in PLAN_FILE_BAD])
def test_plan_file_values_are_refused_by_name(tmp_path, edits, message):
    with pytest.raises(PlanError) as err:
        load_text(tmp_path, plan_text(**edits))
    text = str(err.value)
    assert message in text and "\n" not in text and str(tmp_path / "p.yaml") in text


def test_a_leading_zero_is_decimal_as_a_person_means_it(tmp_path):
    """YAML 1.1 reads 0656 as octal 430; a plan reads it as 656 (YAML 1.2), and 0o/0x spell other bases."""
    base = load_plan(PLAN)
    window = base.window
    assert load_text(tmp_path, plan_text(**{f"  window: {window}\n": "  window: 0656\n"})).window == 656
    assert load_text(tmp_path, plan_text(**{f"  window: {window}\n": "  window: 0o20\n"})).window == 16
    assert load_text(tmp_path, plan_text(**{f"  window: {window}\n": "  window: 0x20\n"})).window == 32


def test_selection_pool_and_window_are_bounded_by_the_context(tmp_path):
    raw = yaml.safe_load(open(PLAN))
    raw["selection"] = {"keep": 0.5, "scorer": "snapkv", "window": 128, "pool": 1000000001}
    with pytest.raises(PlanError, match=r"selection.window 128 / pool 1000000001: at most the model's context of 8192"):
        plan_from_dict(raw)


def test_a_streaming_window_is_bounded_by_the_context():
    raw = yaml.safe_load(open(PLAN))
    blocks = raw["sharing"]["blocks"]
    heads = blocks.get("per_head") or [blocks["all_heads"]]
    streaming = next(b for head in heads for b in head if isinstance(b, dict) and b.get("kind") == "streaming")
    streaming["window"] = 2**40
    with pytest.raises(PlanError, match="exceeds the model's context of 8192 tokens"):
        plan_from_dict(raw)


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(PlanError, match=r"alias \*a0 is not allowed in a plan"):
        load_plan(path)
    assert os.path.getsize(path) < 10_000 and time.perf_counter() - t0 < 5


def test_an_oversized_file_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    with open(path, "wb") as f:
        f.truncate(MAX_PLAN_BYTES + 1)
    with pytest.raises(PlanError, match="is not a plan"):
        load_plan(path)


def test_a_million_head_plan_is_refused_before_anything_is_built(tmp_path):
    text = plan_text(**{"  num_attention_heads: 9\n": "  num_attention_heads: 1000000\n",
                        "  num_kv_heads: 3\n": "  num_kv_heads: 1000000\n"})
    t0 = time.perf_counter()
    with pytest.raises(PlanError, match="must be <= 1024"):
        load_text(tmp_path, text)
    assert time.perf_counter() - t0 < 5


def test_save_never_touches_a_users_file_of_the_temporary_name(tmp_path):
    plan = load_plan(PLAN)
    mine = tmp_path / "plan.yaml.tmp"  # the fixed temporary name the old save wrote through
    mine.write_text("my notes")
    plan.save(tmp_path / "plan.yaml")
    assert mine.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml", "plan.yaml.tmp"]
    assert load_plan(tmp_path / "plan.yaml") == plan


def test_a_failed_save_leaves_the_old_plan_and_no_stray_file(tmp_path, monkeypatch):
    plan = load_plan(PLAN)
    target = plan.save(tmp_path / "plan.yaml")
    before = target.read_bytes()
    monkeypatch.setattr(type(plan), "to_yaml", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        plan.save(target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]


# ------------------------------------------------------------------------------------------------ static caches
def test_decoding_past_a_static_cache_is_a_plan_error_naming_max_length():
    model = tiny_llama(layers=5, heads=6, kv_heads=3, head_dim=16)
    plan = mixed_plan(model)
    plan.apply(model)
    cache = plan.new_cache(model, max_length=34)
    x = torch.randint(3, 90, (1, 30))
    with torch.no_grad():
        model(x, past_key_values=cache)
        for _ in range(4):
            model(x[:, :1], past_key_values=cache)
        with pytest.raises(PlanError, match=r"holds 34 tokens \(max_length\) and this forward needs 35"):
            model(x[:, :1], past_key_values=cache)
    assert int(cache.get_seq_length()) == 34  # nothing was written past the end
    remove_plan(model)


def test_a_static_cache_refuses_the_skip_threshold_given_to_apply():
    """apply(skip_threshold=...) then new_cache(max_length=...) used to drop the skip without a word."""
    model = tiny_llama(layers=5, heads=6, kv_heads=3, head_dim=16)
    plan = mixed_plan(model)
    plan.apply(model, skip_threshold=0.5)
    with pytest.raises(PlanError, match="does not run the compute skip"):
        plan.new_cache(model, max_length=64)
    remove_plan(model)


def test_kernels_true_without_a_gpu_is_one_line(monkeypatch):
    model = tiny_llama()
    plan = make_plan(model, [[0, 1], [2, 3]])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: kernels=True is valid here")
    with pytest.raises(PlanError, match="kernels=True: no CUDA GPU on this machine"):
        plan.apply(model, kernels=True)
    with pytest.raises(PlanError, match="kernels=True: no CUDA GPU on this machine"):
        plan.new_cache(kernels=True)
    assert getattr(model, "_ilc_applied", None) is None


def test_a_planned_model_pickles_and_still_runs_its_plan():
    model = tiny_llama()
    plan = make_plan(model, [[0, 1], [2, 3]])
    plan.apply(model)
    x = torch.randint(3, 90, (1, 20))
    with torch.no_grad():
        want = model(x).logits
        copy = pickle.loads(pickle.dumps(model))
        got = copy(x).logits
    assert copy._ilc_applied.plan == plan and torch.equal(got, want)
    remove_plan(copy)
    with torch.no_grad():
        assert not torch.equal(copy(x).logits, want)  # the copy's own plan came off: dense attention again


# ---------------------------------------------------------------------------------------------------- adapters
def _adapter(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"lora_alpha": 16, "r": 8, "target_modules": ["q_proj"]}))
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(8, 16)},
              str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("edit", [{"lora_alpha": 1600}, {"target_modules": ["k_proj"]}])
def test_the_adapter_digest_covers_its_configuration(tmp_path, edit):
    folder = _adapter(tmp_path)
    before = adapter_fingerprint(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    assert adapter_fingerprint(folder) != before


@pytest.mark.parametrize("name,content,message", [
    ("adapter_config.json", b"{not json", "adapter_config.json: cannot be read as JSON"),
    ("adapter_model.safetensors", b"\x00\x01garbage", "adapter_model.safetensors: cannot be read as safetensors"),
])
def test_unreadable_adapter_files_are_plan_errors_naming_the_file(tmp_path, name, content, message):
    folder = _adapter(tmp_path)
    (folder / name).write_bytes(content)
    with pytest.raises(PlanError, match=message) as err:
        adapter_fingerprint(folder)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("tokens", [40, 200, 1100])
def test_growth_slack_is_in_proportion_to_what_is_held(tokens):
    """At ~200 tokens a planned cache held 16.7% more than it must (storage grew by at least 32 slots); now the
    slack is at most 8 slots per tensor, and 1/128 of the size from 1k tokens on."""
    model = tiny_llama(layers=5, heads=6, kv_heads=3, head_dim=16, max_pos=2048)
    plan = mixed_plan(model)
    plan.apply(model)
    cache = plan.new_cache(model)
    with torch.no_grad():
        model(torch.randint(3, 90, (1, tokens)), past_key_values=cache)
        model(torch.randint(3, 90, (1, 1)), past_key_values=cache)  # one decode step grows the storage
    report = cache.nbytes() / cache.used_bytes() - 1
    assert 0 < report <= max(8 / (tokens + 1), 1 / 128) + 1e-9, report
    remove_plan(model)


def test_the_adapter_digest_ignores_the_order_peft_writes_module_names_in(tmp_path):
    folder = _adapter(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "v_proj"]}))
    first = adapter_fingerprint(folder)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["v_proj", "q_proj"]}))
    assert adapter_fingerprint(folder) == first


def test_a_selection_plan_decodes_past_its_growth_slack():
    """After selection compacted the cache, growing it copied the logical slot count (a crash once decode passed
    the slack: 9 tokens with 8-slot growth, 33 before). The decode must run on, equal to a cache without growth."""
    from ilc.runtime.heads import Selection

    model = tiny_llama(layers=5, heads=6, kv_heads=3, head_dim=16)
    plan = mixed_plan(model).with_options(selection=Selection(keep=0.5, window=8))
    plan.apply(model)
    x = torch.randint(3, 90, (2, 60))
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    out = model.generate(x, attention_mask=mask, max_new_tokens=40, do_sample=False, min_new_tokens=40)
    assert out.shape == (2, 100)
    remove_plan(model)


@pytest.mark.parametrize("options,message", [
    (dict(mode=""), "mode: expected one of"),
    (dict(mode=False), "mode: expected one of"),
    (dict(strict=None), "strict: expected True or False"),
])
def test_falsy_options_are_not_taken_for_absent_ones(options, message):
    model = tiny_llama()
    plan = make_plan(model, [[0, 1], [2, 3]])
    with pytest.raises(PlanError, match=message):
        plan.apply(model, **options)


@pytest.mark.parametrize("text,message", [
    ("? [a, b]\n: 1\n", "a key must be a name or a number"),
    ("x: " + "[" * 2000 + "]" * 2000 + "\n", "nested too deeply"),
])
def test_yaml_shapes_no_plan_has_are_plan_errors(tmp_path, text, message):
    with pytest.raises(PlanError, match=message):
        load_text(tmp_path, text)


@pytest.mark.parametrize("changes,message", [
    (dict(window=3.5), "windows.window: expected int, got 3.5"),
    (dict(sinks=True), "windows.sinks: expected int, got True"),
    (dict(window="4"), "windows.window: expected int, got '4'"),
    (dict(selection={"keep": 0.5}), "selection: expected a Selection"),
    (dict(model=None), "model: expected a ModelSignature"),
])
def test_with_options_checks_types(changes, message):
    with pytest.raises(PlanError, match=message):
        load_plan(PLAN).with_options(**changes)
