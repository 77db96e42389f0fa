"""Long-context evaluation tasks, generated locally with fixed seeds (no downloads): the inputs of `ilc eval`.

Every task plants facts in a haystack of prose (a directory of texts, the embedded corpus, or RULER's noise
filler) at a controlled depth and asks for them back. Scoring is RULER's string match (see `score`):
- ``niah``: one 7-digit "special magic number" at a depth of the context;
- ``multikey``: four keys, each with its number; the question names one key (the others are distractors);
- ``multivalue``: one key planted four times with different numbers; all four must come back;
- ``vartrack``: a chain ``VAR A = 12345 ... VAR B = VAR A ...``; every variable equal to the value must come back;
- ``commonwords``: a list where ten words repeat much more often than the rest; the ten must come back;
- ``qa``: a planted fact ("The <adjective> <noun> is kept in <city>.") and a question about it.
Key words come from the embedded corpus's own vocabulary, so no word-list package is needed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch

from .data import Document, default_corpus

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
CITIES = ("Lisbon", "Nairobi", "Montreal", "Osaka", "Krakow", "Santiago", "Bergen", "Hanoi", "Tucson", "Dakar")
TASKS = ("niah", "multikey", "multivalue", "vartrack", "commonwords", "qa")


@dataclass(frozen=True)
class TaskSample:
    task: str
    input_ids: torch.Tensor  # [1, T], chat-formatted
    answers: tuple[str, ...]
    rule: str  # "all": score = share of answers found; "part": 1 if any answer is found
    length: int  # requested context tokens
    depth: float  # where the planted facts start (0 = beginning, 1 = end)
    meta: dict = field(default_factory=dict)  # facts, seed, question; question_start / answer_start: token indices
    # of "\n\n" + question and of the end of the user turn (-1 if unknown)


def score(text: str, answers: tuple[str, ...], rule: str) -> float:
    """RULER's string match, case-insensitive: `all` = share of answers contained, `part` = any contained."""
    low = text.lower().replace(",", "")
    hits = [a.lower() in low for a in answers]
    if rule == "all":
        return sum(hits) / len(hits)
    if rule == "part":
        return float(any(hits))
    raise ValueError(f"unknown scoring rule {rule!r}")


