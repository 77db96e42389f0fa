"""Calibration text: read documents, tokenize them, and pack them into fixed-length samples.

`--data` takes .txt files, directories of them (recursively, sorted), or .jsonl files with a ``text`` field.
Without `--data`, the embedded default corpus is used: public-domain English prose (chapters of Jane
Austen's *Pride and Prejudice*, Project Gutenberg) shipped inside the package, so it is on the machine after
install and needs no download.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ilc.runtime.heads import short_digest


class CalibrationDataError(ValueError):
    """Calibration data is missing, empty, malformed, or too short for the requested samples."""


@dataclass(frozen=True)
class Document:
    source: str
    text: str


@dataclass(frozen=True)
class CalibrationSet:
    """Packed token samples [n, seq_len] plus the provenance the plan records."""

    samples: torch.Tensor
    description: str
    digest: str  # sha256 of the documents' text, in reading order
    documents: int
    tokens_available: int

    @property
    def tokens(self) -> int:
        return int(self.samples.numel())


def default_corpus() -> list[Document]:
    folder = resources.files("ilc") / "corpus"
    docs = [Document(f"ilc/corpus/{f.name}", f.read_text(encoding="utf-8"))
            for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".txt")]
    if not docs:
        raise CalibrationDataError("the embedded default corpus is missing from the installed package")
    return docs


def read_documents(paths: list[str | Path]) -> list[Document]:
    """Read every .txt / .jsonl under `paths` (files or directories)."""
    docs: list[Document] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".jsonl", ".md"))
            if not files:
                raise CalibrationDataError(f"{p}: directory holds no .txt, .md or .jsonl files")
        elif p.is_file():
            files = [p]
        else:
            raise CalibrationDataError(f"{p}: no such file or directory")
        for f in files:
            docs.extend(_read_file(f))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise CalibrationDataError(f"no text found in {', '.join(map(str, paths))} (all documents are empty)")
    return docs


def _read_file(path: Path) -> list[Document]:
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationDataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CalibrationDataError(f"{path}:{n}: expected an object with a string 'text' field")
            out.append(Document(f"{path}:{n}", record["text"]))
        return out
    try:
        return [Document(str(path), path.read_text(encoding="utf-8"))]
    except UnicodeDecodeError:
        raise CalibrationDataError(f"{path}: not UTF-8 text") from None


def pack(docs: list[Document], tokenizer, seq_len: int, max_samples: int | None = None,
         description: str = "") -> CalibrationSet:
    """Tokenize documents, join them with EOS, and cut the stream into `seq_len` samples (the rest is dropped)."""
    if seq_len < 16:
        raise CalibrationDataError(f"--seq-len must be at least 16, got {seq_len}")
    digest = hashlib.sha256()
    stream: list[int] = []
    sep = tokenizer.eos_token_id
    for doc in docs:
        digest.update(doc.text.encode("utf-8"))
        stream.extend(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            stream.append(sep)
    n = len(stream) // seq_len
    if max_samples is not None:
        n = min(n, max_samples)
    if n == 0:
        raise CalibrationDataError(
            f"calibration data has {len(stream)} tokens, fewer than one sample of --seq-len {seq_len}; "
            "add text or lower --seq-len"
        )
    samples = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return CalibrationSet(samples, description, short_digest(digest), len(docs), len(stream))


def load_calibration_set(tokenizer, data: list[str] | None, seq_len: int, max_samples: int | None = None,
                         docs: list[Document] | None = None):
    """Pack `data` (paths; None = the embedded corpus) into samples; `docs`: those paths, already read."""
    if data:
        docs, description = docs or read_documents(data), ", ".join(str(d) for d in data)
    else:
        docs = docs or default_corpus()
        description = "embedded default corpus (Austen, Pride and Prejudice; public domain)"
    return pack(docs, tokenizer, seq_len, max_samples, description)


@dataclass(frozen=True)
class RetrievalSample:
    """A calibration sample that needs long-range copying, and the query rows where the copying happens."""

    ids: torch.Tensor  # [seq_len]
    rows: torch.Tensor  # [R] positions whose next token must be copied from far back


def retrieval_samples(tokenizer, docs: list[Document], seq_len: int, count: int, rows: int = 32,
                      seed: int = 0, facts: int = 6, off_switch: str = "--retrieval-samples 0") -> list[RetrievalSample]:
    """`count` samples of corpus prose with `facts` planted key-value facts ("The pass key of <word> is <7
    digits>.") in the first three quarters, and at the end every fact recalled plus a copy of an early passage.

    Prose alone rarely makes a head reach far back, so heads that retrieve look streaming on it (DuoAttention
    calibrates on synthetic passkeys for the same reason). The recorded rows are the recall and copy positions:
    the tokens that predict a planted digit or the next token of the copied passage. `off_switch`: the option
    that turns these samples off, named in errors."""
    import random

    if count <= 0:
        return []
    stream = tokenizer(" ".join(d.text for d in docs), add_special_tokens=False)["input_ids"]
    words = sorted({w for d in docs for w in d.text.split() if w.isalpha() and 5 <= len(w) <= 10 and w.islower()})
    if len(words) < facts:
        raise CalibrationDataError(f"retrieval samples name each planted fact by a distinct lower-case word of 5 to "
                                   f"10 letters; the text has {len(words)} such words, {facts} are needed (scripts "
                                   f"without case, such as Chinese or Japanese, have none): add such text or pass "
                                   f"{off_switch}")
    if len(stream) < seq_len // 2:
        raise CalibrationDataError(f"the text has {len(stream)} tokens; retrieval samples of --seq-len {seq_len} "
                                   f"need at least {seq_len // 2} tokens of prose: add text, lower --seq-len or pass "
                                   f"{off_switch}")
    rng = random.Random(seed)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    copy_len = max(4, min(48, seq_len // 16))
    per_fact = 2 * len(encode(f" The pass key of {words[0]} is 1234567. ")) + 4
    facts = min(facts, (seq_len // 2 - copy_len) // per_fact)  # facts, recalls and copy take at most half
    if facts < 1:
        raise CalibrationDataError(f"--seq-len {seq_len} is too short for retrieval samples (use {off_switch})")
    out = []
    for n in range(count):
        pairs = [(rng.choice(words), "".join(rng.choice("0123456789") for _ in range(7))) for _ in range(facts)]
        planted = [encode(f" The pass key of {w} is {v}. ") for w, v in pairs]
        recalls = []  # (tokens, index of the first token to predict by copying)
        for w, v in rng.sample(pairs, len(pairs)):
            prefix = encode(f" The pass key of {w} is")
            recalls.append((prefix + encode(f" {v}."), len(prefix) - 1))
        filler_len = max(seq_len // 4, seq_len - sum(map(len, planted)) - sum(len(t) for t, _ in recalls) - copy_len)
        offset = rng.randrange(0, max(1, len(stream) - filler_len))
        filler = (stream * (1 + filler_len // max(1, len(stream)) + 1))[offset:offset + filler_len]
        cuts = sorted(rng.sample(range(filler_len * 3 // 4), facts))
        ids: list[int] = []
        prev = 0
        for cut, fact in zip(cuts, planted):
            ids += filler[prev:cut] + fact
            prev = cut
        ids += filler[prev:]
        copy_from = rng.randrange(0, max(1, len(ids) // 2 - copy_len))
        copy_rows = [len(ids) + i for i in range(copy_len - 1)]  # each predicts the next token of the copied passage
        ids += ids[copy_from:copy_from + copy_len]
        recall_rows = []
        for tokens, first in recalls:
            recall_rows += [len(ids) + i for i in range(first, len(tokens) - 1)]
            ids += tokens
        candidates = recall_rows + copy_rows
        picked = sorted(rng.sample(candidates, min(rows, len(candidates))))
        ids = (ids + filler)[:seq_len]  # fill up when the tokenizer merged across pieces
        out.append(RetrievalSample(torch.tensor(ids, dtype=torch.long),
                                   torch.tensor([r for r in picked if r < seq_len], dtype=torch.long)))
    return out
