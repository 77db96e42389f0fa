"""What one `ilc eval` run measures: the lengths, depths, seeds and answer length (`EvalConfig`), and its samples."""

from __future__ import annotations

from dataclasses import dataclass

from ilc import options
from ilc.data import Document
from ilc.options import OptionError

from .tasks import RULER_TASKS, TASKS, TaskSample, make_sample

PROMPT_OVERHEAD = 64  # tokens a task adds around its haystack (question, chat template), at most


@dataclass(frozen=True)
class EvalConfig:
    lengths: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # of the NIAH grid
    ruler_depths: tuple[float, ...] = (0.25, 0.5)  # of the RULER-style tasks
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

    def depths_of(self, task: str) -> tuple[float, ...]:
        return self.depths if TASKS[task].group == "niah" else self.ruler_depths


def build_samples(tasks: list[str], tokenizer, config: EvalConfig, haystack: list[Document] | None
                  ) -> list[TaskSample]:
    """Every task's samples: length x depth x seed (at most `config.limit` per task). A length too short for a task
    or a haystack too short for a length is refused here, before any model runs."""
    config.validate()
    samples: list[TaskSample] = []
    for task in tasks:
        batch = [make_sample(task, tokenizer, n, d, s, haystack) for n in config.lengths for d in config.depths_of(task)
                 for s in config.seeds]
        samples += batch[: config.limit] if config.limit else batch
    return samples


def headline_samples(tokenizer, lengths: tuple[int, ...], depths: tuple[float, ...], seeds: tuple[int, ...],
                     haystack: list[Document] | None) -> list[TaskSample]:
    """The sweep's prompts (docs/eval-sweep.md, docs/eval-peers.md, docs/serving.md): NIAH at every length x depth x
    seed (one needle per seed); the RULER-style tasks at every length, depth 50%, seed 0 (a full grid per task
    would triple the CPU time)."""
    niah = build_samples(["niah"], tokenizer, EvalConfig(lengths=lengths, depths=depths, seeds=seeds), haystack)
    ruler = build_samples(list(RULER_TASKS), tokenizer, EvalConfig(lengths=lengths, ruler_depths=(0.5,), seeds=(0,)),
                          haystack)
    return niah + ruler
