"""`ilc adapt` on a tiny random Llama: the training forward is the serving computation, the loss falls, a resumed
run equals an uninterrupted one, and adapted plans and adapters only run together."""

import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from ilc.adapt import AdaptConfig, adapt, adapted_layers, first_changed_position
from ilc.cli import main
from ilc.data import default_corpus
from ilc.options import OptionError
from ilc.runtime import PlanError, QualityWarning, load_plan, remove_plan
from ilc.runtime.adapter import ADAPTER_MARK
from ilc.runtime.sequence import SequenceForward

from conftest import CharTokenizer, make_plan, mixed_plan, tiny_llama

SEQ = 256
INIT = 0.2  # peaked distributions: the plan moves them measurably (KL ~1 nat), so adaptation has work to do


def base_model():
    """The weights every test adapts and serves (built afresh, identical each time)."""
    return tiny_llama(layers=5, heads=6, kv_heads=3, seed=0, init_range=INIT)


def model_and_plan(mode="scores"):
    model = base_model()
    return model, mixed_plan(model, mode=mode)


def config(**kw):
    base = dict(tokens=6 * SEQ, seq_len=SEQ, lr=1e-2, rank=4, checkpoint_every=2, retrieval_share=0.5)
    return AdaptConfig(**{**base, **kw})


def run(tmp_path, name="run", mode="scores", merge=False, **kw):
    model, plan = model_and_plan(mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QualityWarning)
        result = adapt(model, CharTokenizer(), plan, config(**kw), tmp_path / name, progress=False, merge=merge)
    return model, plan, result


def sample_ids(n=2, t=SEQ, seed=1):
    return torch.randint(3, 93, (n, t), generator=torch.Generator().manual_seed(seed))


def serving_logits(plan_path, ids, adapter=None):
    model = base_model()
    load_plan(plan_path).apply(model, adapter=adapter)
    with torch.no_grad():
        return model(ids).logits, model


@pytest.mark.parametrize("mode", ["scores", "keys"])
def test_sequence_forward_is_the_cache_prefill(mode):
    """The training forward (whole sequences, no cache) gives the logits of a prefill through the plan's cache,
    for all three head kinds, and its dense form gives the full model's."""
    model, plan = model_and_plan(mode)
    ids = sample_ids()
    with torch.no_grad():
        full = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QualityWarning)
        plan.apply(model)
    with torch.no_grad():
        cached = model(ids).logits
        sequence = model(ids, ilc_sequence=SequenceForward.for_plan(plan)).logits
        dense = model(ids, ilc_sequence=SequenceForward.dense()).logits
    assert (cached - full).abs().max() > 1e-3  # the plan changes the outputs ...
    torch.testing.assert_close(sequence, cached, atol=2e-5, rtol=1e-5)  # ... and both paths change them alike
    torch.testing.assert_close(dense, full, atol=2e-5, rtol=1e-5)


