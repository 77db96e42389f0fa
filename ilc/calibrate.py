"""The calibration compiler: model + sample text -> a validated plan.

Steps: pack the text into samples, and build retrieval samples from the same text (`data`); record sampled-row
attention on each (`attention_stats`); choose the proximal windows from the prose samples (`windows`); price
every option per (layer, KV head) on all samples (`similarity`: a follower's output change per anchor, a
streaming head's output change per window; `precision`: each precision's; `selection_loss`: what token
selection drops, with --keep); choose per head (`grouping`): shared blocks only (`--kinds
follower`, or the paper's rule), or a mixed plan of full, follower and streaming heads under a budget; write
provenance. Same data, settings and seed give a byte-identical plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

import ilc
from ilc.runtime.architectures import model_signature
from ilc.runtime.bits import DEFAULT_RESIDUAL, FULL_PRECISION, HeadPrecision, Precision, head_bytes
from ilc.runtime.heads import SCORERS, HeadKind, HeadSpec, Mode, Selection, dense_vectors
from ilc.runtime.plan import Block, Plan, blocks_from_layers, streaming_block

from . import grouping, options
from .attention_stats import record_sample, recording, sample_rows
from .data import load_calibration_set, read_documents, default_corpus, retrieval_samples
from .models import DEFAULT_DEVICE, DEFAULT_MODEL, DTYPES, load_model, load_tokenizer, model_context
from .options import OptionError, check_context, enum_words, option
from .precision import precision_error
from .selection_loss import can_price, selection_error
from .similarity import CRITERIA, streaming_error
from .windows import WindowChoice, choose_windows

MIXED_CRITERION_KEYS = ("assignment", "max_error", "streaming_windows", "precisions", "streaming_precisions",
                        "selection_loss", "keep_choice", "total_error", "estimated_saving")
KINDS = (HeadKind.FOLLOWER, HeadKind.STREAMING)  # what a (layer, KV head) may become besides full
KIND_LABELS = tuple(k.label for k in KINDS)
STREAMING_WINDOWS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)  # candidates, up to half the seq-len
KEEP_CANDIDATES = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)  # token selection's shares that --choose-keep prices


@dataclass(frozen=True)
class Method:
    """A grouping method of `--method`: its defaults and what it can do (`grouping` has the algorithms)."""

    name: str
    criterion: str  # default similarity criterion (`similarity.CRITERIA`)
    threshold: float  # default similarity floor of every follower
    exact: bool  # reaches a --target-saving and mixes kinds (full, follower, streaming) under a budget
    group: Callable  # (similarity matrices, floor, settings, followers needed or None, weight) -> blocks per matrix


def _optimal_groups(mats, threshold, settings, needed, weight):
    if needed is None:
        return [grouping.group_max_saving(m, threshold, settings.max_group_size) for m in mats]
    return grouping.group_target(mats, needed, settings.max_group_size, threshold, weight=weight)


def _paper_groups(mats, threshold, settings, needed, weight):
    return [grouping.group_paper(m, threshold, settings.max_group_size) for m in mats]


METHODS = {m.name: m for m in (
    Method("optimal", "output", 0.9, True, _optimal_groups),  # floor 0.9: measured to keep NIAH on SmolLM2
    Method("paper", "jsd", 0.5, False, _paper_groups),  # the paper's greedy rule and delta
)}
EXACT_METHODS = ", ".join(m.name for m in METHODS.values() if m.exact)


@dataclass
class CalibrationSettings:
    """Everything that decides a plan; recorded in it. Each field is also an `ilc calibrate` option."""

    model: str = option(DEFAULT_MODEL, "embedded name (smollm2-135m), HF directory, .gguf file, or hub id in the "
                        "local cache", positional=True)
    data: list[str] | None = option(None, ".txt files, directories of them, or .jsonl with a 'text' field",
                                    shown_default="the embedded public-domain corpus")
    seq_len: int = option(2048, "tokens per calibration sample, at most the model's context")
    samples: int = option(8, "at most this many prose samples")
    query_rows: int = option(32, "query rows recorded per sample")
    method: str = option("optimal", "optimal: exact choice (mixed plans: Lagrangian DP per head); paper: the "
                         "paper's greedy rule, followers only", choices=lambda: METHODS)
    criterion: str | None = option(None, "similarity: output change under sharing, or 1-JSD of distant attention",
                                   choices=lambda: CRITERIA,
                                   shown_default=", ".join(f"{m.criterion} for {m.name}" for m in METHODS.values()))
    min_similarity: float | None = option(None, "similarity floor for every follower (paper: delta)",
                                          shown_default=", ".join(f"{m.threshold} for {m.name}"
                                                                  for m in METHODS.values())
                                          + ", unless --target-saving is given")
    target_saving: float | None = option(None, "reach this KV saving at --target-context with the least output "
                                         "error (optimal method); below 0.5 with --kinds follower",
                                         shown_default="none")
    target_context: int | None = option(None, "context the target saving is measured at",
                                        shown_default="--seq-len, where the errors are measured; the saving grows "
                                        "with context")
    max_group_size: int = option(8, "layers per block at most")
    per_layer: bool = option(False, "all KV heads of a layer share the same blocks (with --kinds follower)")
    sinks: int | None = option(None, "sink tokens", shown_default="chosen from the attention curve")
    window: int | None = option(None, "follower recent window, below --seq-len / 2",
                                shown_default="chosen from the attention curve")
    window_mass: float = option(0.8, "share of attention mass the sinks + window must hold")
    mode: str = option(Mode.SCORES.value, "scores: followers reuse the anchor's distant logits (training-free); "
                       "keys: own query on the anchor's keys (adapted models only)", choices=lambda: enum_words(Mode))
    kinds: tuple[str, ...] = option(KIND_LABELS, "what a (layer, KV head) may become besides full, a comma list: "
                                    "follower (PoD sharing), streaming (sinks + own window only); --kinds follower "
                                    "gives PoD-only plans")
    retrieval_samples: int = option(4, "extra samples with planted facts recalled later and a copied passage, "
                                    "built from the same text, so that retrieval heads are priced as such")
    max_error: float | None = option(None, "mixed plans: largest output error any head's option may cost",
                                     shown_default="0.1 without --target-saving, none with it")
    keep: float | None = option(None, "token selection (SnapKV-style, once at the end of prefill): the share of "
                                "distant tokens every full head keeps; followers keep their anchor's choice, "
                                "streaming heads are unaffected; what it loses is priced per head (mixed plans)",
                                shown_default="no selection")
    scorer: str = option("snapkv", "token selection's scoring rule", choices=lambda: SCORERS)
    selection_window: int = option(64, "token selection: recent tokens always kept and the queries that score; at "
                                   "least the followers' window")
    selection_pool: int = option(Selection.pool, "token selection: width of the pooling over the scores (odd; 1 = "
                                 "none); a wider pool keeps whole neighbourhoods of well-read tokens")
    free_selection: bool = option(False, "with --keep: price selection's loss at zero (as plans were chosen before "
                                  "it was priced; the replay scorer is never priced)")
    choose_keep: bool = option(False, "token selection with the share chosen by calibration instead of --keep: "
                               f"each of {', '.join(map(str, KEEP_CANDIDATES))} priced, the one whose plan reaches "
                               "--target-saving with the least total error kept")
    precision: tuple[str, ...] = option((), "mixed plans: precisions a shared block (and a streaming head with a "
                                        "window past the residual by 4 groups) may store its keys and values at "
                                        "besides 16-bit, a comma list of K<bits>[c]V<bits> (bits 8, 4, 2; c: keys "
                                        "grouped per channel), e.g. K8V8,K4cV4,K4cV2; each priced per head by the "
                                        "output error of the stored integers", shown_default="16-bit only")
    streams_16bit: bool = option(False, "with --precision: keep every streaming head at 16 bits (as plans were "
                                 "chosen before streaming heads' bits were priced)")
    residual: int = option(DEFAULT_RESIDUAL, "recent tokens a quantized head keeps at 16 bits (with the sinks)")
    device: str = option(DEFAULT_DEVICE, "torch device (cpu, cuda, cuda:1, mps)")
    dtype: str | None = option(None, "weights dtype", choices=lambda: DTYPES,
                               shown_default="bfloat16 on CUDA, else float32")
    device_map: str | None = option(None, "e.g. auto (accelerate) for models larger than one GPU")
    seed: int = option(0, "seed of the retrieval samples")

    @property
    def selection(self) -> Selection | None:
        """The plan's `Selection` (None without --keep; --choose-keep tries several, `per_keep`)."""
        if self.keep is None:
            return None
        return Selection(keep=self.keep, scorer=self.scorer, window=self.selection_window, pool=self.selection_pool)

    @property
    def per_keep(self) -> tuple[CalibrationSettings, ...]:
        """These settings once per token-selection share to try: each of KEEP_CANDIDATES with --choose-keep,
        else only themselves."""
        if not self.choose_keep:
            return (self,)
        return tuple(replace(self, keep=keep, choose_keep=False) for keep in KEEP_CANDIDATES)

    @property
    def priced_selections(self) -> tuple[Selection, ...]:
        """The selections whose loss calibration measures (`ilc.selection_loss`): none without --keep or
        --choose-keep, with --free-selection, for a scorer calibration cannot run, or without per-head choices."""
        if self.free_selection or not self.mixed:
            return ()
        return tuple(s.selection for s in self.per_keep if s.selection is not None and can_price(s.scorer))

    @property
    def precisions(self) -> tuple[HeadPrecision, ...]:
        """16-bit, then `precision` as `HeadPrecision`s."""
        return (FULL_PRECISION, *(HeadPrecision.parse(name) for name in self.precision))

    @property
    def head_kinds(self) -> frozenset[HeadKind]:
        """`kinds` as `HeadKind`s (labels in the settings and the plan, enums in the code)."""
        return frozenset(HeadKind.from_label(k) for k in self.kinds)

    @property
    def mixed(self) -> bool:
        """Per-head kinds chosen under a budget (streaming allowed, an exact method)."""
        method = METHODS.get(self.method)
        return method is not None and method.exact and HeadKind.STREAMING.label in self.kinds

    def validate(self) -> None:
        """Check every option against its range (`ilc.options.RANGES`) and the combinations; raises OptionError."""
        options.check_ranges(self)
        self._validate_names()
        self._validate_combinations()

    def _validate_names(self) -> None:
        if self.method not in METHODS:
            raise OptionError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if (self.criterion or METHODS[self.method].criterion) not in CRITERIA:
            raise OptionError(f"--criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.mode not in enum_words(Mode):
            raise OptionError(f"--mode must be one of {', '.join(enum_words(Mode))}, got {self.mode!r}")
        if self.scorer not in SCORERS:
            raise OptionError(f"--scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")
        if self.selection_pool % 2 == 0:
            raise OptionError(f"--selection-pool must be odd (the pool is centred on each token), got "
                              f"{self.selection_pool}")
        for name in self.precision:
            try:
                HeadPrecision.parse(name)
            except ValueError as exc:
                raise OptionError(f"--precision: {exc}") from None
        unknown = [k for k in self.kinds if k not in KIND_LABELS]
        if unknown or not self.kinds:
            raise OptionError(f"--kinds must be a comma list of {', '.join(KIND_LABELS)}, got {','.join(self.kinds)!r}")

    def _validate_combinations(self) -> None:
        if not METHODS[self.method].exact and self.kinds != KIND_LABELS and HeadKind.STREAMING.label in self.kinds:
            raise OptionError(f"--method {self.method} groups followers only; it takes no --kinds")
        if self.mixed and self.criterion == "jsd":
            raise OptionError("--criterion jsd cannot price streaming heads: use --criterion output or --kinds follower")
        if self.mixed and self.per_layer:
            raise OptionError("--per-layer groups whole layers: use it with --kinds follower")
        if self.precision and not self.mixed:
            raise OptionError("--precision prices bits beside kinds in mixed plans: use --method optimal with "
                              "streaming in --kinds (the default)")
        if self.choose_keep:
            self._validate_choose_keep()
        if self.free_selection and self.keep is None:
            raise OptionError("--free-selection prices token selection at zero: give --keep")
        if self.streams_16bit and not self.precision:
            raise OptionError("--streams-16bit keeps streaming heads at 16 bits among --precision's options: give "
                              "--precision")
        if self.max_error is not None and not self.mixed:
            raise OptionError("--max-error is for mixed plans (--kinds follower,streaming); use --min-similarity")
        if self.max_error is not None and self.min_similarity is not None:
            raise OptionError("give --max-error or --min-similarity, not both")
        if self.target_saving is not None:
            self._validate_target()
        if self.sinks is not None and self.sinks + (self.window or 1) >= self.seq_len // 2:
            raise OptionError(f"--sinks {self.sinks} leaves no distant tokens at the sampled rows of --seq-len "
                              f"{self.seq_len}; use fewer sinks or a longer --seq-len")
        if self.window is not None and self.window >= self.seq_len // 2:
            raise OptionError(f"--window {self.window} leaves no distant tokens at the sampled rows of --seq-len "
                              f"{self.seq_len}; use a window below {self.seq_len // 2}")

    def _validate_choose_keep(self) -> None:
        if self.keep is not None:
            raise OptionError("give --keep or --choose-keep, not both")
        if self.target_saving is None or not self.mixed:
            raise OptionError("--choose-keep compares shares at one --target-saving in a mixed plan: give "
                              "--target-saving (and keep streaming in --kinds)")
        if self.free_selection or not can_price(self.scorer):
            raise OptionError(f"--choose-keep compares the priced losses of selection: it cannot be used with "
                              f"{'--free-selection' if self.free_selection else f'--scorer {self.scorer}'}")

    def _validate_target(self) -> None:
        if not METHODS[self.method].exact:
            raise OptionError(f"--target-saving needs --method {EXACT_METHODS}")
        if self.keep is not None and not self.mixed:
            raise OptionError("--keep with --target-saving prices heads as mixed plans do: use --method optimal "
                              "with streaming in --kinds (the default)")
        if not self.mixed and self.target_saving >= 0.5:
            raise OptionError(f"--target-saving must be below 0.5 with --kinds follower (sharing keys saves at "
                              f"most half the cache; add streaming to --kinds), got {self.target_saving}")


@dataclass
class CalibrationResult:
    plan: Plan
    seconds: float
    similarity: np.ndarray  # [Hkv, L, L] under the plan's criterion
    windows: WindowChoice
    streaming_error: np.ndarray | None = None  # [Hkv, L, len(streaming_windows)] (mixed plans)
    streaming_windows: tuple[int, ...] = ()
    precision_error: dict | None = None  # precision name -> [Hkv, L]; (name, window) -> [Hkv, L] of a streaming head
    selection_error: dict = field(default_factory=dict)  # Selection -> [Hkv, L] (`selection_loss`)


def calibrate(settings: CalibrationSettings, model=None, tokenizer=None, source_name: str | None = None,
              progress: bool = True) -> CalibrationResult:
    """Run calibration and return the plan (pass `model`/`tokenizer` to reuse a loaded model).

    Everything the user gave is checked before weights are loaded: the settings, the data (read, and packed with
    the model's tokenizer) and --seq-len against the model's context (read from its config)."""
    settings.validate()
    started = time.perf_counter()
    docs = read_documents(settings.data) if settings.data else default_corpus()  # missing or empty: fail now
    if model is None:
        check_context("--seq-len", settings.seq_len, model_context(settings.model))
        tokenizer = load_tokenizer(settings.model)
    else:
        check_context("--seq-len", settings.seq_len,
                      getattr(model.config.get_text_config(), "max_position_embeddings", None))
    data = load_calibration_set(tokenizer, settings.data, settings.seq_len, settings.samples, docs)
    retrieval = retrieval_samples(tokenizer, docs, settings.seq_len, settings.retrieval_samples,
                                  settings.query_rows, settings.seed)
    torch.manual_seed(settings.seed)
    if model is None:
        dtype = getattr(torch, settings.dtype) if settings.dtype else None
        model, _, source = load_model(settings.model, settings.device, dtype, settings.device_map)
        source_name = source.name
    rows = sample_rows(settings.seq_len, settings.query_rows)
    head_dim = model_signature(model).head_dim
    problems = [p.layout_error(head_dim) for p in settings.precisions if p.layout_error(head_dim)]
    if problems:
        raise OptionError(f"--precision: {problems[0]}")
    priced = settings.priced_selections
    records = record_calibration(model, data, retrieval, rows, with_keys=bool(settings.precision or priced),
                                 observe=max((s.observation for s in priced), default=0), progress=progress)
    prose = records[:len(data.samples)]  # windows follow ordinary text; options are priced on every sample
    choice = choose_windows(prose, settings.seq_len, settings.sinks, settings.window, settings.window_mass)
    if choice.sinks + choice.window >= settings.seq_len // 2 + 1:
        raise ValueError(f"sinks + window ({choice.sinks} + {choice.window}) leave no distant tokens at the sampled "
                         f"rows of --seq-len {settings.seq_len}; use a longer --seq-len or a smaller --window")
    sel_err = selection_error(records, choice.sinks, priced) if priced else {}
    plan, sim, stream_err, windows, prec_err = _compile(records, choice, settings, model, source_name, data,
                                                        retrieval, rows, sel_err)
    return CalibrationResult(plan, time.perf_counter() - started, sim, choice, stream_err, windows, prec_err, sel_err)


def record_calibration(model, data, retrieval, rows: torch.Tensor, with_keys: bool = False, observe: int = 0,
                       progress: bool = True) -> list:
    """Records of every prose sample (at `rows`) then every retrieval sample (at its own rows); `observe`: also
    the queries of that many positions before each row (to price token selection)."""
    work = [(sample, rows) for sample in data.samples] + [(r.ids, r.rows) for r in retrieval]
    records = []
    with recording(model):
        for ids, sample_rows_ in tqdm(work, desc="calibrating", unit="sample", disable=not progress):
            records.append(record_sample(model, ids[None], sample_rows_, with_keys, observe))
    return records


def _compile(records, choice: WindowChoice, settings: CalibrationSettings, model, source_name, data, retrieval,
             rows, sel_err: dict) -> tuple:
    """(plan, similarity, streaming errors, streaming windows, precision errors) from the recorded samples and the
    chosen windows (`sel_err`: selection's priced losses, `choose_heads`)."""
    cfg = model.config.get_text_config()
    criterion = settings.criterion or METHODS[settings.method].criterion
    span = min(settings.max_group_size, cfg.num_hidden_layers)
    sim = CRITERIA[criterion](records, choice.sinks, choice.window, span)  # [Hkv, L, L]
    target_context = settings.target_context or settings.seq_len
    windows, stream_err = (), None
    if settings.mixed:
        windows = tuple(w for w in STREAMING_WINDOWS if w <= settings.seq_len // 2)
        stream_err = streaming_error(records, choice.sinks, windows)
    prec_err = None
    if settings.precision:
        stream_windows = () if settings.streams_16bit else windows  # streaming heads' bits priced too
        prec_err = precision_error(records, choice.sinks, settings.residual, list(settings.precisions[1:]),
                                   stream_windows)
    signature = model_signature(model, name=source_name)
    settings, (per_head, chosen, precision) = choose_heads(sim, stream_err, windows, settings, target_context,
                                                           choice.sinks, choice.window, prec_err, signature.head_dim,
                                                           sel_err)
    plan = Plan(
        model=signature,
        precision=precision,
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
        calibration=_provenance(settings, model, data, retrieval, rows),
        distance_curve=choice.curve,
        similarity=_banded(sim, span),
    )
    return plan, sim, stream_err, windows, prec_err


def _provenance(settings: CalibrationSettings, model, data, retrieval, rows) -> dict:
    """The plan's calibration section: what the plan was measured on, and with which versions."""
    return {
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
    }


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
    return METHODS[settings.method].threshold


def group_layers(sim: np.ndarray, settings: CalibrationSettings, target_context: int, proximal: int):
    """Blocks per KV head (lists of layer lists) under the settings' method."""
    hkv, n, _ = sim.shape
    mats = [sim.mean(0)] if settings.per_layer else list(sim)
    needed = None
    if settings.target_saving is not None:
        needed = grouping.followers_for_saving(settings.target_saving, n, hkv, target_context, proximal)
    weight = hkv if settings.per_layer else 1
    try:
        out = METHODS[settings.method].group(mats, _threshold(settings), settings, needed, weight)
    except ValueError as exc:
        if needed is None:
            raise
        raise ValueError(f"--target-saving {settings.target_saving} at {target_context} tokens is out of reach: "
                         f"{exc}; raise --max-group-size or lower the target") from None
    return out * hkv if settings.per_layer else out


def plan_blocks(sim: np.ndarray, settings: CalibrationSettings, target_context: int, proximal: int) -> tuple:
    """Per KV head, the plan's `Block`s under the settings' method, each with its weakest similarity."""
    blocks = group_layers(sim, settings, target_context, proximal)
    mats = [sim.mean(0)] * len(sim) if settings.per_layer else sim
    return tuple(blocks_from_layers(b, grouping.blocks_min_similarity(m, b)) for b, m in zip(blocks, mats))


def choose_heads(sim: np.ndarray, stream_err: np.ndarray | None, windows: tuple[int, ...],
                 settings: CalibrationSettings, target_context: int, sinks: int, window: int, prec_err: dict | None,
                 head_dim: int, sel_err: dict) -> tuple[CalibrationSettings, tuple]:
    """(the settings with the token-selection share chosen, `plan_heads` under them). With --choose-keep, the heads
    are chosen at each candidate share with its priced loss (`sel_err` {Selection: [Hkv, L]}), and the share whose
    plan reaches the target with the least total error is kept; the criterion records every share's error."""
    def heads(candidate: CalibrationSettings) -> tuple:
        loss = sel_err[candidate.selection] if candidate.priced_selections else None  # None: selection free
        return plan_heads(sim, stream_err, windows, candidate, target_context, sinks, window, prec_err, head_dim,
                          loss)

    if not settings.choose_keep:
        return settings, heads(settings)
    tried = {}
    for candidate in settings.per_keep:
        try:
            tried[candidate.keep] = candidate, heads(candidate)
        except ValueError:  # out of reach at this share
            continue
    if not tried:
        raise ValueError(f"--target-saving {settings.target_saving} at {target_context} tokens is out of reach at "
                         f"every share of --choose-keep; lower the target or add --precision")
    errors = {keep: chosen["total_error"] for keep, (_, (_, chosen, _)) in tried.items()}
    chosen_settings, (blocks, chosen, precision) = tried[min(errors, key=errors.get)]
    return chosen_settings, (blocks, {**chosen, "keep_choice": errors}, precision)


def plan_heads(sim: np.ndarray, stream_err: np.ndarray | None, windows: tuple[int, ...],
               settings: CalibrationSettings, target_context: int, sinks: int, window: int,
               prec_err: dict | None = None, head_dim: int = 64,
               sel_err: np.ndarray | None = None) -> tuple[tuple, dict, Precision | None]:
    """Per KV head, the plan's blocks under the settings, what to record in the plan's criterion, and the plan's
    precision section (None without --precision).

    With token selection (--keep), every head is priced as selection leaves it: a FULL head already saves what
    selection drops, at the loss `sel_err` [Hkv, L] measured for every layer that selection touches (a shared
    block's anchor and followers; `selection_loss`; None: free, as with --free-selection), so the choices are made
    on what each option saves beyond that, towards the rest of the target. Followers need values for their whole
    window, so with a selection window below it, heads are full or streaming. With --precision, each shared block also
    chooses its bits (`grouping.assign_head`), priced by `prec_err` {name: [Hkv, L]}, and so does each streaming
    head whose window reaches past the residual ({(name, window): [Hkv, L]})."""
    if not settings.mixed:
        return plan_blocks(sim, settings, target_context, sinks + window), {"kinds": [HeadKind.FOLLOWER.label]}, None
    hkv, n, _ = sim.shape
    missing = [name for name in settings.precision if name not in (prec_err or {})]
    if missing:
        raise ValueError(f"this calibration priced no {', '.join(missing)}; calibrate with --precision "
                         f"{','.join(settings.precision)}")
    options, base = _head_options(sim, stream_err, windows, settings, target_context, sinks, window, prec_err,
                                  head_dim, sel_err)
    max_error = settings.max_error
    if max_error is None and settings.target_saving is None:
        max_error = 1.0 - (settings.min_similarity if settings.min_similarity is not None
                           else METHODS[settings.method].threshold)
    size = min(settings.max_group_size, n)
    target = None if settings.target_saving is None else settings.target_saving - base * n * hkv
    try:
        segments, error, saved = grouping.assign_mixed(options, size, target, max_error)
        saved += base * n * hkv
    except ValueError as exc:
        raise ValueError(f"--target-saving {settings.target_saving} at {target_context} tokens is out of reach: "
                         f"{exc}; raise --max-group-size or --max-error, add --precision, or lower the "
                         "target") from None
    allowed = options[0].allowed
    chosen = {"kinds": [k for k in settings.kinds if HeadKind.from_label(k) in allowed],
              "assignment": "lagrangian-dp", "max_error": max_error, "streaming_windows": list(windows),
              **({"precisions": list(options[0].precisions),
                  "streaming_precisions": list(dict.fromkeys(options[0].stream_precisions))}
                 if settings.precision else {}),
              **({"selection_loss": "priced" if sel_err is not None else "free"} if settings.selection else {}),
              "total_error": round(error, 4), "estimated_saving": round(saved, 4)}
    precision = _precision_of_segments(segments, n, settings) if settings.precision else None
    return _blocks_of_segments(sim, segments), chosen, precision


def _head_options(sim: np.ndarray, stream_err: np.ndarray, windows: tuple[int, ...], settings: CalibrationSettings,
                  target_context: int, sinks: int, window: int, prec_err: dict | None,
                  head_dim: int, sel_err: np.ndarray | None = None) -> tuple[list, float]:
    """(what each option of each KV head costs and saves, what token selection alone saves per head), savings as
    shares of the whole dense cache's bytes at `target_context` (`bits.head_bytes`); `sel_err` [Hkv, L]: the loss
    selection adds to every layer of a shared block (None: none)."""
    hkv, n, _ = sim.shape
    selection = settings.selection
    dense = dense_vectors(n, hkv, target_context) * head_dim * 2  # bytes of the whole 16-bit dense cache
    head = dense_vectors(1, 1, target_context) * head_dim * 2  # one dense head

    def saving(spec: HeadSpec, precision: HeadPrecision = FULL_PRECISION) -> float:
        stored = head_bytes(spec, precision, target_context, sinks, head_dim, settings.residual, selection)
        return (head - stored) / dense

    full, follower = HeadSpec(HeadKind.FULL, 0, 0), HeadSpec(HeadKind.FOLLOWER, 0, window)
    base = saving(full)  # what selection alone saves per head
    follower_saving = saving(follower) - base
    precisions = settings.precisions
    streams = [(w, FULL_PRECISION) for w in windows] + [(w, p) for w in windows for p in precisions[1:]
                                                        if (p.name, w) in (prec_err or {})
                                                        and not settings.streams_16bit]
    stream_saving = np.array([saving(HeadSpec(HeadKind.STREAMING, 0, w), p) for w, p in streams]) - base
    anchor_saving = np.array([saving(full, p) for p in precisions]) - base
    values_only = [HeadPrecision(16, p.value_bits, group=p.group) for p in precisions]
    follower_precision_saving = np.array([saving(follower, p) for p in values_only]) - base - follower_saving
    allowed = settings.head_kinds
    if selection is not None and selection.window < window:  # followers need values for their whole window
        allowed -= {HeadKind.FOLLOWER}
    options = []
    for h in range(hkv):
        errors = np.stack([np.zeros(n)] + [prec_err[p.name][h] for p in precisions[1:]])
        stream_errors = np.concatenate([stream_err[h]] + [prec_err[p.name, w][h][:, None] for w, p in
                                                          streams[len(windows):]], axis=1)
        options.append(grouping.HeadOptions(1.0 - sim[h], follower_saving, stream_errors, stream_saving,
                                            tuple(w for w, _ in streams), allowed, tuple(p.name for p in precisions),
                                            errors, anchor_saving, follower_precision_saving,
                                            tuple(p.name for _, p in streams),
                                            None if sel_err is None else sel_err[h]))
    return options, base


def _precision_of_segments(segments, num_layers: int, settings: CalibrationSettings) -> Precision:
    """The plan's precision section: a shared block's anchor at its precision, its followers at its value bits,
    a streaming head at its own."""
    heads = []
    for segs in segments:
        row = [FULL_PRECISION] * num_layers
        for seg in segs:
            p = HeadPrecision.parse(seg.precision)
            row[seg.layers[0]] = p
            for layer in seg.layers[1:]:  # a shared block's followers (a streaming segment has one layer)
                row[layer] = HeadPrecision(16, p.value_bits, group=p.group)
        heads.append(tuple(row))
    return Precision(tuple(heads), settings.residual)


def _blocks_of_segments(sim: np.ndarray, segments) -> tuple:
    """Per KV head, the plan's blocks of a mixed assignment's segments (shared blocks with their weakest
    similarity, and one-layer streaming blocks)."""
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
    return tuple(blocks)


def regroup(result: CalibrationResult, settings: CalibrationSettings, target_context: int) -> Plan:
    """`result`'s plan with its heads chosen again under `settings`. Choosing is the only step that depends on
    the threshold, target or kinds, so the records and option prices of one calibration serve every setting."""
    plan = result.plan
    if settings.mixed and result.streaming_error is None:
        raise ValueError("this calibration priced no streaming options; calibrate with --kinds follower,streaming")
    missing = [s for s in settings.priced_selections if s not in result.selection_error]
    if missing:
        raise ValueError(f"this calibration priced no selection {missing[0]}; calibrate with these --keep and "
                         "--scorer options, or pass --free-selection")
    settings, (blocks, chosen, precision) = choose_heads(result.similarity, result.streaming_error,
                                                         result.streaming_windows, settings, target_context,
                                                         plan.sinks, plan.window, result.precision_error,
                                                         plan.model.head_dim, result.selection_error)
    kept = {k: v for k, v in plan.criterion.items() if k not in MIXED_CRITERION_KEYS}
    criterion = {**kept, **_choice_entries(settings, chosen, target_context)}
    return replace(plan, blocks=blocks, criterion=criterion, selection=settings.selection, precision=precision)


def _banded(sim: np.ndarray, span: int) -> dict:
    """Similarity of each anchor to the next span-1 layers, per KV head, rounded (for `ilc inspect`)."""
    hkv, n, _ = sim.shape
    rows = [[[round(float(sim[h, a, f]), 3) for f in range(a + 1, min(n, a + span))] for a in range(n)]
            for h in range(hkv)]
    return {"span": span, "per_head": rows}

