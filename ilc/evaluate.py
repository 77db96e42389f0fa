"""`ilc eval`: what a plan saves and what it loses, against the full cache and baselines, on the same prompts.

For every method and sample it records the generated text, the score (`ilc.tasks.score`), the KV bytes the
cache holds after the run (measured) against a dense cache of the same tokens, and prefill / decode time.
Records go to `results.jsonl` in the output directory, one per line, so an interrupted run resumes where it
stopped. `summary.md` / `summary.json` aggregate them, and `niah.png` shows the NIAH grid per method.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ilc.runtime import PoDCache, Plan, remove_plan

from . import options
from .baselines import equal_memory_selection, equal_memory_window, selection_plan, streaming_plan, uniform_plan
from .options import OptionError
from .data import Document
from .tasks import TaskSample, make_sample, score


@dataclass(frozen=True)
class Method:
    """One way of running the model in `ilc eval`: the plan it applies for a prompt of `context` tokens."""

    name: str
    description: str
    plan_for: Callable[[Plan, int], Plan | None]  # (plan under test, context) -> plan to apply; None = dense
    mode: str | None = None  # override of the plan's mode
    runs_plan: bool = False  # runs the plan under test itself (on the adapted weights when the plan is adapted)

    def apply(self, model, plan: Plan, context: int) -> None:
        chosen = self.plan_for(plan, context)
        if chosen is not None:
            chosen.apply(model, mode=self.mode)

    @staticmethod
    def undo(model) -> None:
        remove_plan(model)


METHODS = {m.name: m for m in (
    Method("full", "the uncompressed model (dense cache)", lambda plan, n: None),
    Method("plan", "the plan in its own mode (scores: training-free; adapted plans on their adapted weights)",
           lambda plan, n: plan, runs_plan=True),
    Method("plan-keys", "the plan in keys mode (own query on the anchor's keys; for adapted models)",
           lambda plan, n: plan, mode="keys", runs_plan=True),
    Method("streaming", "StreamingLLM with the plan's sinks and window (distant tokens dropped)",
           lambda plan, n: streaming_plan(plan, plan.window)),
    Method("streaming-equal", "StreamingLLM with the window enlarged to the plan's bytes",
           lambda plan, n: streaming_plan(plan, equal_memory_window(plan, n))),
    Method("selection-equal", "token selection alone (every head full, the plan's scorer, SnapKV's by default) at "
           "the plan's bytes", lambda plan, n: selection_plan(plan, equal_memory_selection(plan, n))),
    *(Method(f"uniform-{k}", f"uniform blocks of {k} layers, the plan's windows",
             lambda plan, n, k=k: uniform_plan(plan, k)) for k in (2, 3, 4)),
)}
RULER_TASKS = ("multikey", "multivalue", "vartrack", "commonwords", "qa")


PROMPT_OVERHEAD = 64  # tokens a task adds around its haystack (question, chat template), at most


@dataclass(frozen=True)
class EvalConfig:
    lengths: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    ruler_depths: tuple[float, ...] = (0.25, 0.5)
    seeds: tuple[int, ...] = (0,)
    max_new_tokens: int = 32
    limit: int | None = None  # at most this many samples per task (quick runs)

    def validate(self, max_context: int | None = None) -> None:
        """Every option in its range (`ilc.options`), and the longest prompt plus its answer within the model."""
        if not self.lengths or not self.depths or not self.seeds:
            raise OptionError("--lengths, --depths and the seeds need at least one value each")
        for n in self.lengths:
            options.check("lengths", n)
        for d in (*self.depths, *self.ruler_depths):
            options.check("depths", 100 * d, "--depths / --ruler-depths")
        for seed in self.seeds:
            options.check("seed", seed, "seeds")
        options.check("limit", self.limit)
        options.check("max_new_tokens", self.max_new_tokens)
        if max_context and max(self.lengths) + PROMPT_OVERHEAD + self.max_new_tokens > max_context:
            raise OptionError(f"--lengths {max(self.lengths)} plus the question and --max-new-tokens "
                              f"{self.max_new_tokens} exceed the model's context of {max_context} tokens")


def build_samples(tasks: list[str], tokenizer, config: EvalConfig, haystack: list[Document] | None
                  ) -> list[TaskSample]:
    config.validate()
    samples: list[TaskSample] = []
    for task in tasks:
        depths = config.depths if task == "niah" else config.ruler_depths
        batch = [make_sample(task, tokenizer, n, d, s, haystack) for n in config.lengths for d in depths
                 for s in config.seeds]
        samples += batch[: config.limit] if config.limit else batch
    return samples


@contextmanager
def applied(method: str, model, plan: Plan, context: int, adapted_model=None):
    """Run `method` inside the block on the model it yields: `adapted_model` (the weights with an adapted plan's
    adapter merged) for the methods that run the plan under test, else `model`; restores it after."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    chosen = adapted_model if adapted_model is not None and METHODS[method].runs_plan else model
    METHODS[method].apply(chosen, plan, context)
    try:
        yield chosen
    finally:
        Method.undo(chosen)


