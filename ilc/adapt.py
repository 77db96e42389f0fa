"""`ilc adapt`: light self-distillation that teaches a model to run a plan (the paper's post-training, cheap).

The teacher is the model itself without the plan and without the adapter (no gradient); the student is the same
weights running the plan's attention (`ilc.runtime.sequence`: the computation serving runs, on whole sequences)
with trainable LoRA adapters (peft) on the attention projections of the layers the plan changes and their anchors.
The loss at a position is KL(teacher || student) over the vocabulary, weighted 1 where the plan changes attention
(past the sinks and the shortest proximal window) and `proximal_weight` before, plus `lm_weight` x the next-token
loss. Samples are the training text (`--data`) packed to `seq_len` tokens, interleaved with retrieval samples (facts
planted and recalled later, `ilc.data.retrieval_samples`), in an order fixed by the seed; one sample of each kind
is held apart, and its loss before and after training is the plan's `loss_initial` / `loss_final`.

The learning rate warms up over `warmup_steps` and then stays constant, so a run of N tokens passes through
exactly the state of a run of M < N tokens: `--resume` with a larger `--tokens` extends a finished run.

Output directory:
  checkpoint.pt   adapter, optimizer state, step, losses (every `checkpoint_every` steps; `--resume` reads it)
  log.jsonl       one line per step: step, tokens, loss, kl
  adapter/        the LoRA adapter in peft's format (adapter_config.json, adapter_model.safetensors)
  merged/         with `merge`: the merged weights (their config marked with the adapter digest) and tokenizer
  plan.yaml       the plan with an `adapted:` section, written last: it exists only for a finished run
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ilc.runtime import Plan, QualityWarning, model_signature, remove_plan
from ilc.runtime.adapter import adapter_fingerprint, mark_adapter
from ilc.runtime.heads import HeadKind, Mode
from ilc.runtime.plan import Adaptation, PlanError
from ilc.runtime.sequence import SequenceForward

from . import options
from .data import Document, default_corpus, pack, retrieval_samples
from .digests import plan_digest, tokens_digest
from .options import OptionError, enum_words, option

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
LAYER_SETS = ("changed", "all")  # which layers get LoRA (`adapted_layers`)
WARMUP_STEPS = 4  # fixed, not a share of the budget: a longer run passes through a shorter one
CHECKPOINT, LOG, ADAPTER_DIR, MERGED_DIR, PLAN_FILE = "checkpoint.pt", "log.jsonl", "adapter", "merged", "plan.yaml"


@dataclass(frozen=True)
class AdaptConfig:
    """Settings of one adaptation run; each field but `warmup_steps` is also an `ilc adapt` option. Everything but
    `tokens` must match for `--resume`."""

    tokens: int = option(65536, "training tokens; steps = tokens / --seq-len, rounded up, one sequence per step")
    seq_len: int = option(2048, "tokens per training sequence, longer than the plan's sinks + shortest window "
                          "(where its attention starts to differ) and within the model's context")
    lr: float = option(1e-3, f"learning rate, constant after {WARMUP_STEPS} warm-up steps")
    rank: int = option(8, "LoRA rank")
    targets: tuple[str, ...] = option(PROJECTIONS, "projections that get LoRA, a comma list")
    layers: str = option("changed", "changed: layers with follower or streaming heads and their anchors; all",
                         choices=lambda: LAYER_SETS)
    mode: str | None = option(None, "sharing mode to train", choices=lambda: enum_words(Mode),
                              shown_default="the plan's")
    retrieval_share: float = option(0.5, "share of samples with planted facts recalled later")
    proximal_weight: float = option(0.1, "loss weight of positions the plan does not change (within the proximal "
                                    "window)")
    lm_weight: float = option(0.0, "weight of the next-token loss beside the KL")
    warmup_steps: int = option(WARMUP_STEPS, cli=False)
    checkpoint_every: int = option(20, "steps between checkpoints")
    seed: int = option(0, "seed of the LoRA init and the sample order")

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.seq_len)

    def validate(self, max_context: int | None = None) -> None:
        options.check_ranges(self)
        options.check_context("--seq-len", self.seq_len, max_context)
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if not self.targets or bad:
            raise OptionError(f"--targets: expected some of {','.join(PROJECTIONS)}, got {','.join(self.targets)}")
        if self.layers not in LAYER_SETS:
            raise OptionError(f"--layers: expected {' or '.join(LAYER_SETS)}, got {self.layers!r}")
        if self.mode is not None and self.mode not in enum_words(Mode):
            raise OptionError(f"--mode: expected one of {enum_words(Mode)}, got {self.mode!r}")

    def identity(self) -> dict:
        """What a resumed run must share with the interrupted one."""
        return {k: v for k, v in asdict(self).items() if k != "tokens"}


@dataclass(frozen=True)
class AdaptResult:
    plan: Plan  # the adapted plan (also written to out/plan.yaml)
    out: Path
    steps: int
    tokens: int
    losses: list[float]
    seconds: float  # training time of this call (a resumed call: only its own steps)
    tokens_per_second: float


def check_plan(plan: Plan, config: AdaptConfig) -> Plan:
    """The plan as it will be trained (in the mode trained), or OptionError / PlanError, before any work: the config
    in its ranges and within the plan's model, a plan not adapted yet, and one whose attention differs from the
    full model's somewhere within --seq-len (else the loss is exactly 0 and the run learns nothing)."""
    config.validate(plan.model.max_context)
    if plan.adapted is not None:
        raise PlanError("this plan is already adapted; adapt the plan it was made from")
    student = plan.with_options(mode=config.mode or plan.mode)
    if all(spec.kind == HeadKind.FULL for row in student.head_table() for spec in row):
        raise OptionError("the plan keeps every head full: it changes nothing, so there is nothing to adapt")
    first = first_changed_position(student)
    if first >= config.seq_len:
        raise OptionError(f"--seq-len {config.seq_len}: the plan changes attention only from position {first} on "
                          f"({student.sinks} sinks + its shortest window of {first - student.sinks}); training on "
                          f"sequences no longer than that learns nothing (loss 0): use a --seq-len above {first}")
    return student


