"""`ilc eval`: what a plan saves and what it loses, against the full cache and baselines, on the same prompts.

- `tasks`: the tasks (`TASKS`, one `Task` each: group, scoring rule, builder) and `make_sample`, the one prompt
  builder (the NIAH task is also `ilc generate`'s needle);
- `config`: `EvalConfig` (lengths, depths, seeds) and `build_samples`;
- `methods`: the methods compared (`METHODS`), each one apply / undo pair; `baselines`: the plans they derive;
- `run`: the evaluation loop (timed greedy generation, measured KV bytes), perplexity by position, `held_bytes`;
- `records`: the resumable `results.jsonl` store, the prompts file and the peers' (kvpress) records;
- `report`: the summary, markdown tables and plots.

The names below are re-exported lazily (not `run` itself: `ilc.eval.run` is its module; import
`from ilc.eval.run import run`), so that `ilc.eval.tasks` stays importable without transformers or
`ilc.runtime` (the kvpress runner imports `score` in its own environment).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "tasks": ("TASKS", "RULER_TASKS", "Task", "TaskSample", "make_sample", "noise_haystack", "score"),
    "config": ("EvalConfig", "build_samples"),
    "methods": ("METHODS", "Method", "applied"),
    "baselines": ("equal_memory_selection", "equal_memory_window", "selection_plan", "streaming_plan", "uniform_plan"),
    "run": ("run_perplexity", "generate_greedy", "kv_bytes", "held_bytes"),  # run(): ilc.eval.run.run
    "records": ("RecordStore", "read_records", "read_peer_records", "merge_peers", "prompt_digest", "write_prompts"),
    "report": ("summarize", "format_summary", "format_perplexity", "plot_niah"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'ilc.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