def kv_bytes(cache) -> int:
    if isinstance(cache, PoDCache):
        return cache.nbytes()
    return sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
               for l in cache.layers)


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
    dense = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * tokens * head_dim * model.dtype.itemsize
    return dict(text=tokenizer.decode(generated, skip_special_tokens=True), kv_bytes=kv_bytes(cache),
                dense_bytes=dense, tokens=tokens, prefill_s=prefill, decode_ms=decode * 1e3)


def prompt_key(sample: TaskSample) -> str:
    return f"{sample.task}|{sample.length}|{sample.depth}|{sample.meta.get('seed')}"


def record_key(method: str, sample: TaskSample) -> str:
    return f"{method}|{prompt_key(sample)}"


def prompt_digest(sample: TaskSample) -> str:
    return "sha256:" + hashlib.sha256(sample.input_ids.numpy().tobytes()).hexdigest()[:16]


def write_prompts(samples: list[TaskSample], out_dir: str | Path, model_dir: str | Path | None = None) -> Path:
    """out_dir/prompts.jsonl: every sample's tokens, split points, answers and scoring rule, so that a runner in
    another environment (`benchmarks/peers/kvpress_runner.py`) runs the very same prompts; `model_dir` (the
    weights' directory, for that runner) goes to out_dir/run.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [dict(prompt_key=prompt_key(s), prompt=prompt_digest(s), task=s.task, length=s.length, depth=s.depth,
                 seed=s.meta.get("seed"), answers=list(s.answers), rule=s.rule, input_ids=s.input_ids[0].tolist(),
                 question_start=s.meta.get("question_start", -1), answer_start=s.meta.get("answer_start", -1))
            for s in samples]
    path = out_dir / "prompts.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    if model_dir is not None:
        (out_dir / "run.json").write_text(json.dumps({"model_dir": str(model_dir)}))
    return path


def read_peer_records(path: str | Path, samples: list[TaskSample]) -> list[dict]:
    """Records written by a peer runner (kvpress, `benchmarks/peers`) for these samples' exact prompts: those whose
    prompt digest matches, in the eval's schema. Lines cut short by an interrupted write are skipped."""
    wanted = {prompt_digest(s) for s in samples}
    return [r for r in _read_records(Path(path)).values() if r["settings"].get("prompt") in wanted]


def merge_peers(records: list[dict], methods: list[str], peers: list[dict]) -> tuple[list[dict], list[str]]:
    """ilc's records and methods with the peers' appended (peer methods in the order they first appear)."""
    names = list(dict.fromkeys(r["method"] for r in peers))
    return records + peers, methods + [n for n in names if n not in methods]


def run_settings(model, plan: Plan) -> dict:
    """What every record of one run shares: the model's fingerprints, its dtype and the plan's digest."""
    from ilc.runtime import model_signature

    sig = model_signature(model)
    return {"plan": "sha256:" + hashlib.sha256(plan.to_yaml().encode()).hexdigest()[:16],
            "model": f"{sig.config_fingerprint}/{sig.weights_fingerprint}",
            "dtype": str(model.dtype).replace("torch.", "")}