def check_adapter_option(plan: Plan, plan_name: str, adapter: str | None) -> None:
    """`--adapter DIR` and the plan belong together (OptionError before any model loads): an adapted plan needs
    the adapter it was adapted with, an unadapted plan takes none."""
    if plan.adapted is None:
        if adapter:
            raise OptionError(f"--adapter: {plan_name} has no adapted: section (pass the plan `ilc adapt` wrote)")
        return
    if not adapter:
        raise OptionError(f"{plan_name} is an adapted plan: pass --adapter DIR (the adapter `ilc adapt` wrote)")
    if adapter_fingerprint(adapter) != plan.adapted.adapter:
        raise OptionError(f"--adapter {adapter} is not the adapter {plan_name} was adapted with")


def adapted_layers(plan: Plan, which: str = "changed") -> list[int]:
    """Layers whose projections get LoRA: every layer ("all"), or the layers with a follower or streaming head
    plus the anchors their followers read ("changed")."""
    if which == "all":
        return list(range(plan.num_layers))
    layers = set()
    for layer, row in enumerate(plan.head_table()):
        for spec in row:
            if spec.kind != HeadKind.FULL:
                layers.add(layer)
            if spec.kind == HeadKind.FOLLOWER:
                layers.add(spec.anchor)
    return sorted(layers)


def first_changed_position(plan: Plan) -> int:
    """The first position where the plan's attention differs from the full model's (a query that has a distant
    token for some head): sinks + the shortest proximal window of a follower or streaming head."""
    windows = [spec.window for row in plan.head_table() for spec in row if spec.kind != HeadKind.FULL]
    return plan.sinks + min(windows) if windows else 1 << 62