def test_sequence_forward_gradients_reach_anchor_layers():
    """A follower's loss reaches the anchor's key projection (its keys serve the follower's distant tokens)."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2)
    plan = make_plan(model, [[0, 1]], sinks=2, window=4, mode="keys")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QualityWarning)
        plan.apply(model)
    ids = sample_ids(1, 32)
    captured = {}
    model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, a, o: captured.setdefault("out", o))
    model(ids, ilc_sequence=SequenceForward.for_plan(plan))
    captured["out"][:, 10:].sum().backward()  # distant tokens exist from slot sinks + window on
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[1].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_loss_decreases_and_outputs_are_written(tmp_path):
    model, plan, result = run(tmp_path, tokens=24 * SEQ)
    out = result.out
    adapted = load_plan(out / "plan.yaml")
    assert adapted.adapted is not None and adapted.adapted.steps == 24 and adapted.adapted.tokens == 24 * SEQ
    assert adapted.adapted.layers == tuple(adapted_layers(plan)) and adapted.blocks == plan.blocks
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "log.jsonl").is_file()
    # held-apart text (the corpus' last characters): KL of the served plan to the full model, before and after
    ids = torch.tensor(CharTokenizer()(default_corpus()[-1].text[-3000:])["input_ids"][:4 * SEQ]).view(4, SEQ)
    teacher = base_model()
    with torch.no_grad():
        target = teacher(ids).logits.log_softmax(-1)
    base = base_model()
    plan.apply(base)
    with torch.no_grad():
        before = base(ids).logits.log_softmax(-1)
    after, _ = serving_logits(out / "plan.yaml", ids, adapter=out / "adapter")
    after = after.log_softmax(-1)
    start = first_changed_position(plan)
    kl = lambda s: (target.exp() * (target - s)).sum(-1)[:, start:].mean()  # noqa: E731
    assert kl(after) < 0.9 * kl(before), (kl(before), kl(after))
    assert adapted.adapted.loss_final < adapted.adapted.loss_initial


def test_resumed_run_equals_uninterrupted(tmp_path):
    _, _, whole = run(tmp_path, "whole")

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    model, plan = model_and_plan()
    with pytest.raises(KeyboardInterrupt):
        adapt(model, CharTokenizer(), plan, config(), tmp_path / "cut", progress=False, on_step=interrupt)
    assert not (tmp_path / "cut" / "plan.yaml").exists() and not (tmp_path / "cut" / "adapter").exists()
    with pytest.raises(OptionError, match="interrupted"):
        adapt(model_and_plan()[0], CharTokenizer(), plan, config(), tmp_path / "cut", progress=False)
    model, plan = model_and_plan()
    resumed = adapt(model, CharTokenizer(), plan, config(), tmp_path / "cut", resume=True, progress=False)
    assert resumed.losses == whole.losses
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_plan(tmp_path / "cut" / "plan.yaml").adapted == load_plan(tmp_path / "whole" / "plan.yaml").adapted


def test_extending_a_finished_run_equals_the_longer_run(tmp_path):
    _, _, longer = run(tmp_path, "long", tokens=6 * SEQ)
    _, _, short = run(tmp_path, "short", tokens=3 * SEQ)
    assert short.losses == longer.losses[:3]
    model, plan = model_and_plan()
    extended = adapt(model, CharTokenizer(), plan, config(tokens=6 * SEQ), tmp_path / "short", resume=True,
                     progress=False)
    assert extended.losses == longer.losses
    with pytest.raises(OptionError, match="only --tokens may change"):
        adapt(model_and_plan()[0], CharTokenizer(), plan, config(tokens=8 * SEQ, lr=1e-3), tmp_path / "short",
              resume=True, progress=False)


@pytest.mark.parametrize("mode", ["scores", "keys"])
def test_served_adapted_plan_matches_training_forward(tmp_path, mode):
    """load_plan().apply(model, adapter=DIR) serves the computation the adapter was trained on: the logits of
    the training-time forward (peft LoRA layers, whole-sequence path), by prefill and by decode."""
    model, plan, result = run(tmp_path, mode=mode)
    adapted = load_plan(result.out / "plan.yaml")
    assert adapted.mode == mode
    ids = sample_ids(2, 40)
    with torch.no_grad():
        trained = model(ids, ilc_sequence=SequenceForward.for_plan(adapted)).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error", QualityWarning)  # an adapted keys-mode plan is not warned about
        served, served_model = serving_logits(result.out / "plan.yaml", ids, adapter=result.out / "adapter")
    assert served_model.config.ilc_adapter == adapted.adapted.adapter
    torch.testing.assert_close(served, trained, atol=5e-5, rtol=1e-5)
    # decode: the last logits of a prompt extended token by token through the cache
    cache = adapted.new_cache(served_model)
    with torch.no_grad():
        served_model(ids[:, :30], past_key_values=cache)
        for t in range(30, 40):
            step = served_model(ids[:, t:t + 1], past_key_values=cache).logits[:, -1]
    torch.testing.assert_close(step, trained[:, -1], atol=5e-5, rtol=1e-5)


def test_adapters_and_plans_only_run_together(tmp_path):
    model, plan, result = run(tmp_path, merge=True)
    out = result.out
    adapted = load_plan(out / "plan.yaml")
    ids = sample_ids(1, 40)
    with pytest.raises(PlanError, match="carries none"):
        adapted.apply(base_model())
    with pytest.raises(PlanError, match="no adapted: section"):
        plan.apply(base_model(), adapter=out / "adapter")
    with pytest.raises(PlanError, match="trained for 'scores'"):
        adapted.apply(base_model(), adapter=out / "adapter", mode="keys")
    served, merged_model = serving_logits(out / "plan.yaml", ids, adapter=out / "adapter")
    remove_plan(merged_model)
    with pytest.raises(PlanError, match="carries the ilc adapter"):
        plan.apply(merged_model)  # the merged weights refuse the unadapted plan
    _, _, other = run(tmp_path, "other", seed=1)
    with pytest.raises(PlanError, match="is not the adapter this plan was adapted with"):
        adapted.apply(base_model(), adapter=other.out / "adapter")
    # weights saved merged (--merge) carry their adapter: the adapted plan runs on them as they are
    loaded = LlamaForCausalLM.from_pretrained(out / "merged").eval()
    loaded.set_attn_implementation("sdpa")
    assert getattr(loaded.config, ADAPTER_MARK) == adapted.adapted.adapter
    adapted.apply(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, served, atol=5e-5, rtol=1e-5)
    with pytest.raises(PlanError, match="already adapted"):
        adapt(base_model(), CharTokenizer(), adapted, config(), tmp_path / "x",
              progress=False)


def test_bad_runs_are_refused_before_work(tmp_path):
    model, plan, result = run(tmp_path, tokens=2 * SEQ)
    with pytest.raises(OptionError, match="finished adaptation"):
        adapt(base_model(), CharTokenizer(), plan, config(tokens=2 * SEQ), result.out, progress=False)
    with pytest.raises(OptionError, match="no checkpoint.pt"):
        adapt(base_model(), CharTokenizer(), plan, config(), tmp_path / "none", resume=True, progress=False)
    with pytest.raises(OptionError, match="already trained 2 steps"):
        adapt(base_model(), CharTokenizer(), plan, config(tokens=SEQ), result.out, resume=True, progress=False)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(OptionError, match="not a readable checkpoint"):
        adapt(base_model(), CharTokenizer(), plan, config(), tmp_path / "corrupt", resume=True, progress=False)
    with pytest.raises(OptionError, match="--seq-len 4096 exceeds"):
        adapt(base_model(), CharTokenizer(), plan, config(seq_len=4096), tmp_path / "long", progress=False)
    with pytest.raises(OptionError, match="--targets"):
        config(targets=("gate_proj",)).validate()
    for argv, message in ((["--tokens", "0"], "--tokens must be >= 1"), (["--lr", "0"], "--lr must be"),
                          (["--retrieval-share", "1"], "--retrieval-share must be")):
        assert main(["adapt", "--plan", "p.yaml", "--out", str(tmp_path / "cli"), *argv]) == 2
    assert main(["adapt", "--plan", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "cli")]) == 2
    assert not (tmp_path / "cli").exists()


def test_adapted_section_round_trips_and_is_validated(tmp_path):
    _, plan, result = run(tmp_path, tokens=2 * SEQ)
    adapted = load_plan(result.out / "plan.yaml")
    again = tmp_path / "again.yaml"
    adapted.save(again)
    assert load_plan(again) == adapted
    text = (result.out / "plan.yaml").read_text()
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace("  mode: scores\n  tokens:", "  mode: keys\n  tokens:"))
    with pytest.raises(PlanError, match="adapted.mode: the adapter was trained for 'keys' mode"):
        load_plan(broken)
    broken.write_text(text.replace("  rank: 4", "  rank: 0"))
    with pytest.raises(PlanError, match="adapted.rank: must be >= 1"):
        load_plan(broken)
    broken.write_text(text.replace("adapted:\n", "adapted:\n  epochs: 3\n"))
    with pytest.raises(PlanError, match="unknown key 'epochs'"):
        load_plan(broken)
    assert first_changed_position(plan) == plan.sinks + 2  # the mixed plan's shortest streaming window
    assert default_corpus()  # the default training text is packaged


def test_eval_runs_an_adapted_plan_on_its_adapted_weights(tmp_path):
    """`ilc eval` of an adapted plan: the plan's methods run on the weights with the adapter merged, the full model
    and the baselines on the base weights (baselines carry no adaptation)."""
    from ilc.eval.methods import applied

    _, _, result = run(tmp_path, tokens=2 * SEQ)
    adapted = load_plan(result.out / "plan.yaml")
    base = base_model()
    merged = adapted.apply(base_model(),
                           adapter=result.out / "adapter")
    ids = sample_ids(1, 40)
    with torch.no_grad():
        served = merged(ids).logits
        full = base(ids).logits
    remove_plan(merged)
    with applied("plan", base, adapted, 40, merged) as chosen, torch.no_grad():
        assert chosen is merged
        torch.testing.assert_close(chosen(ids).logits, served)
    for method in ("full", "streaming-equal", "uniform-2"):
        with applied(method, base, adapted, 40, merged) as chosen, torch.no_grad():
            assert chosen is base
            logits = chosen(ids).logits
        if method == "full":
            torch.testing.assert_close(logits, full)
    with pytest.raises(PlanError, match="trained for 'scores'"):
        with applied("plan-keys", base, adapted, 40, merged):
            pass


def test_sequence_forward_refuses_caches_padding_and_long_contexts():
    model, plan = model_and_plan()
    plan.apply(model)
    ids = sample_ids(2, 16)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(PlanError, match="unpadded rows only"):
        model(ids, attention_mask=mask, ilc_sequence=SequenceForward.for_plan(plan))
    with pytest.raises(PlanError, match="takes no cache"):
        model(ids, past_key_values=plan.new_cache(model), ilc_sequence=SequenceForward.for_plan(plan))
    with pytest.raises(PlanError, match="exceeds the model's limit"):
        model(sample_ids(1, 600), ilc_sequence=SequenceForward.for_plan(plan))
