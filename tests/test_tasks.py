"""Evaluation tasks: deterministic, sized as asked, facts where the depth says, answers scorable."""

import pytest
import torch
from transformers import AutoTokenizer

from ilc.models import converted_copy, resolve
from ilc.eval.tasks import TASKS, make_sample, noise_haystack, score


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(converted_copy(resolve("smollm2-135m")))


def test_scoring_rules_on_known_outputs():
    assert score("The number is 7,481,923.", ("7481923",), "all") == 1.0
    assert score("no idea", ("7481923",), "all") == 0.0
    assert score("1111111 and 2222222", ("1111111", "2222222", "3333333", "4444444"), "all") == 0.5
    assert score("It is kept in LISBON.", ("Lisbon",), "part") == 1.0
    assert score("Paris", ("Lisbon", "Osaka"), "part") == 0.0
    with pytest.raises(ValueError, match="unknown scoring rule"):
        score("x", ("x",), "most")


@pytest.mark.parametrize("task", TASKS)
def test_task_is_deterministic_sized_and_scorable(tokenizer, task):
    a = make_sample(task, tokenizer, 1024, 0.5, seed=3)
    b = make_sample(task, tokenizer, 1024, 0.5, seed=3)
    c = make_sample(task, tokenizer, 1024, 0.5, seed=4)
    assert torch.equal(a.input_ids, b.input_ids) and a.answers == b.answers
    assert a.answers != c.answers
    n = a.input_ids.shape[1]
    assert 900 <= n <= 1024, n
    prompt = tokenizer.decode(a.input_ids[0])
    assert score(prompt, a.answers, a.rule) == 1.0  # every answer is in the context (never in the question alone)
    assert all(fact in prompt for fact in a.meta["facts"])


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_sits_at_the_requested_depth(tokenizer, depth):
    s = make_sample("niah", tokenizer, 2048, depth, seed=0)
    text = tokenizer.decode(s.input_ids[0])
    start = text.index("<|im_start|>user") + len("<|im_start|>user")
    end = text.index("What is the special magic number")
    where = (text.index("The special magic number is") - start) / (end - start)
    assert abs(where - depth) < 0.03, where


def test_commonwords_are_the_most_frequent(tokenizer):
    s = make_sample("commonwords", tokenizer, 1024, 0.3, seed=1)
    listing = s.meta["facts"][0].split(": ", 1)[1].rstrip(".").split(", ")
    counts = {w: listing.count(w) for w in set(listing)}
    top = sorted(counts, key=lambda w: -counts[w])[:10]
    assert set(top) == set(s.answers) and min(counts[w] for w in s.answers) > max(
        c for w, c in counts.items() if w not in s.answers)


def test_haystacks_and_errors(tokenizer):
    noisy = tokenizer.decode(make_sample("qa", tokenizer, 512, 0.5, seed=0, haystack=noise_haystack())
                             .input_ids[0])
    prose = tokenizer.decode(make_sample("qa", tokenizer, 512, 0.5, seed=0).input_ids[0])
    assert "The grass is green" in noisy and "Bennet" not in noisy
    assert "Bennet" in prose and "The grass is green" not in prose
    with pytest.raises(ValueError, match="unknown task"):
        make_sample("summarize", tokenizer, 512, 0.5, seed=0)