def training_samples(tokenizer, docs: list[Document], config: AdaptConfig
                     ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(training pool [n, seq_len], validation samples [v, seq_len], digest of both). The pool holds prose samples
    and retrieval samples; the first of each kind is held apart for validation (never trained on)."""
    prose = pack(docs, tokenizer, config.seq_len).samples
    if len(prose) < 2:
        raise OptionError(f"the training text packs into {len(prose)} sample(s) of --seq-len {config.seq_len}; "
                          "adaptation needs at least 2 (one is held apart): add text or lower --seq-len")
    share = config.retrieval_share
    count = 0 if share == 0 else max(2, round(len(prose) * share / (1 - share)))
    planted = [s.ids for s in retrieval_samples(tokenizer, docs, config.seq_len, count, seed=config.seed,
                                                   off_switch="--retrieval-share 0")]
    kinds = [prose, torch.stack(planted)] if planted else [prose]
    pool = torch.cat([k[1:] for k in kinds])
    validation = torch.stack([k[0] for k in kinds])
    return pool, validation, tokens_digest(pool, validation)


def sample_order(n: int, steps: int, seed: int) -> list[int]:
    """The sample index of every step: a fresh seeded permutation of the pool per pass."""
    order: list[int] = []
    epoch = 0
    while len(order) < steps:
        order += torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        epoch += 1
    return order[:steps]


def distillation_loss(student_logits, teacher_logits, ids, weights, lm_weight: float):
    """(loss, weighted KL) for logits [1, T, V]: KL(teacher || student) per position, weighted by `weights` [T],
    plus lm_weight x the next-token cross-entropy."""
    s = student_logits[0].float().log_softmax(-1)
    t = teacher_logits[0].float().log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1)  # [T]
    kl = (kl * weights).sum() / weights.sum()
    loss = kl
    if lm_weight:
        loss = loss + lm_weight * torch.nn.functional.cross_entropy(s[:-1], ids[0, 1:])
    return loss, kl


def check_out_dir(out: Path, resume: bool) -> None:
    """A new run needs a fresh directory; --resume needs a checkpoint in it."""
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise OptionError(f"--resume: no {CHECKPOINT} in {out} (nothing to resume)")
        return
    if (out / PLAN_FILE).exists():
        raise OptionError(f"--out {out} holds a finished adaptation; choose another --out, or pass --resume with a "
                          "larger --tokens to train it further")
    if (out / CHECKPOINT).exists():
        raise OptionError(f"--out {out} holds an interrupted adaptation; pass --resume to continue it or choose "
                          "another --out")


def adapt(model, tokenizer, plan: Plan, config: AdaptConfig, out: str | Path, docs: list[Document] | None = None,
          resume: bool = False, merge: bool = False, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None,
          samples: tuple[torch.Tensor, torch.Tensor, str] | None = None) -> AdaptResult:
    """Train a LoRA adapter so that `model` running `plan` matches `model` without it; write the outputs to `out`
    (see the module docstring). `on_step(step, loss)` is called after every step. `samples`: the result of
    `training_samples(tokenizer, docs, config)` when already built (the CLI builds them before loading the model).
    The model is left with the adapter merged (`merge`) or wrapped in peft's LoRA layers."""
    out = Path(out)
    student_plan = check_plan(plan, config)
    check_out_dir(out, resume)
    run = _prepare(model, tokenizer, student_plan, config, out,
                   samples or training_samples(tokenizer, docs or default_corpus(), config))
    if resume:
        run.restore(_read_checkpoint(out, run.identity, config, run.device))
    out.mkdir(parents=True, exist_ok=True)
    if run.validation_initial is None:
        run.validation_initial = run.validation_loss()
    seconds, trained = _train(run, progress, on_step)
    return _finish(run, tokenizer, merge, seconds, trained)


@dataclass
class _Run:
    """One adaptation run: what `_prepare` builds, `_train` advances and `_finish` writes out."""

    out: Path
    config: AdaptConfig
    plan: Plan  # the plan as trained (its mode is the mode trained)
    layers: list[int]
    base_weights: str  # weights fingerprint of the model before adaptation
    identity: dict  # what a resumed run must share with this one
    pool: torch.Tensor
    validation: torch.Tensor
    order: list[int]  # pool index of every step
    base_model: Any  # the model passed in (its weights carry the LoRA layers of `model`)
    model: Any  # the peft model
    params: list
    optimizer: Any
    schedule: Any
    weights: torch.Tensor  # loss weight of every position
    device: Any
    step: int = 0
    losses: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)
    validation_initial: float | None = None

    def step_loss(self, ids):
        with torch.no_grad(), self.model.disable_adapter():
            teacher = self.model(input_ids=ids, use_cache=False, ilc_sequence=SequenceForward.dense()).logits
        student = self.model(input_ids=ids, use_cache=False, ilc_sequence=SequenceForward.for_plan(self.plan)).logits
        return distillation_loss(student, teacher, ids, self.weights[:ids.shape[1]], self.config.lm_weight)

    def validation_loss(self) -> float:
        """Mean loss on the held-apart samples (no gradient; gradient checkpointing is idle without one)."""
        with torch.no_grad():
            return sum(self.step_loss(v[None].to(self.device))[0].item() for v in self.validation) / len(self.validation)

    def save_checkpoint(self) -> None:
        from peft import get_peft_model_state_dict

        tmp = self.out / (CHECKPOINT + ".tmp")
        torch.save({"identity": self.identity, "step": self.step, "losses": self.losses, "kls": self.kls,
                    "validation_initial": self.validation_initial,
                    "adapter": get_peft_model_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
                    "schedule": self.schedule.state_dict()}, tmp)
        os.replace(tmp, self.out / CHECKPOINT)
        _write_log(self.out, self.losses, self.kls, self.config.seq_len)

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint (`_read_checkpoint`)."""
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.losses, self.kls = state["step"], state["losses"], state["kls"]
        self.validation_initial = state["validation_initial"]


def _prepare(model, tokenizer, plan: Plan, config: AdaptConfig, out: Path, samples: tuple) -> _Run:
    """Apply the plan, wrap the model in LoRA layers (seeded) and build the optimizer: a run at step 0."""
    from peft import LoraConfig, get_peft_model

    base_weights = model_signature(model).weights_fingerprint
    pool, validation, data_digest = samples
    order = sample_order(len(pool), config.steps, config.seed)
    layers = adapted_layers(plan, config.layers)
    identity = {"config": config.identity(), "plan": plan_digest(plan), "data": data_digest, "weights": base_weights}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QualityWarning)  # keys mode on unadapted weights: what this run fixes
        plan.apply(model)
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.rank, lora_alpha=2 * config.rank, lora_dropout=0.0, target_modules=list(config.targets),
                      layers_to_transform=layers, layers_pattern="layers", bias="none")
    peft_model = get_peft_model(model, lora)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
    weights = torch.full((config.seq_len,), config.proximal_weight, device=device)
    weights[first_changed_position(plan):] = 1.0
    return _Run(out, config, plan, layers, base_weights, identity, pool, validation, order, model, peft_model, params,
                optimizer, schedule, weights, device)


def _train(run: _Run, progress: bool, on_step: Callable[[int, float], None] | None) -> tuple[float, int]:
    """Train from the run's step to its last, checkpointing; returns (seconds, tokens trained by this call)."""
    from tqdm.auto import tqdm

    config = run.config
    bar = tqdm(total=config.steps * config.seq_len, initial=run.step * config.seq_len, unit="tok", unit_scale=True,
               desc="adapting", disable=not progress)
    start_step, t0 = run.step, time.perf_counter()
    while run.step < config.steps:
        loss, kl = run.step_loss(run.pool[run.order[run.step]][None].to(run.device))
        kl = kl.detach()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.params, 1.0)
        run.optimizer.step()
        run.schedule.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        run.losses.append(loss.item())
        run.kls.append(kl.item())
        bar.update(config.seq_len)
        bar.set_postfix(loss=f"{run.losses[-1]:.4f}")
        if run.step % config.checkpoint_every == 0 or run.step == config.steps:
            run.save_checkpoint()
        if on_step is not None:
            on_step(run.step, run.losses[-1])
    bar.close()
    return time.perf_counter() - t0, (run.step - start_step) * config.seq_len


