"""The evaluation loop of `ilc eval`: every method on every sample, timed greedy generation, measured KV bytes,
resumed from `results.jsonl` (`ilc.eval.records`), and perplexity by position."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ilc import options
from ilc.options import OptionError
from ilc.runtime import PoDCache, Plan
from ilc.runtime.heads import dense_vectors
from ilc.runtime.slots import tensor_bytes

from .methods import METHODS, applied
from .records import RecordStore, record_key, record_settings, run_settings
from .tasks import TaskSample, score

PPL_BUCKETS = (0, 256, 1024, 2048, 4096, 8192, 16384)


FLOAT_BYTES = 2  # caches are priced as served: floats at 16 bits, also when a CPU run keeps fp32


def kv_bytes(cache) -> int:
    """Bytes a cache holds, floats at 2 bytes: a `PoDCache`'s own count, or a dense cache's keys and values."""
    if isinstance(cache, PoDCache):
        return cache.nbytes(FLOAT_BYTES)
    return sum(tensor_bytes(l.keys, FLOAT_BYTES) + tensor_bytes(l.values, FLOAT_BYTES) for l in cache.layers)


@torch.no_grad()
def held_bytes(plan: Plan, context: int, dtype=torch.float32, batch: int = 1) -> tuple[int, int]:
    """(held, dense) bytes of a real `PoDCache` for `plan` after one prefill of `context` tokens: zeros go
    through every layer's update, so the allocation is exactly what a model run would leave (no model needed);
    a plan's token selection runs as at the first decode step (which tokens it keeps does not change the bytes), and
    quantized layers drop their 16-bit copy of the prompt, as that step does."""
    m = plan.model
    cache = PoDCache(plan)
    k = torch.zeros(batch, m.num_kv_heads, context, m.head_dim, dtype=dtype)
    for layer in range(m.num_layers):
        cache.update(k, k, layer)
    cache.select()
    cache.release_prompt()
    return cache.nbytes(FLOAT_BYTES), cache.dense_bytes() * FLOAT_BYTES // k.element_size()


@torch.no_grad()
def generate_greedy(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int) -> dict:
    """Greedy decoding with prefill and decode timed apart; returns text, cache bytes and times."""
    t = time.perf_counter()
    out = model(input_ids.to(model.device), use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - t
    cache = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    generated = [int(token)]
    t = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        if generated[-1] == tokenizer.eos_token_id:
            break
        out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        generated.append(int(token))
    decode = (time.perf_counter() - t) / max(1, len(generated) - 1)
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tokens = cache.get_seq_length()
    dense = dense_vectors(cfg.num_hidden_layers, cfg.num_key_value_heads, tokens) * head_dim * FLOAT_BYTES
    return dict(text=tokenizer.decode(generated, skip_special_tokens=True), kv_bytes=kv_bytes(cache),
                dense_bytes=dense, tokens=tokens, prefill_s=prefill, decode_ms=decode * 1e3)


def check_run(model, methods: list[str], samples: list[TaskSample], max_new_tokens: int) -> None:
    """Known methods, and the longest prompt plus its answer within the model's context (nothing run yet)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise OptionError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    options.check("max_new_tokens", max_new_tokens)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = max((s.input_ids.shape[1] for s in samples), default=0)
    if limit and longest + max_new_tokens > limit:
        raise OptionError(f"a {longest}-token prompt plus {max_new_tokens} new tokens exceeds the model's context "
                          f"of {limit} tokens; nothing was run")


