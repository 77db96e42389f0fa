"""Long-context evaluation tasks, generated locally with fixed seeds (no downloads): the inputs of `ilc eval`.

Every task plants facts in a haystack of prose (a directory of texts, the embedded corpus, or RULER's noise
filler) at a controlled depth and asks for them back. A task is a `Task` in `TASKS`: its name, its group in the
summary, its scoring rule (RULER's string match, see `score`) and a builder that draws its facts, question and
answers from a seeded generator:
- ``niah``: one 7-digit "special magic number" at a depth of the context (also the needle of `ilc generate`);
- ``multikey``: four keys, each with its number; the question names one key (the others are distractors);
- ``multivalue``: one key planted four times with different numbers; all four must come back;
- ``vartrack``: a chain ``VAR A = 12345 ... VAR B = VAR A ...``; every variable equal to the value must come back;
- ``commonwords``: a list where ten words repeat much more often than the rest; the ten must come back;
- ``qa``: a planted fact ("The <adjective> <noun> is kept in <city>.") and a question about it.
Key words come from the embedded corpus's own vocabulary, so no word-list package is needed.

Importing this module loads neither transformers nor `ilc.runtime` (`ilc.data`, which does, is imported where a
prompt is built): the kvpress runner (`benchmarks/peers`, its own environment) imports `score` from here.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from ilc.options import OptionError

if TYPE_CHECKING:
    from ilc.data import Document

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
CITIES = ("Lisbon", "Nairobi", "Montreal", "Osaka", "Krakow", "Santiago", "Bergen", "Hanoi", "Tucson", "Dakar")


@dataclass(frozen=True)
class TaskSample:
    task: str
    input_ids: torch.Tensor  # [1, T], chat-formatted
    answers: tuple[str, ...]
    rule: str  # "all": score = share of answers found; "part": 1 if any answer is found
    length: int  # requested context tokens (the prompt never has more)
    depth: float  # where the planted facts start (0 = beginning, 1 = end)
    meta: dict = field(default_factory=dict)  # facts, cuts, seed, question; token indices (-1 if unknown):
    # question_start ("\n\n" + question), answer_start (the end of the user turn), fact_starts (each fact)


@dataclass(frozen=True)
class Facts:
    """What a task's builder draws: sentences to plant (in order, the first at the depth), the question, answers."""

    sentences: list[str]
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    name: str
    group: str  # its column in the summary: "niah" or "ruler" (RULER-style tasks use --ruler-depths)
    rule: str  # scoring rule of `score`
    build: Callable[[random.Random, list[str]], Facts]  # (seeded generator, vocabulary) -> facts


def score(text: str, answers: tuple[str, ...], rule: str) -> float:
    """RULER's string match, case-insensitive: `all` = share of answers contained, `part` = any contained."""
    low = text.lower().replace(",", "")
    hits = [a.lower() in low for a in answers]
    if rule == "all":
        return sum(hits) / len(hits)
    if rule == "part":
        return float(any(hits))
    raise ValueError(f"unknown scoring rule {rule!r}")


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _niah(rng: random.Random, words: list[str]) -> Facts:
    value = _number(rng)
    return Facts([f"The special magic number is {value}."],
                 "What is the special magic number mentioned in the text above? Answer with the number only.", (value,))


def _multikey(rng: random.Random, words: list[str]) -> Facts:
    keys = rng.sample(words, 4)
    values = [_number(rng) for _ in keys]
    facts = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    target = rng.randrange(4)
    # the asked-for fact sits at the requested depth
    return Facts(facts[target:] + facts[:target],
                 f"What is the special magic number for {keys[target]} mentioned in the text above?", (values[target],))


def _multivalue(rng: random.Random, words: list[str]) -> Facts:
    key = rng.choice(words)
    values = [_number(rng) for _ in range(4)]
    return Facts([f"One of the special magic numbers for {key} is: {v}." for v in values],
                 f"What are all the special magic numbers for {key} mentioned in the text above?", tuple(values))


