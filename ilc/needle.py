"""Needle-in-a-haystack prompts: plant "The special magic number is N." at a depth of a haystack of prose.

The haystack is any list of documents (the embedded corpus by default; `../shared/data/pg_essays` is the
standard one). The prompt is sized in tokens by the model's own tokenizer and wrapped in its chat template.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Document

QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."


@dataclass(frozen=True)
class NeedlePrompt:
    input_ids: torch.Tensor  # [1, T]
    answer: str
    depth: float
    needle_token: int  # index of the needle's first token in input_ids


def needle_sentence(value: str) -> str:
    return f" The special magic number is {value}. "


def build_prompt(tokenizer, haystack: list[Document], context_tokens: int, depth: float, value: str = "7481923"
                 ) -> NeedlePrompt:
    """A chat prompt of about `context_tokens` tokens with the needle at `depth` (0 = start, 1 = end) of the text."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    text = " ".join(" ".join(d.text.split()) for d in haystack)
    wrap = tokenizer.apply_chat_template([{"role": "user", "content": "\n\n" + QUESTION}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
    overhead = len(wrap) + len(tokenizer(needle_sentence(value), add_special_tokens=False)["input_ids"]) + 4
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    budget = context_tokens - overhead
    if budget <= 0 or len(ids) < budget:
        raise ValueError(f"haystack has {len(ids)} tokens; a {context_tokens}-token prompt needs {max(budget, 0)}")
    hay = ids[:budget]
    cut = int(round(depth * len(hay)))
    # cut at a sentence boundary near the depth so the needle reads naturally
    before = tokenizer.decode(hay[:cut])
    after = tokenizer.decode(hay[cut:])
    stop = before.rfind(". ")
    if stop > 0 and len(before) - stop < 400:
        before, after = before[: stop + 1], before[stop + 1:] + after
    document = before + needle_sentence(value) + after.lstrip()
    messages = [{"role": "user", "content": document + "\n\n" + QUESTION}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    input_ids = enc["input_ids"]
    needle_ids = tokenizer(f"special magic number is {value}", add_special_tokens=False)["input_ids"]
    flat = input_ids[0].tolist()
    pos = next((k for k in range(len(flat)) if flat[k:k + 3] == needle_ids[:3]), -1)
    return NeedlePrompt(input_ids, value, depth, pos)


def found(text: str, answer: str) -> bool:
    """RULER-style string match: the answer appears in the generated text."""
    return answer in text.replace(",", "")