def _finish(run: _Run, tokenizer, merge: bool, seconds: float, trained: int) -> AdaptResult:
    """Write the adapter, the merged weights (`merge`) and, last, the adapted plan."""
    run.model.eval()
    validation_final = run.validation_loss()
    out, config, step = run.out, run.config, run.step
    _replace_dir(out / ADAPTER_DIR, lambda tmp: run.model.save_pretrained(str(tmp)))
    digest = adapter_fingerprint(out / ADAPTER_DIR)
    adapted = run.plan.with_options(adapted=Adaptation(
        adapter=digest, base_weights=run.base_weights, mode=Mode(run.plan.mode).value,  # a plain string in YAML
        tokens=step * config.seq_len, steps=step, rank=config.rank, targets=tuple(config.targets),
        layers=tuple(run.layers), loss_initial=run.validation_initial, loss_final=validation_final))
    run.base_model.gradient_checkpointing_disable()
    if merge:
        merged = mark_adapter(run.model.merge_and_unload(), digest)
        remove_plan(merged)
        _replace_dir(out / MERGED_DIR, lambda tmp: _save_model(merged, tokenizer, tmp))
    adapted.save(out / PLAN_FILE)
    return AdaptResult(adapted, out, step, step * config.seq_len, run.losses, seconds,
                       trained / seconds if seconds > 0 else 0.0)


def _save_model(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(str(folder))
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))


def _read_checkpoint(out: Path, identity: dict, config: AdaptConfig, device) -> dict:
    """The checkpoint in `out`, refused unless it belongs to this run (same identity, no more steps than allowed)."""
    try:
        state = torch.load(out / CHECKPOINT, map_location=device, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise OptionError(f"--resume: {out / CHECKPOINT} is not a readable checkpoint ({exc})") from None
    for key, value in identity.items():
        if state["identity"][key] != value:
            raise OptionError(f"--resume: the run in {out} was made with another {key} "
                              f"({state['identity'][key]} != {value}); only --tokens may change")
    if state["step"] > config.steps:
        raise OptionError(f"--resume: the run in {out} already trained {state['step']} steps, more than "
                          f"--tokens {config.tokens} allows ({config.steps})")
    return state


def _write_log(out: Path, losses: list[float], kls: list[float], seq_len: int) -> None:
    tmp = out / (LOG + ".tmp")
    tmp.write_text("".join(json.dumps({"step": i + 1, "tokens": (i + 1) * seq_len, "loss": l, "kl": k}) + "\n"
                           for i, (l, k) in enumerate(zip(losses, kls))))
    os.replace(tmp, out / LOG)


def _replace_dir(target: Path, write: Callable[[Path], object]) -> None:
    """Write a directory next to `target`, then swap it in: a crash never leaves half a directory at `target`."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)

