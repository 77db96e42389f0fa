"""The compressed-generation step of `make demo`: dense vs. plan on a needle prompt, with bytes measured."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ilc.runtime import Plan, cache_report, check_plan_matches, load_plan, remove_plan
from ilc.runtime.adapter import check_adapter

from .adapt import check_adapter_option
from .data import default_corpus
from .eval.tasks import make_sample, score
from .models import DEFAULT_MODEL, load_model, load_tokenizer, model_context
from .options import OptionError, check_ranges, option

PROMPT_OVERHEAD = 64  # tokens the chat template and the question add to the needle prompt, at most


@dataclass(frozen=True)
class GenerateOptions:
    """`ilc generate`'s options besides the plan."""

    model: str = option(DEFAULT_MODEL, "model to load")
    prompt_tokens: int = option(2000, "needle prompt length; with --new-tokens within the model's context")
    new_tokens: int = option(24, "tokens to generate")
    adapter: str | None = option(None, "an adapted plan's adapter directory (`ilc adapt` wrote it): the plan runs "
                                 "on the weights with it merged, the dense run on the base weights")
    depth: float = option(0.5, cli=False)  # where the needle sits in the prompt


def check_request(plan_path: str, options: GenerateOptions) -> Plan:
    """The plan, or OptionError / PlanError before any model loads: the options in range, the adapter and the plan
    belong together, and the prompt plus the answer fit the model's context (its config's, and the plan's)."""
    check_ranges(options)
    plan = load_plan(plan_path)
    check_adapter_option(plan, plan_path, options.adapter)
    _check_fits(options, plan.model.max_context)  # the plan's claim first: no model needed
    _check_fits(options, model_context(options.model))  # the model's own config (a plan may claim more)
    return plan


def _check_fits(options: GenerateOptions, context: int | None) -> None:
    if context and options.prompt_tokens + options.new_tokens + PROMPT_OVERHEAD > context:
        raise OptionError(f"--prompt-tokens {options.prompt_tokens} + --new-tokens {options.new_tokens} exceed the "
                          f"model's context of {context} tokens")


def compressed_generation(plan_path: str, options: GenerateOptions | None = None) -> dict:
    """Greedy generation on a needle prompt, dense then with the plan, and the cache bytes each held. Everything
    that can be refused is refused before the dense run: the request (`check_request`) before the model loads,
    the plan and the adapter against the loaded weights right after."""
    options = options or GenerateOptions()
    plan = check_request(plan_path, options)
    tokenizer = load_tokenizer(options.model)
    depth, new_tokens = options.depth, options.new_tokens
    prompt = make_sample("niah", tokenizer, options.prompt_tokens, depth, seed=0,
                         haystack=default_corpus())  # the NIAH task
    model, _, _ = load_model(options.model)
    check_plan_matches(plan, model)
    check_adapter(plan, model, options.adapter)
    n = prompt.input_ids.shape[1]
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id,
               return_dict_in_generate=True)
    print(f"prompt: {n} tokens of Pride and Prejudice with {prompt.meta['facts'][0]!r} at {depth:.0%} depth")
    rows = {}
    for label in ("dense", "plan"):
        if label == "plan":
            plan.apply(model, adapter=options.adapter)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt.input_ids, attention_mask=torch.ones_like(prompt.input_ids), **gen)
        seconds = time.perf_counter() - t
        text = tokenizer.decode(out.sequences[0, n:], skip_special_tokens=True)
        found = score(text, prompt.answers, prompt.rule) == 1.0
        rows[label] = dict(text=text, found=found, seconds=seconds, cache=out.past_key_values)
        print(f"{label:>5}: {seconds:5.1f} s  needle {'found' if found else 'MISSED'}: {text.strip()!r}")
    remove_plan(model)
    report = cache_report(rows["plan"]["cache"])
    print(f"KV cache after {report.tokens} tokens: {report.held / 2**20:.2f} MiB held vs {report.dense / 2**20:.2f} "
          f"MiB dense: {report.saving:.1%} saved (plan estimate {plan.estimated_saving(report.tokens):.1%} at this "
          f"length, {plan.estimated_saving(plan.model.max_context):.1%} at {plan.model.max_context})")
    return rows