def run(model, tokenizer, plan: Plan, methods: list[str], samples: list[TaskSample], out_dir: str | Path,
        max_new_tokens: int = 32, progress: bool = True, adapted_model=None) -> list[dict]:
    """Evaluate every method on every sample, appending to out_dir/results.jsonl (resumable: a record is reused
    only if it was made with the same settings, see `record_settings`). An adapted plan runs on `adapted_model`."""
    check_run(model, methods, samples, max_new_tokens)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = RecordStore(out_dir / "results.jsonl")
    shared = run_settings(model, plan)
    wanted = [(m, s, record_settings(shared, m, s, max_new_tokens)) for m in methods for s in samples]
    ident = lambda m, s, st: (record_key(m, s), json.dumps(st, sort_keys=True))  # noqa: E731
    todo = [w for w in wanted if ident(*w) not in store]
    with store.open() as f, tqdm(total=len(todo), desc="evaluating", disable=not progress) as bar:
        for method, sample, settings in todo:
            with applied(method, model, plan, sample.input_ids.shape[1], adapted_model) as chosen:
                res = generate_greedy(chosen, tokenizer, sample.input_ids, max_new_tokens)
            rec = dict(key=record_key(method, sample), method=method, task=sample.task, length=sample.length,
                       depth=sample.depth, seed=sample.meta.get("seed"), answers=list(sample.answers),
                       score=score(res["text"], sample.answers, sample.rule), settings=settings, **res)
            store.add(f, rec)
            bar.update(1)
    return [store[ident(*w)] for w in wanted]


@torch.no_grad()
def perplexity_by_position(model, input_ids: torch.Tensor, prompt: int | None = None, chunk: int = 64) -> list[float]:
    """Next-token NLL at every position; list of length T - 1. Without `prompt`: one prefill (all logits). With it:
    the first `prompt` tokens as a prompt, the cache's token selection run on them (as the first decode step would),
    then the rest fed `chunk` tokens at a time, so that later positions read the cache as it is stored (dropped,
    selected and quantized tokens) rather than the 16-bit prompt a single prefill attends to."""
    logits = next_token_logits(model, input_ids, prompt, chunk)
    return torch.nn.functional.cross_entropy(logits, input_ids[0, 1:].to(logits.device), reduction="none").tolist()


def kl_by_position(model, input_ids: torch.Tensor, reference: torch.Tensor, prompt: int | None = None,
                   chunk: int = 64) -> list[float]:
    """KL(reference || model) of the next-token distributions at every position, in nats; `reference` [T - 1, V]
    log-probabilities (the full model's, from `next_token_logits(...).log_softmax(-1)`), read as
    `perplexity_by_position` reads."""
    logp = next_token_logits(model, input_ids, prompt, chunk).log_softmax(-1)
    ref = reference.to(logp.device)
    return (ref.exp() * (ref - logp)).sum(-1).clamp_min(0).tolist()


@torch.no_grad()
def next_token_logits(model, input_ids: torch.Tensor, prompt: int | None = None, chunk: int = 64) -> torch.Tensor:
    """[T - 1, V] fp32 logits for tokens 1..T-1 of input_ids [1, T] (see `perplexity_by_position` for `prompt`)."""
    ids = input_ids.to(model.device)
    if prompt is None:
        return model(ids, use_cache=True).logits[0, :-1].float()
    out = model(ids[:, :prompt], use_cache=True)
    cache, parts = out.past_key_values, [out.logits[0].float()]
    if isinstance(cache, PoDCache):
        cache.select()
    for lo in range(prompt, ids.shape[1], chunk):
        out = model(ids[:, lo:lo + chunk], past_key_values=cache, use_cache=True)
        parts.append(out.logits[0].float())
    return torch.cat(parts)[:-1]


def by_bucket(values: list[float], reduce) -> dict[str, float]:
    """{"lo-hi": reduce(values in the bucket)} over `PPL_BUCKETS`, and "all"."""
    out = {f"{lo}-{min(hi, len(values))}": reduce(values[lo:hi]) for lo, hi in zip(PPL_BUCKETS, PPL_BUCKETS[1:])
           if values[lo:hi]}
    out["all"] = reduce(values)
    return out


def run_perplexity(model, plan: Plan, methods: list[str], input_ids: torch.Tensor, out_dir: str | Path,
                   adapted_model=None, prompt: int | None = None) -> dict:
    """Perplexity per position bucket for each method on one long text (does loss rise where distant tokens
    matter?); `prompt`: see `perplexity_by_position`. Writes out_dir/perplexity.json and returns
    {method: {bucket: ppl}}."""
    out = {}
    for method in methods:
        with applied(method, model, plan, input_ids.shape[1], adapted_model) as chosen:
            nll = perplexity_by_position(chosen, input_ids, prompt)
        out[method] = by_bucket(nll, lambda part: math.exp(sum(part) / len(part)))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, "perplexity.json").write_text(json.dumps(out, indent=1))
    return out
