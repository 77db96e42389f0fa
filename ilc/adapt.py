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

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ilc.runtime import Plan, QualityWarning, model_signature, remove_plan
from ilc.runtime.adapter import adapter_fingerprint, mark_adapter
from ilc.runtime.heads import HeadKind
from ilc.runtime.plan import MODES, Adaptation, PlanError
from ilc.runtime.sequence import SequenceForward

from . import options
from .data import Document, default_corpus, pack, retrieval_samples
from .options import OptionError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
CHECKPOINT, LOG, ADAPTER_DIR, MERGED_DIR, PLAN_FILE = "checkpoint.pt", "log.jsonl", "adapter", "merged", "plan.yaml"


@dataclass(frozen=True)
class AdaptConfig:
    """Settings of one adaptation run. Everything but `tokens` must match for `--resume`."""

    tokens: int = 65536  # training budget; steps = ceil(tokens / seq_len), one sequence per step
    seq_len: int = 2048
    lr: float = 1e-3
    rank: int = 8
    targets: tuple[str, ...] = PROJECTIONS  # projections that get LoRA, in `layers`
    layers: str = "changed"  # "changed": layers holding a follower or streaming head, and their anchors; "all"
    mode: str | None = None  # sharing mode to train (None: the plan's)
    retrieval_share: float = 0.5  # share of the samples that are retrieval samples
    proximal_weight: float = 0.1  # loss weight of positions the plan does not change
    lm_weight: float = 0.0  # weight of the next-token loss beside the KL
    warmup_steps: int = 4  # fixed, not a share of the budget: a longer run passes through a shorter one
    checkpoint_every: int = 20
    seed: int = 0

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.seq_len)

    def validate(self, max_context: int | None = None) -> None:
        for name in ("tokens", "seq_len", "lr", "rank", "retrieval_share", "proximal_weight", "lm_weight",
                     "warmup_steps", "checkpoint_every", "seed"):
            options.check(name, getattr(self, name))
        if max_context and self.seq_len > max_context:
            raise OptionError(f"--seq-len {self.seq_len} exceeds the model's context of {max_context} tokens")
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if not self.targets or bad:
            raise OptionError(f"--targets: expected some of {','.join(PROJECTIONS)}, got {','.join(self.targets)}")
        if self.layers not in ("changed", "all"):
            raise OptionError(f"--layers: expected changed or all, got {self.layers!r}")
        if self.mode is not None and self.mode not in MODES:
            raise OptionError(f"--mode: expected one of {MODES}, got {self.mode!r}")

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
    digest = hashlib.sha256(pool.numpy().tobytes() + validation.numpy().tobytes()).hexdigest()[:16]
    return pool, validation, "sha256:" + digest


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
          on_step: Callable[[int, float], None] | None = None) -> AdaptResult:
    """Train a LoRA adapter so that `model` running `plan` matches `model` without it; write the outputs to `out`
    (see the module docstring). `on_step(step, loss)` is called after every step. The model is left with the
    adapter merged (`merge`) or wrapped in peft's LoRA layers."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm.auto import tqdm

    out = Path(out)
    config.validate(plan.model.max_context)
    if plan.adapted is not None:
        raise PlanError("this plan is already adapted; adapt the plan it was made from")
    check_out_dir(out, resume)
    mode = config.mode or plan.mode
    student_plan = plan.with_options(mode=mode)
    base_weights = model_signature(model).weights_fingerprint
    pool, validation, data_digest = training_samples(tokenizer, docs or default_corpus(), config)
    order = sample_order(len(pool), config.steps, config.seed)
    layers = adapted_layers(plan, config.layers)
    identity = {"config": config.identity(), "plan": _plan_digest(student_plan), "data": data_digest,
                "weights": base_weights}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QualityWarning)  # keys mode on unadapted weights: what this run fixes
        student_plan.apply(model)
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
    step, losses, kls, validation_initial = 0, [], [], None
    if resume:
        state = _read_checkpoint(out, identity, config, device)
        set_peft_model_state_dict(peft_model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, losses, kls = state["step"], state["losses"], state["kls"]
        validation_initial = state["validation_initial"]

    weights = torch.full((config.seq_len,), config.proximal_weight, device=device)
    weights[first_changed_position(student_plan):] = 1.0

    def save_checkpoint():
        tmp = out / (CHECKPOINT + ".tmp")
        torch.save({"identity": identity, "step": step, "losses": losses, "kls": kls,
                    "validation_initial": validation_initial,
                    "adapter": get_peft_model_state_dict(peft_model), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict()}, tmp)
        os.replace(tmp, out / CHECKPOINT)
        _write_log(out, losses, kls, config.seq_len)

    def step_loss(ids):
        with torch.no_grad(), peft_model.disable_adapter():
            teacher = peft_model(input_ids=ids, use_cache=False, ilc_sequence=SequenceForward.dense()).logits
        student = peft_model(input_ids=ids, use_cache=False,
                             ilc_sequence=SequenceForward.for_plan(student_plan)).logits
        return distillation_loss(student, teacher, ids, weights[:ids.shape[1]], config.lm_weight)

    def validation_loss() -> float:
        """Mean loss on the held-apart samples (no gradient; gradient checkpointing is idle without one)."""
        with torch.no_grad():
            return sum(step_loss(v[None].to(device))[0].item() for v in validation) / len(validation)

    out.mkdir(parents=True, exist_ok=True)
    if validation_initial is None:
        validation_initial = validation_loss()
    bar = tqdm(total=config.steps * config.seq_len, initial=step * config.seq_len, unit="tok", unit_scale=True,
               desc="adapting", disable=not progress)
    start_step, t0 = step, time.perf_counter()
    while step < config.steps:
        loss, kl = step_loss(pool[order[step]][None].to(device))
        kl = kl.detach()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss.item())
        kls.append(kl.item())
        bar.update(config.seq_len)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_checkpoint()
        if on_step is not None:
            on_step(step, losses[-1])
    bar.close()
    seconds = time.perf_counter() - t0
    trained = (step - start_step) * config.seq_len

    peft_model.eval()
    validation_final = validation_loss()
    _replace_dir(out / ADAPTER_DIR, lambda tmp: peft_model.save_pretrained(str(tmp)))
    digest = adapter_fingerprint(out / ADAPTER_DIR)
    adapted = student_plan.with_options(adapted=Adaptation(
        adapter=digest, base_weights=base_weights, mode=mode,
        tokens=step * config.seq_len, steps=step, rank=config.rank, targets=tuple(config.targets),
        layers=tuple(layers), loss_initial=validation_initial, loss_final=validation_final))
    model.gradient_checkpointing_disable()
    if merge:
        merged = mark_adapter(peft_model.merge_and_unload(), digest)
        remove_plan(merged)
        _replace_dir(out / MERGED_DIR, lambda tmp: _save_model(merged, tokenizer, tmp))
    adapted.save(out / PLAN_FILE)
    return AdaptResult(adapted, out, step, step * config.seq_len, losses, seconds,
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


def _plan_digest(plan: Plan) -> str:
    return "sha256:" + hashlib.sha256(plan.to_yaml().encode()).hexdigest()[:16]


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