def vocabulary(docs: list[Document] | None = None, min_len: int = 5) -> list[str]:
    """Lower-case words of the corpus, sorted: a deterministic word list for keys and distractors."""
    docs = docs or default_corpus()
    words = {w.lower() for d in docs for w in re.findall(r"[A-Za-z]+", d.text) if len(w) >= min_len}
    return sorted(words)


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def noise_haystack(tokens: int = 16384) -> list[Document]:
    """RULER's filler text, repeated to about `tokens` tokens: a haystack with nothing to remember."""
    return [Document("noise", NOISE * (tokens // 20 + 1))]


def _haystack_ids(tokenizer, haystack: list[Document] | None, budget: int) -> list[int]:
    text = " ".join(" ".join(d.text.split()) for d in (haystack or default_corpus()))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < budget:
        raise ValueError(f"haystack has {len(ids)} tokens; this prompt needs {budget}")
    return ids[:budget]


def _assemble(tokenizer, haystack, length: int, depth: float, facts: list[str], question: str) -> tuple:
    """Insert `facts` (sentences) spread from `depth` to the end of the text; wrap in the chat template."""
    fact_tokens = sum(len(tokenizer(f, add_special_tokens=False)["input_ids"]) for f in facts) + 2 * len(facts)
    wrap = len(tokenizer.apply_chat_template([{"role": "user", "content": "\n\n" + question}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False))
    budget = length - wrap - fact_tokens - 4
    ids = _haystack_ids(tokenizer, haystack, budget)
    n = len(facts)
    cuts = [int(round((depth + (1 - depth) * k / max(n, 1) * 0.9) * len(ids))) if n > 1 else int(round(depth * len(ids)))
            for k in range(n)]
    pieces, last = [], 0
    for cut, fact in zip(cuts, facts):
        pieces.append(tokenizer.decode(ids[last:cut]))
        pieces.append(" " + fact + " ")
        last = cut
    pieces.append(tokenizer.decode(ids[last:]))
    document = "".join(pieces)
    enc = tokenizer.apply_chat_template([{"role": "user", "content": document + "\n\n" + question}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return enc["input_ids"], cuts, _split_points(tokenizer, enc["input_ids"][0].tolist(), document, question)


def _split_points(tokenizer, ids: list[int], document: str, question: str) -> dict:
    """Token indices where the question ("\n\n" + question) and the end of the user turn start in `ids`: what a
    query-agnostic compressor (kvpress) must leave out of the compressed context. -1 where the tokenizer cannot say
    (no offsets, or a token straddles the boundary)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": document + "\n\n" + question}],
                                         add_generation_prompt=True, tokenize=False)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):  # slow tokenizers give no offsets
        return {"question_start": -1, "answer_start": -1}
    if enc["input_ids"] != ids:
        return {"question_start": -1, "answer_start": -1}
    doc_end = text.index(document) + len(document)
    question_end = doc_end + 2 + len(question)
    starts = [a for a, _ in enc["offset_mapping"]]
    first = lambda char: next((i for i, a in enumerate(starts) if a >= char), -1)  # noqa: E731
    q, a = first(doc_end), first(question_end)
    straddles = lambda i, char: i > 0 and enc["offset_mapping"][i - 1][1] > char  # noqa: E731
    if q < 0 or a < 0 or straddles(q, doc_end) or straddles(a, question_end):
        return {"question_start": -1, "answer_start": -1}
    return {"question_start": q, "answer_start": a}


def make_sample(task: str, tokenizer, length: int, depth: float, seed: int,
                haystack: list[Document] | None = None) -> TaskSample:
    """One sample of `task` of about `length` tokens; the same arguments always give the same sample.

    `haystack`: documents to hide the facts in (default: the embedded corpus; see also `noise_haystack`).
    """
    rng = random.Random(f"{task}:{length}:{depth}:{seed}")
    words = vocabulary()
    if task == "niah":
        value = _number(rng)
        facts = [f"The special magic number is {value}."]
        question = "What is the special magic number mentioned in the text above? Answer with the number only."
        answers, rule = (value,), "all"
    elif task == "multikey":
        keys = rng.sample(words, 4)
        values = [_number(rng) for _ in keys]
        facts = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
        target = rng.randrange(4)
        question = f"What is the special magic number for {keys[target]} mentioned in the text above?"
        answers, rule = (values[target],), "all"
        facts = facts[target:] + facts[:target]  # the asked-for fact sits at the requested depth
    elif task == "multivalue":
        key = rng.choice(words)
        values = [_number(rng) for _ in range(4)]
        facts = [f"One of the special magic numbers for {key} is: {v}." for v in values]
        question = f"What are all the special magic numbers for {key} mentioned in the text above?"
        answers, rule = tuple(values), "all"
    elif task == "vartrack":
        value = str(rng.randint(10_000, 99_999))
        names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
        facts = [f"VAR {names[0]} = {value}."] + [f"VAR {names[k]} = VAR {names[k - 1]}." for k in range(1, 4)]
        question = f"Find all variables that are assigned the value {value} in the text above."
        answers, rule = tuple(names), "all"
    elif task == "commonwords":
        common = rng.sample(words, 10)
        rare = rng.sample([w for w in words if w not in common], 40)
        listing = common * 6 + rare
        rng.shuffle(listing)
        facts = ["Here is a list of words: " + ", ".join(listing) + "."]
        question = "What are the 10 most common words in the list of words above? Answer with the words only."
        answers, rule = tuple(common), "all"
    elif task == "qa":
        adjective, noun = rng.sample(words, 2)
        city = rng.choice(CITIES)
        facts = [f"The {adjective} {noun} is kept in {city}."]
        question = f"According to the text above, where is the {adjective} {noun} kept? Answer with the city only."
        answers, rule = (city,), "part"
    else:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    input_ids, cuts, split = _assemble(tokenizer, haystack, length, depth, facts, question)
    return TaskSample(task, input_ids, answers, rule, length, depth,
                      {"facts": facts, "cuts": cuts, "seed": seed, "question": question, **split})