def record_settings(shared: dict, method: str, sample: TaskSample, max_new_tokens: int) -> dict:
    """Everything that decides a record (`shared`: from `run_settings`): a resumed run reuses a record only when
    all of it is the same. The full model's records do not depend on the plan."""
    return {
        "method": method,
        "plan": None if method == "full" else shared["plan"],
        "model": shared["model"],
        "prompt": prompt_digest(sample),
        "max_new_tokens": max_new_tokens,
        "dtype": shared["dtype"],
    }


def _read_records(path: Path) -> dict:
    """(key, settings) -> record, from a results.jsonl; lines cut short by an interrupted write are skipped."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "score" in rec and "settings" in rec:
                done[(rec["key"], json.dumps(rec["settings"], sort_keys=True))] = rec
    return done


def run(model, tokenizer, plan: Plan, methods: list[str], samples: list[TaskSample], out_dir: str | Path,
        max_new_tokens: int = 32, progress: bool = True, adapted_model=None) -> list[dict]:
    """Evaluate every method on every sample, appending to out_dir/results.jsonl (resumable: a record is reused
    only if it was made with the same settings, see `record_settings`). An adapted plan runs on `adapted_model`."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise OptionError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    options.check("max_new_tokens", max_new_tokens)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = max((s.input_ids.shape[1] for s in samples), default=0)
    if limit and longest + max_new_tokens > limit:
        raise OptionError(f"a {longest}-token prompt plus {max_new_tokens} new tokens exceeds the model's context "
                          f"of {limit} tokens; nothing was run")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.jsonl"
    done = _read_records(path)
    shared = run_settings(model, plan)
    wanted = [(m, s, record_settings(shared, m, s, max_new_tokens)) for m in methods for s in samples]
    ident = lambda m, s, st: (record_key(m, s), json.dumps(st, sort_keys=True))  # noqa: E731
    todo = [w for w in wanted if ident(*w) not in done]
    if todo and path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with path.open("a") as f:
            f.write("\n")  # the last run stopped mid-line: start the next record on a line of its own
    with path.open("a") as f, tqdm(total=len(todo), desc="evaluating", disable=not progress) as bar:
        for method, sample, settings in todo:
            with applied(method, model, plan, sample.input_ids.shape[1], adapted_model) as chosen:
                res = generate_greedy(chosen, tokenizer, sample.input_ids, max_new_tokens)
            rec = dict(key=record_key(method, sample), method=method, task=sample.task, length=sample.length,
                       depth=sample.depth, seed=sample.meta.get("seed"), answers=list(sample.answers),
                       score=score(res["text"], sample.answers, sample.rule), settings=settings, **res)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            done[ident(method, sample, settings)] = rec
            bar.update(1)
    return [done[ident(*w)] for w in wanted]


PPL_BUCKETS = (0, 256, 1024, 2048, 4096, 8192, 16384)


@torch.no_grad()
def perplexity_by_position(model, input_ids: torch.Tensor) -> list[float]:
    """Next-token NLL at every position of one prefill (all logits); list of length T - 1."""
    ids = input_ids.to(model.device)
    logits = model(ids, use_cache=True).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").tolist()


def run_perplexity(model, plan: Plan, methods: list[str], input_ids: torch.Tensor, out_dir: str | Path,
                   adapted_model=None) -> dict:
    """Perplexity per position bucket for each method on one long text (does loss rise where distant tokens
    matter?). Writes out_dir/perplexity.json and returns {method: {bucket: ppl}}."""
    out = {}
    for method in methods:
        with applied(method, model, plan, input_ids.shape[1], adapted_model) as chosen:
            nll = perplexity_by_position(chosen, input_ids)
        buckets = {}
        for lo, hi in zip(PPL_BUCKETS, PPL_BUCKETS[1:]):
            part = nll[lo:hi]
            if part:
                buckets[f"{lo}-{min(hi, len(nll))}"] = math.exp(sum(part) / len(part))
        buckets["all"] = math.exp(sum(nll) / len(nll))
        out[method] = buckets
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, "perplexity.json").write_text(json.dumps(out, indent=1))
    return out