def _vartrack(rng: random.Random, words: list[str]) -> Facts:
    value = str(rng.randint(10_000, 99_999))
    names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
    facts = [f"VAR {names[0]} = {value}."] + [f"VAR {names[k]} = VAR {names[k - 1]}." for k in range(1, 4)]
    return Facts(facts, f"Find all variables that are assigned the value {value} in the text above.", tuple(names))


def _commonwords(rng: random.Random, words: list[str]) -> Facts:
    common = rng.sample(words, 10)
    rare = rng.sample([w for w in words if w not in common], 40)
    listing = common * 6 + rare
    rng.shuffle(listing)
    return Facts(["Here is a list of words: " + ", ".join(listing) + "."],
                 "What are the 10 most common words in the list of words above? Answer with the words only.",
                 tuple(common))


def _qa(rng: random.Random, words: list[str]) -> Facts:
    adjective, noun = rng.sample(words, 2)
    city = rng.choice(CITIES)
    question = f"According to the text above, where is the {adjective} {noun} kept? Answer with the city only."
    return Facts([f"The {adjective} {noun} is kept in {city}."], question, (city,))


TASKS = {t.name: t for t in (
    Task("niah", "niah", "all", _niah),
    Task("multikey", "ruler", "all", _multikey),
    Task("multivalue", "ruler", "all", _multivalue),
    Task("vartrack", "ruler", "all", _vartrack),
    Task("commonwords", "ruler", "all", _commonwords),
    Task("qa", "ruler", "part", _qa),
)}
RULER_TASKS = tuple(t.name for t in TASKS.values() if t.group == "ruler")


def vocabulary(docs: list[Document] | None = None, min_len: int = 5) -> list[str]:
    """Lower-case words of the corpus, sorted: a deterministic word list for keys and distractors."""
    if not docs:
        return list(_default_vocabulary(min_len))
    words = {w.lower() for d in docs for w in re.findall(r"[A-Za-z]+", d.text) if len(w) >= min_len}
    return sorted(words)


@functools.lru_cache(maxsize=4)
def _default_vocabulary(min_len: int) -> tuple[str, ...]:
    from ilc.data import default_corpus

    return tuple(vocabulary(default_corpus(), min_len))


