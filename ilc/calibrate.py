"""The calibration compiler: model + sample text -> a validated PoD plan.

Steps: pack the text into samples; record sampled-row attention on each (`attention_stats`); choose the
proximal windows (`windows`); build the similarity matrix per KV head under the chosen criterion
(`similarity`); group consecutive layers (`grouping`); write provenance. Same data, settings and seed give a
byte-identical plan.
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
from ilc.runtime.plan import Plan, blocks_from_layers

from . import grouping
from .attention_stats import record_sample, recording, sample_rows
from .data import load_calibration_set
from .models import DEFAULT_MODEL, load_model
from .similarity import CRITERIA
from .windows import WindowChoice, choose_windows

DEFAULT_CRITERION = {"paper": "jsd", "optimal": "output"}
DEFAULT_THRESHOLD = {"paper": 0.5, "optimal": 0.9}  # optimal floor: measured to keep NIAH on SmolLM2


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
    target_context: int | None = None  # default: the model's maximum context
    max_group_size: int = 8
    per_layer: bool = False
    sinks: int | None = None
    window: int | None = None
    window_mass: float = 0.8
    mode: str = "scores"
    device: str = "cpu"
    dtype: str | None = None
    device_map: str | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.method not in grouping.METHODS:
            raise ValueError(f"--method must be one of {grouping.METHODS}, got {self.method!r}")
        if (self.criterion or DEFAULT_CRITERION[self.method]) not in CRITERIA:
            raise ValueError(f"--criterion must be one of {tuple(CRITERIA)}, got {self.criterion!r}")
        if self.target_saving is not None:
            if self.method != "optimal":
                raise ValueError("--target-saving needs --method optimal")
            if not 0 < self.target_saving < 0.5:
                raise ValueError(f"--target-saving must be in (0, 0.5): sharing keys saves at most half the cache, "
                                 f"got {self.target_saving}")
        if self.max_group_size < 1 or self.samples < 1 or self.query_rows < 1:
            raise ValueError("--max-group-size, --samples and --query-rows must be >= 1")
        if self.mode not in ("scores", "keys"):
            raise ValueError(f"--mode must be scores or keys, got {self.mode!r}")


@dataclass
class CalibrationResult:
    plan: Plan
    seconds: float
    similarity: np.ndarray  # [Hkv, L, L] under the plan's criterion
    windows: WindowChoice


def calibrate(settings: CalibrationSettings, model=None, tokenizer=None, source_name: str | None = None,
              progress: bool = True) -> CalibrationResult:
    """Run calibration and return the plan (pass `model`/`tokenizer` to reuse a loaded model)."""
    settings.validate()
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    if model is None:
        dtype = getattr(torch, settings.dtype) if settings.dtype else None
        model, tokenizer, source = load_model(settings.model, settings.device, dtype, settings.device_map)
        source_name = source.name
    cfg = model.config.get_text_config()
    max_context = getattr(cfg, "max_position_embeddings", None)
    if max_context and settings.seq_len > max_context:
        raise ValueError(f"--seq-len {settings.seq_len} exceeds the model's context of {max_context} tokens")
    data = load_calibration_set(tokenizer, settings.data, settings.seq_len, settings.samples)
    rows = sample_rows(settings.seq_len, settings.query_rows)
    records = []
    with recording(model):
        for sample in tqdm(data.samples, desc="calibrating", unit="sample", disable=not progress):
            records.append(record_sample(model, sample[None], rows))
    choice = choose_windows(records, settings.seq_len, settings.sinks, settings.window, settings.window_mass)
    if choice.sinks + choice.window >= settings.seq_len // 2 + 1:
        raise ValueError(f"sinks + window ({choice.sinks} + {choice.window}) leave no distant tokens at the sampled "
                         f"rows of --seq-len {settings.seq_len}; use a longer --seq-len or a smaller --window")
    criterion = settings.criterion or DEFAULT_CRITERION[settings.method]
    span = min(settings.max_group_size, cfg.num_hidden_layers)
    sim = CRITERIA[criterion](records, choice.sinks, choice.window, span)  # [Hkv, L, L]
    target_context = settings.target_context or max_context or settings.seq_len
    per_head = plan_blocks(sim, settings, target_context, choice.sinks + choice.window)
    plan = Plan(
        model=model_signature(model, name=source_name),
        sinks=choice.sinks,
        window=choice.window,
        blocks=per_head,
        mode=settings.mode,
        criterion={
            "method": settings.method,
            "similarity": criterion,
            "min_similarity": _threshold(settings),
            "target_saving": settings.target_saving,
            "target_context": target_context if settings.target_saving else None,
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
    return CalibrationResult(plan, time.perf_counter() - started, sim, choice)


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


def regroup(result: CalibrationResult, settings: CalibrationSettings, target_context: int) -> Plan:
    """`result`'s plan with its layers grouped again under `settings`. Grouping is the only step that depends on
    the threshold or target, so the records and similarity of one calibration serve every setting."""
    plan = result.plan
    return replace(plan, blocks=plan_blocks(result.similarity, settings, target_context, plan.sinks + plan.window))


def _banded(sim: np.ndarray, span: int) -> dict:
    """Similarity of each anchor to the next span-1 layers, per KV head, rounded (for `ilc inspect`)."""
    hkv, n, _ = sim.shape
    rows = [[[round(float(sim[h, a, f]), 3) for f in range(a + 1, min(n, a + span))] for a in range(n)]
            for h in range(hkv)]
    return {"span": span, "per_head": rows}

