"""The records of `ilc eval`: their identity and settings, the resumable JSONL store, the prompts file, peers.

A record is one method on one sample (see `ilc.eval.run`). `results.jsonl` holds one per line, so an interrupted
run resumes: a record is reused only when every setting that made it is the same (`record_settings`). Records
of peers (NVIDIA kvpress, run by `benchmarks/peers/kvpress_runner.py` in its own environment on `prompts.jsonl`)
have the same schema and join the summary by prompt digest. Every record file is checked line by line when read
(`read_records`): a line cut short by an interrupted write is skipped (and so is a record of an older ilc, made
before records carried their settings), anything else malformed is an error naming the file and the line.
"""

from __future__ import annotations

import json
import re
from numbers import Real
from pathlib import Path

from ilc.digests import plan_digest, tokens_digest
from ilc.options import OptionError
from ilc.runtime import Plan

from .methods import METHODS
from .tasks import TASKS, TaskSample

_INT, _NUM, _STR = (int,), (Real,), (str,)
FIELDS = {  # what the summary, the plot and the store read: field -> allowed types (bool is never a number here)
    "key": _STR, "method": _STR, "task": _STR, "length": _INT, "depth": _NUM, "score": _NUM, "settings": (dict,),
    "kv_bytes": _INT, "dense_bytes": _INT, "prefill_s": _NUM, "decode_ms": _NUM,
}
OPTIONAL = {"seed": (int, type(None)), "answers": (list,), "text": _STR, "tokens": _INT}  # checked where present
# what an interrupted write leaves at the end of a JSON line: part of a number or a literal, part of a \u escape
_PARTIAL_TOKEN = re.compile(r"-?[0-9.eE+-]*|t(r(ue?)?)?|f(a(l(se?)?)?)?|n(u(ll?)?)?")
_PARTIAL_ESCAPE = re.compile(r"u[0-9a-fA-F]{0,4}")


def prompt_key(sample: TaskSample) -> str:
    return f"{sample.task}|{sample.length}|{sample.depth}|{sample.meta.get('seed')}"


def record_key(method: str, sample: TaskSample) -> str:
    return f"{method}|{prompt_key(sample)}"


def prompt_digest(sample: TaskSample) -> str:
    return tokens_digest(sample.input_ids)


def run_settings(model, plan: Plan) -> dict:
    """What every record of one run shares: the model's fingerprints, its dtype and the plan's digest."""
    from ilc.runtime import model_signature

    sig = model_signature(model)
    return {"plan": plan_digest(plan),
            "model": f"{sig.config_fingerprint}/{sig.weights_fingerprint}",
            "dtype": str(model.dtype).replace("torch.", "")}


def record_settings(shared: dict, method: str, sample: TaskSample, max_new_tokens: int) -> dict:
    """Everything that decides a record (`shared`: from `run_settings`): a resumed run reuses a record only when
    all of it is the same. The full model's records do not depend on the plan."""
    return {
        "method": method,
        "plan": shared["plan"] if METHODS[method].needs_plan else None,
        "model": shared["model"],
        "prompt": prompt_digest(sample),
        "max_new_tokens": max_new_tokens,
        "dtype": shared["dtype"],
    }


def record_id(record: dict) -> tuple[str, str]:
    """(key, settings): a record's identity in the store."""
    return record["key"], json.dumps(record["settings"], sort_keys=True)


def _problem(rec) -> str | None:
    """What makes a parsed line no record (None: it is one)."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    missing = [f for f in FIELDS if f not in rec]
    if missing:
        return "missing " + ", ".join(missing)
    wrong = [f for f, types in {**FIELDS, **OPTIONAL}.items()
             if f in rec and (isinstance(rec[f], bool) or not isinstance(rec[f], types))]
    if wrong:
        return ", ".join(f"{f} is {type(rec[f]).__name__}" for f in wrong) + " (see ilc.eval.records.FIELDS)"
    if rec["task"] not in TASKS:
        return f"unknown task {rec['task']!r}"
    if rec["dense_bytes"] <= 0 or rec["kv_bytes"] < 0:
        return "kv_bytes must be >= 0 and dense_bytes > 0"
    if not isinstance(rec["settings"].get("prompt", ""), str):
        return "settings.prompt must be a prompt digest"
    return None


def _cut_short(line: str, err: json.JSONDecodeError) -> bool:
    """A JSON object an interrupted write cut off: the decoder ran out of input, it found nothing wrong."""
    if not line.startswith("{"):
        return False
    if err.msg.startswith("Unterminated string"):
        return True
    partial = _PARTIAL_ESCAPE if err.msg.startswith("Invalid \\uXXXX") else _PARTIAL_TOKEN
    return partial.fullmatch(line[err.pos:]) is not None


def read_records(path: str | Path, what: str = "records") -> list[dict]:
    """The records of a JSONL file, in order (none if it does not exist). Lines cut short by an interrupted write
    and records without settings (older ilc) are skipped; any other line that is not a record is an `OptionError`
    naming `what`, the file and the line."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except (UnicodeDecodeError, OSError) as exc:
        raise OptionError(f"{what} {path}: not a JSONL file of records ({exc})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if _cut_short(line, err):
                continue
            raise OptionError(f"{what} {path} line {number}: not JSON ({err.msg})") from None
        if isinstance(rec, dict) and "settings" not in rec and {"key", "score"} <= rec.keys():
            continue  # a record of an ilc before records carried settings: never reused
        problem = _problem(rec)
        if problem:
            raise OptionError(f"{what} {path} line {number}: not an eval record: {problem}")
        records.append(rec)
    return records


class RecordStore:
    """out_dir/results.jsonl: the records made so far, by identity; new ones are appended one per line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.done = {record_id(r): r for r in read_records(self.path, "results")}

    def __contains__(self, ident: tuple[str, str]) -> bool:
        return ident in self.done

    def __getitem__(self, ident: tuple[str, str]) -> dict:
        return self.done[ident]

    def open(self):
        """The store for appending (flush after each record); a line the last run cut short is ended first."""
        if self.path.exists() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            with self.path.open("a") as f:
                f.write("\n")  # the last run stopped mid-line: start the next record on a line of its own
        return self.path.open("a")

    def add(self, f, record: dict) -> None:
        f.write(json.dumps(record) + "\n")
        f.flush()
        self.done[record_id(record)] = record


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
    prompt digest matches, in the eval's schema, the last of each identity. Lines cut short by an interrupted
    write are skipped; other malformed lines are an `OptionError` naming the file and the line."""
    wanted = {prompt_digest(s) for s in samples}
    latest = {record_id(r): r for r in read_records(path, "--peers")}
    return [r for r in latest.values() if r["settings"].get("prompt") in wanted]


def merge_peers(records: list[dict], methods: list[str], peers: list[dict]) -> tuple[list[dict], list[str]]:
    """ilc's records and methods with the peers' appended (peer methods in the order they first appear)."""
    names = list(dict.fromkeys(r["method"] for r in peers))
    return records + peers, methods + [n for n in names if n not in methods]
