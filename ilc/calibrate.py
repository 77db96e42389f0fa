"""The calibration compiler: model + sample text -> a validated plan.

Steps: pack the text into samples, and build retrieval samples from the same text (`data`); record sampled-row
attention on each (`attention_stats`); choose the proximal windows from the prose samples (`windows`); price
every option per (layer, KV head) on all samples (`similarity`: a follower's output change per anchor, a
streaming head's output change per window); choose per head (`grouping`): shared blocks only (`--kinds
follower`, or the paper's rule), or a mixed plan of full, follower and streaming heads under a budget; write
provenance. Same data, settings and seed give a byte-identical plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

import ilc
from ilc.runtime.architectures import model_signature
from ilc.runtime.heads import SCORERS, HeadKind, HeadSpec, Selection, stored_vectors
from ilc.runtime.plan import MODES, Block, Plan, blocks_from_layers, streaming_block

from . import grouping, options
from .attention_stats import record_sample, recording, sample_rows
from .data import load_calibration_set, read_documents, default_corpus, retrieval_samples
from .models import DEFAULT_MODEL, load_model
from .options import OptionError
from .similarity import CRITERIA, streaming_error
from .windows import WindowChoice, choose_windows

DEFAULT_CRITERION = {"paper": "jsd", "optimal": "output"}
DEFAULT_THRESHOLD = {"paper": 0.5, "optimal": 0.9}  # optimal floor: measured to keep NIAH on SmolLM2
MIXED_CRITERION_KEYS = ("assignment", "max_error", "streaming_windows", "total_error", "estimated_saving")
KINDS = ("follower", "streaming")  # what a (layer, KV head) may become besides full
STREAMING_WINDOWS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)  # candidates, up to half the seq-len


@dataclass
class CalibrationSettings:
    """Everything that decides a plan; recorded in it."""

    model: str = DEFAULT_MODEL
    data: list[str] | None = None
    seq_len: int = 2048
    samples: int = 8
    query_rows: int = 32
    method: str = "optimal"
    criterion: str | None = None  # default per method: paper -> jsd, optimal -> output
    min_similarity: float | None = None  # paper: delta; optimal: floor for every follower
    target_saving: float | None = None  # optimal only: reach this KV saving at target_context
    target_context: int | None = None  # default: seq_len (where the options' errors are measured)
    max_group_size: int = 8
    per_layer: bool = False
    sinks: int | None = None
    window: int | None = None
    window_mass: float = 0.8
    mode: str = "scores"
    kinds: tuple[str, ...] = KINDS
    retrieval_samples: int = 4
    max_error: float | None = None  # mixed plans: largest output error any one head's option may cost
    keep: float | None = None  # token selection: share of the distant tokens FULL heads keep (None: no selection)
    scorer: str = "snapkv"  # token selection's scoring rule (`ilc.runtime.heads.SCORERS`)
    selection_window: int = 64  # token selection: recent tokens always kept (SnapKV's observation window)
    device: str = "cpu"
    dtype: str | None = None
    device_map: str | None = None
    seed: int = 0

    @property
    def selection(self) -> Selection | None:
        """The plan's `Selection` (None without --keep)."""
        if self.keep is None:
            return None
        return Selection(keep=self.keep, scorer=self.scorer, window=self.selection_window)

    @property
    def mixed(self) -> bool:
        """Per-head kinds chosen under a budget (streaming allowed, optimal method)."""
        return self.method == "optimal" and "streaming" in self.kinds

    def validate(self) -> None:
        """Check every option against its range (`ilc.options.RANGES`) and the combinations; raises OptionError."""
        for name in ("seq_len", "samples", "query_rows", "min_similarity", "target_saving", "target_context",
                     "max_group_size", "sinks", "window", "window_mass", "max_error", "retrieval_samples", "seed", "keep",
                     "selection_window"):
            options.check(name, getattr(self, name))
        if self.method not in grouping.METHODS:
            raise OptionError(f"--method must be one of {', '.join(grouping.METHODS)}, got {self.method!r}")
        if (self.criterion or DEFAULT_CRITERION[self.method]) not in CRITERIA:
            raise OptionError(f"--criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.mode not in MODES:
            raise OptionError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.scorer not in SCORERS:
            raise OptionError(f"--scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise OptionError(f"--kinds must be a comma list of {', '.join(KINDS)}, got {','.join(self.kinds)!r}")
        if self.method == "paper" and self.kinds != KINDS and "streaming" in self.kinds:
            raise OptionError("--method paper groups followers only; it takes no --kinds")
        if self.mixed and self.criterion == "jsd":
            raise OptionError("--criterion jsd cannot price streaming heads: use --criterion output or --kinds follower")
        if self.mixed and self.per_layer:
            raise OptionError("--per-layer groups whole layers: use it with --kinds follower")
        if self.max_error is not None and not self.mixed:
            raise OptionError("--max-error is for mixed plans (--kinds follower,streaming); use --min-similarity")
        if self.max_error is not None and self.min_similarity is not None:
            raise OptionError("give --max-error or --min-similarity, not both")
        if self.target_saving is not None:
            if self.method != "optimal":
                raise OptionError("--target-saving needs --method optimal")
            if self.keep is not None and not self.mixed:
                raise OptionError("--keep with --target-saving prices heads as mixed plans do: use --method optimal "
                                  "with streaming in --kinds (the default)")
            if not self.mixed and self.target_saving >= 0.5:
                raise OptionError(f"--target-saving must be below 0.5 with --kinds follower (sharing keys saves at "
                                  f"most half the cache; add streaming to --kinds), got {self.target_saving}")
        if self.sinks is not None and self.sinks + (self.window or 1) >= self.seq_len // 2:
            raise OptionError(f"--sinks {self.sinks} leaves no distant tokens at the sampled rows of --seq-len "
                              f"{self.seq_len}; use fewer sinks or a longer --seq-len")
        if self.window is not None and self.window >= self.seq_len // 2:
            raise OptionError(f"--window {self.window} leaves no distant tokens at the sampled rows of --seq-len "
                              f"{self.seq_len}; use a window below {self.seq_len // 2}")


@dataclass
class CalibrationResult:
    plan: Plan
    seconds: float
    similarity: np.ndarray  # [Hkv, L, L] under the plan's criterion
    windows: WindowChoice
    streaming_error: np.ndarray | None = None  # [Hkv, L, len(streaming_windows)] (mixed plans)
    streaming_windows: tuple[int, ...] = ()


def calibrate(settings: CalibrationSettings, model=None, tokenizer=None, source_name: str | None = None,
              progress: bool = True) -> CalibrationResult:
    """Run calibration and return the plan (pass `model`/`tokenizer` to reuse a loaded model)."""
    settings.validate()
    docs = read_documents(settings.data) if settings.data else default_corpus()  # missing or empty: fail now
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    if model is None:
        dtype = getattr(torch, settings.dtype) if settings.dtype else None
        model, tokenizer, source = load_model(settings.model, settings.device, dtype, settings.device_map)
        source_name = source.name
    cfg = model.config.get_text_config()
    max_context = getattr(cfg, "max_position_embeddings", None)
    if max_context and settings.seq_len > max_context:
        raise OptionError(f"--seq-len {settings.seq_len} exceeds the model's context of {max_context} tokens")
    data = load_calibration_set(tokenizer, settings.data, settings.seq_len, settings.samples, docs)
    retrieval = retrieval_samples(tokenizer, docs, settings.seq_len, settings.retrieval_samples,
                                  settings.query_rows, settings.seed)
    rows = sample_rows(settings.seq_len, settings.query_rows)
    work = [(sample, rows) for sample in data.samples] + [(r.ids, r.rows) for r in retrieval]
    records = []
    with recording(model):
        for ids, sample_rows_ in tqdm(work, desc="calibrating", unit="sample", disable=not progress):
            records.append(record_sample(model, ids[None], sample_rows_))
    prose = records[:len(data.samples)]  # windows follow ordinary text; options are priced on every sample
    choice = choose_windows(prose, settings.seq_len, settings.sinks, settings.window, settings.window_mass)
    if choice.sinks + choice.window >= settings.seq_len // 2 + 1:
        raise ValueError(f"sinks + window ({choice.sinks} + {choice.window}) leave no distant tokens at the sampled "
                         f"rows of --seq-len {settings.seq_len}; use a longer --seq-len or a smaller --window")
    criterion = settings.criterion or DEFAULT_CRITERION[settings.method]
    span = min(settings.max_group_size, cfg.num_hidden_layers)
    sim = CRITERIA[criterion](records, choice.sinks, choice.window, span)  # [Hkv, L, L]
    target_context = settings.target_context or settings.seq_len
    windows, stream_err = (), None
    if settings.mixed:
        windows = tuple(w for w in STREAMING_WINDOWS if w <= settings.seq_len // 2)
        stream_err = streaming_error(records, choice.sinks, windows)
    per_head, chosen = plan_heads(sim, stream_err, windows, settings, target_context, choice.sinks, choice.window)
    plan = Plan(
        model=model_signature(model, name=source_name),
        sinks=choice.sinks,
        window=choice.window,
        blocks=per_head,
        selection=settings.selection,
        mode=settings.mode,
        criterion={
            "method": settings.method,
            "similarity": criterion,
            **_choice_entries(settings, chosen, target_context),
            "max_group_size": settings.max_group_size,
            "per_layer": settings.per_layer,
            "window_mass": settings.window_mass,
            "window_capped": choice.capped,
            "proximal_coverage": round(choice.coverage, 4),
        },
        calibration={
            "data": data.description,
            "data_digest": data.digest,
            "documents": data.documents,
            "samples": int(data.samples.shape[0]),
            "seq_len": settings.seq_len,
            "tokens": data.tokens,
            "retrieval_samples": len(retrieval),
            "query_rows": int(len(rows)),
            "seed": settings.seed,
            "dtype": str(model.dtype).replace("torch.", ""),
            "ilc_version": ilc.__version__,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__.split("+")[0],
        },
        distance_curve=choice.curve,
        similarity=_banded(sim, span),
    )
    return CalibrationResult(plan, time.perf_counter() - started, sim, choice, stream_err, windows)


def _choice_entries(settings: CalibrationSettings, chosen: dict, target_context: int) -> dict:
    """The plan's criterion entries that depend on how the heads were chosen (`chosen`: from `plan_heads`)."""
    return {"min_similarity": None if settings.mixed else _threshold(settings), **chosen,
            "target_saving": settings.target_saving,
            "target_context": target_context if settings.target_saving else None}


def _threshold(settings: CalibrationSettings) -> float | None:
    if settings.min_similarity is not None:
        return settings.min_similarity
    if settings.target_saving is not None:
        return None
    return DEFAULT_THRESHOLD[settings.method]


def group_layers(sim: np.ndarray, settings: CalibrationSettings, target_context: int, proximal: int):
    """Blocks per KV head (lists of layer lists) under the settings' method."""
    hkv, n, _ = sim.shape
    mats = [sim.mean(0)] if settings.per_layer else list(sim)
    threshold = _threshold(settings)
    if settings.method == "paper":
        out = [grouping.group_paper(m, threshold, settings.max_group_size) for m in mats]
    elif settings.target_saving is not None:
        needed = grouping.followers_for_saving(settings.target_saving, n, hkv, target_context, proximal)
        weight = hkv if settings.per_layer else 1
        try:
            out = grouping.group_target(mats, needed, settings.max_group_size, threshold, weight=weight)
        except ValueError as exc:
            raise ValueError(f"--target-saving {settings.target_saving} at {target_context} tokens is out of reach: "
                             f"{exc}; raise --max-group-size or lower the target") from None
    else:
        out = [grouping.group_max_saving(m, threshold, settings.max_group_size) for m in mats]
    return out * hkv if settings.per_layer else out


def plan_blocks(sim: np.ndarray, settings: CalibrationSettings, target_context: int, proximal: int) -> tuple:
    """Per KV head, the plan's `Block`s under the settings' method, each with its weakest similarity."""
    blocks = group_layers(sim, settings, target_context, proximal)
    mats = [sim.mean(0)] * len(sim) if settings.per_layer else sim
    return tuple(blocks_from_layers(b, grouping.blocks_min_similarity(m, b)) for b, m in zip(blocks, mats))


def plan_heads(sim: np.ndarray, stream_err: np.ndarray | None, windows: tuple[int, ...],
               settings: CalibrationSettings, target_context: int, sinks: int, window: int) -> tuple[tuple, dict]:
    """Per KV head, the plan's blocks under the settings, and what to record in the plan's criterion.

    With token selection (--keep), every head is priced as selection leaves it: a FULL head already saves what
    selection drops (at no priced error: selection's loss is not measured here), so the choices are made on what
    each option saves beyond that, towards the rest of the target. Followers need values for their whole window,
    so with a selection window below it, heads are full or streaming."""
    if not settings.mixed:
        return plan_blocks(sim, settings, target_context, sinks + window), {"kinds": ["follower"]}
    hkv, n, _ = sim.shape
    selection = settings.selection
    dense = 2 * n * hkv * target_context  # vectors of the whole dense cache
    saving = lambda spec: (2 * target_context - stored_vectors(spec, target_context, sinks, selection)) / dense  # noqa: E731
    base = saving(HeadSpec(HeadKind.FULL, 0, 0))  # what selection alone saves per head
    follower_saving = saving(HeadSpec(HeadKind.FOLLOWER, 0, window)) - base
    stream_saving = np.array([saving(HeadSpec(HeadKind.STREAMING, 0, w)) for w in windows]) - base
    allowed = frozenset(settings.kinds)
    if selection is not None and selection.window < window:  # followers need values for their whole window
        allowed -= {"follower"}
    options = [grouping.HeadOptions(1.0 - sim[h], follower_saving, stream_err[h], stream_saving, windows, allowed)
               for h in range(hkv)]
    max_error = settings.max_error
    if max_error is None and settings.target_saving is None:
        max_error = 1.0 - (settings.min_similarity if settings.min_similarity is not None
                           else DEFAULT_THRESHOLD["optimal"])
    size = min(settings.max_group_size, n)
    target = None if settings.target_saving is None else settings.target_saving - base * n * hkv
    try:
        segments, error, saved = grouping.assign_mixed(options, size, target, max_error)
        saved += base * n * hkv
    except ValueError as exc:
        raise ValueError(f"--target-saving {settings.target_saving} at {target_context} tokens is out of reach: "
                         f"{exc}; raise --max-group-size or --max-error, or lower the target") from None
    blocks = []
    for h, segs in enumerate(segments):
        head: list[Block] = []
        for seg in segs:
            if seg.streaming_window is not None:
                head.append(streaming_block(seg.layers[0], seg.streaming_window))
            else:
                low = grouping.blocks_min_similarity(sim[h], [list(seg.layers)])[0]
                head += blocks_from_layers([seg.layers], [low])
        blocks.append(tuple(head))
    chosen = {"kinds": [k for k in settings.kinds if k in allowed], "assignment": "lagrangian-dp",
              "max_error": max_error, "streaming_windows": list(windows), "total_error": round(error, 4),
              "estimated_saving": round(saved, 4)}
    return tuple(blocks), chosen


def regroup(result: CalibrationResult, settings: CalibrationSettings, target_context: int) -> Plan:
    """`result`'s plan with its heads chosen again under `settings`. Choosing is the only step that depends on
    the threshold, target or kinds, so the records and option prices of one calibration serve every setting."""
    plan = result.plan
    if settings.mixed and result.streaming_error is None:
        raise ValueError("this calibration priced no streaming options; calibrate with --kinds follower,streaming")
    blocks, chosen = plan_heads(result.similarity, result.streaming_error, result.streaming_windows, settings,
                                target_context, plan.sinks, plan.window)
    kept = {k: v for k, v in plan.criterion.items() if k not in MIXED_CRITERION_KEYS}
    criterion = {**kept, **_choice_entries(settings, chosen, target_context)}
    return replace(plan, blocks=blocks, criterion=criterion, selection=settings.selection)


def _banded(sim: np.ndarray, span: int) -> dict:
    """Similarity of each anchor to the next span-1 layers, per KV head, rounded (for `ilc inspect`)."""
    hkv, n, _ = sim.shape
    rows = [[[round(float(sim[h, a, f]), 3) for f in range(a + 1, min(n, a + span))] for a in range(n)]
            for h in range(hkv)]
    return {"span": span, "per_head": rows}