def noise_haystack(tokens: int = 16384) -> list[Document]:
    """RULER's filler text, repeated to about `tokens` tokens: a haystack with nothing to remember."""
    from ilc.data import Document

    return [Document("noise", NOISE * (tokens // 20 + 1))]


def make_sample(task: str, tokenizer, length: int, depth: float, seed: int,
                haystack: list[Document] | None = None) -> TaskSample:
    """One sample of `task` of at most `length` tokens; the same arguments always give the same sample.

    `haystack`: documents to hide the facts in (default: the embedded corpus; see also `noise_haystack`).
    A length too short for the task's question, facts and chat template, or a haystack too short for the length,
    is an `OptionError` naming the task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {tuple(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    spec = TASKS[task]
    rng = random.Random(f"{task}:{length}:{depth}:{seed}")
    facts = spec.build(rng, vocabulary())
    input_ids, cuts, split = _assemble(tokenizer, haystack, task, length, depth, facts)
    return TaskSample(task, input_ids, facts.answers, spec.rule, length, depth,
                      {"facts": facts.sentences, "cuts": cuts, "seed": seed, "question": facts.question, **split})


def _chat(tokenizer, content: str, **kwargs):
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, **kwargs)


def haystack_budget(tokenizer, task: str, length: int, facts: Facts) -> int:
    """Haystack tokens a `length`-token prompt of `task` holds beside its facts, question and chat template;
    refused (OptionError naming the task and its minimum length) if there is no room for any."""
    fact_tokens = sum(len(tokenizer(f, add_special_tokens=False)["input_ids"]) for f in facts.sentences)
    overhead = len(_chat(tokenizer, "\n\n" + facts.question, tokenize=True, return_dict=False)) + fact_tokens \
        + 2 * len(facts.sentences) + 4
    if length - overhead < 1:
        raise OptionError(f"a {length}-token prompt is too short for {task}: it needs at least {overhead + 1} tokens "
                          f"(its question, facts and chat template take {overhead} with this tokenizer)")
    return length - overhead


def _haystack_ids(tokenizer, haystack: list[Document] | None, task: str, length: int, budget: int) -> list[int]:
    from ilc.data import default_corpus

    text = " ".join(" ".join(d.text.split()) for d in (haystack or default_corpus()))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < budget:
        raise OptionError(f"the haystack has {len(ids)} tokens; a {length}-token {task} prompt needs {budget} of them "
                          "(pass a larger haystack or shorter lengths)")
    return ids[:budget]


def _assemble(tokenizer, haystack, task: str, length: int, depth: float, facts: Facts) -> tuple:
    """Insert the fact sentences spread from `depth` to the end of the text; wrap in the chat template."""
    ids = _haystack_ids(tokenizer, haystack, task, length, haystack_budget(tokenizer, task, length, facts))
    n = len(facts.sentences)
    cuts = [int(round((depth + (1 - depth) * k / max(n, 1) * 0.9) * len(ids))) if n > 1 else int(round(depth * len(ids)))
            for k in range(n)]
    pieces, last = [], 0
    for cut, fact in zip(cuts, facts.sentences):
        pieces.append(tokenizer.decode(ids[last:cut]))
        pieces.append(" " + fact + " ")
        last = cut
    pieces.append(tokenizer.decode(ids[last:]))
    document = "".join(pieces)
    enc = _chat(tokenizer, document + "\n\n" + facts.question, return_tensors="pt", return_dict=True)
    if enc["input_ids"].shape[1] > length:  # the record says `length`: the prompt must not be longer
        raise AssertionError(f"{task}: built a {enc['input_ids'].shape[1]}-token prompt for length {length}")
    return enc["input_ids"], cuts, _split_points(tokenizer, enc["input_ids"][0].tolist(), document, facts)


def _split_points(tokenizer, ids: list[int], document: str, facts: Facts) -> dict:
    """Token indices in `ids` where the question ("\n\n" + question) and the end of the user turn start (what a
    query-agnostic compressor, kvpress, must leave out of the compressed context), and of the token holding each
    fact's first character (`fact_starts`). -1 where the tokenizer cannot say (no offsets, or a token straddles
    the question's boundaries)."""
    unknown = {"question_start": -1, "answer_start": -1, "fact_starts": [-1] * len(facts.sentences)}
    text = _chat(tokenizer, document + "\n\n" + facts.question, tokenize=False)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):  # slow tokenizers give no offsets
        return unknown
    if enc["input_ids"] != ids:
        return unknown
    doc_start = text.index(document)
    doc_end = doc_start + len(document)
    question_end = doc_end + 2 + len(facts.question)
    starts = [a for a, _ in enc["offset_mapping"]]
    first = lambda char: next((i for i, a in enumerate(starts) if a >= char), -1)  # noqa: E731
    holding = lambda char: max(i for i, a in enumerate(starts) if a <= char)  # noqa: E731
    fact_starts, at = [], 0
    for fact in facts.sentences:
        at = document.index(fact, at)
        fact_starts.append(holding(doc_start + at))
        at += len(fact)
    q, a = first(doc_end), first(question_end)
    straddles = lambda i, char: i > 0 and enc["offset_mapping"][i - 1][1] > char  # noqa: E731
    if q < 0 or a < 0 or straddles(q, doc_end) or straddles(a, question_end):
        return {**unknown, "fact_starts": fact_starts}
    return {"question_start": q, "answer_start": a, "fact_starts": fact_starts}