def format_perplexity(ppl: dict, title: str) -> str:
    buckets = list(next(iter(ppl.values())))
    lines = [title, "", "| method | " + " | ".join(f"tokens {b}" for b in buckets) + " |",
             "|---|" + "---|" * len(buckets)]
    for m, row in ppl.items():
        lines.append(f"| {m} | " + " | ".join(f"{row[b]:.2f}" for b in buckets) + " |")
    return "\n".join(lines)


def summarize(records: list[dict], methods: list[str]) -> dict:
    """Mean score x 100 per method and task group (niah, ruler), KV saved, times."""
    out = {}
    for m in methods:
        rows = [r for r in records if r["method"] == m]
        if not rows:
            continue
        group = lambda name: [r["score"] for r in rows if (r["task"] == "niah") == (name == "niah")]  # noqa: E731
        mean = lambda xs: 100 * sum(xs) / len(xs) if xs else math.nan  # noqa: E731
        out[m] = dict(
            niah=mean(group("niah")), ruler=mean(group("ruler")), samples=len(rows),
            kv_saved=1 - sum(r["kv_bytes"] for r in rows) / sum(r["dense_bytes"] for r in rows),
            prefill_s=sum(r["prefill_s"] for r in rows) / len(rows),
            decode_ms=sum(r["decode_ms"] for r in rows) / len(rows),
            per_task={t: mean([r["score"] for r in rows if r["task"] == t]) for t in sorted({r["task"] for r in rows})},
        )
    return out


def format_summary(summary: dict, title: str) -> str:
    full = summary.get("full", {})
    lines = [title, "", "| method | NIAH | RULER | KV saved | prefill s | decode ms/token | per task |",
             "|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        delta = "" if m == "full" or not full else f" ({s['niah'] - full['niah']:+.1f} / {s['ruler'] - full['ruler']:+.1f})"
        tasks = ", ".join(f"{t} {v:.0f}" for t, v in s["per_task"].items())
        lines.append(f"| {m}{delta} | {s['niah']:.1f} | {s['ruler']:.1f} | {s['kv_saved']:.1%} | {s['prefill_s']:.2f} | "
                     f"{s['decode_ms']:.0f} | {tasks} |")
    lines.append("")
    lines.append("Scores are mean x 100 (RULER string match); (+x / +y) = difference to the full model on NIAH / RULER. "
                 "KV saved = 1 - bytes held / dense bytes for the same tokens, measured after each run.")
    if any(m.startswith("kvpress-") for m in summary):
        lines.append("kvpress-PRESS-NN: NVIDIA kvpress's press at compression ratio NN%, query-agnostic (the context is "
                     "compressed before the question is seen, kvpress's default); -aware: the question is inside the "
                     "compressed context. ilc's methods see the whole prompt (selection scores with its last queries, "
                     "which include the question). Presses that only mask keys (KVzip) keep a dense cache.")
    return "\n".join(lines)


def plot_niah(records: list[dict], methods: list[str], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    niah = [r for r in records if r["task"] == "niah"]
    lengths = sorted({r["length"] for r in niah})
    depths = sorted({r["depth"] for r in niah})
    shown = [m for m in methods if any(r["method"] == m for r in niah)]
    fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown) + 1, 3.2), squeeze=False)
    for ax, m in zip(axes[0], shown):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for r in niah:
            if r["method"] == m:
                grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["score"]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        saved = [1 - r["kv_bytes"] / r["dense_bytes"] for r in niah if r["method"] == m]
        ax.set_title(f"{m}\n{sum(saved) / len(saved):.0%} KV saved", fontsize=9)
        ax.set_xlabel("context")
    axes[0][0].set_ylabel("needle depth")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def held_bytes(plan: Plan, context: int, dtype=torch.float32, batch: int = 1) -> tuple[int, int]:
    """(held, dense) bytes of a real `PoDCache` for `plan` after one prefill of `context` tokens: zeros go
    through every layer's update, so the allocation is exactly what a model run would leave (no model needed);
    a plan's token selection runs as at the first decode step (which tokens it keeps does not change the bytes)."""
    m = plan.model
    cache = PoDCache(plan)
    k = torch.zeros(batch, m.num_kv_heads, context, m.head_dim, dtype=dtype)
    for layer in range(m.num_layers):
        cache.update(k, k, layer)
    cache.select()
    return cache.nbytes(), cache.dense_bytes()
