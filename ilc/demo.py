"""The compressed-generation step of `make demo`: dense vs. plan on a needle prompt, with bytes measured."""

from __future__ import annotations

import time

import torch

from ilc.runtime import cache_report, load_plan, remove_plan

from .data import default_corpus
from .models import load_model
from .needle import build_prompt, found


def compressed_generation(plan_path: str, model_name: str = "smollm2-135m", prompt_tokens: int = 2000,
                          new_tokens: int = 24, depth: float = 0.5) -> dict:
    model, tokenizer, _ = load_model(model_name)
    plan = load_plan(plan_path)
    prompt = build_prompt(tokenizer, default_corpus(), prompt_tokens, depth)
    n = prompt.input_ids.shape[1]
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id,
               return_dict_in_generate=True)
    print(f"prompt: {n} tokens of Pride and Prejudice with 'The special magic number is {prompt.answer}.' at "
          f"{depth:.0%} depth")
    rows = {}
    for label in ("dense", "plan"):
        if label == "plan":
            plan.apply(model)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt.input_ids, attention_mask=torch.ones_like(prompt.input_ids), **gen)
        seconds = time.perf_counter() - t
        text = tokenizer.decode(out.sequences[0, n:], skip_special_tokens=True)
        rows[label] = dict(text=text, found=found(text, prompt.answer), seconds=seconds, cache=out.past_key_values)
        print(f"{label:>5}: {seconds:5.1f} s  needle {'found' if rows[label]['found'] else 'MISSED'}: {text.strip()!r}")
    remove_plan(model)
    report = cache_report(rows["plan"]["cache"])
    print(f"KV cache after {report.tokens} tokens: {report.held / 2**20:.2f} MiB held vs {report.dense / 2**20:.2f} "
          f"MiB dense: {report.saving:.1%} saved (plan estimate {plan.estimated_saving(report.tokens):.1%} at this "
          f"length, {plan.estimated_saving(plan.model.max_context):.1%} at {plan.model.max_context})")
    return rows
