"""The compression plan: the one file the calibration compiler writes and the runtime reads.

A plan says, per KV head, how its layers are split into blocks of consecutive layers:
- a *shared* block: its first layer (the anchor) stores the keys of distant tokens; the other layers
  (followers) reuse them and keep only their own proximal keys (the first ``sinks`` tokens and the last
  ``window`` tokens). Values are never shared. A one-layer shared block is a full (dense) head;
- a *streaming* block: each of its layers keeps K and V only for the sinks and its own recent ``window``
  (DuoAttention's streaming heads); distant tokens are dropped for that head.
`head_table()` turns the blocks into one `HeadSpec` per (layer, KV head) (kind full / follower / streaming).
An optional ``selection:`` section (`Selection`) adds SnapKV-style token selection at the end of prefill; an
optional ``adapted:`` section (`Adaptation`, written by `ilc adapt`) says that the plan runs on adapted weights.
An optional ``precision:`` section (`bits.Precision`) stores heads' keys and values as 8/4/2-bit integers beyond
their sinks and a recent residual window; the savings (`kv_bytes`) count those bytes with their scales.

The file is versioned YAML (``format: ilc-plan/2``; ``ilc-plan/1`` files, which have shared blocks only, load
unchanged) and is validated on load: every rejection names the file and the field, and unknown keys are rejected
(with a "did you mean" where one is close). Tools that need to carry data of their own put it under
``extensions:``, a free-form mapping that the loader keeps and the runtime ignores. This module imports only the
standard library, torch-free, plus PyYAML, so serving code stays lean.
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

from .bits import (DEFAULT_GROUP, DEFAULT_RESIDUAL, FULL_PRECISION, HeadPrecision, Precision, head_bytes,
                   stream_layout_error)
from .heads import SCORERS, BlockKind, HeadKind, HeadSpec, Mode, Selection, dense_vectors, stored_vectors

FORMAT = "ilc-plan/2"
READABLE_FORMATS = ("ilc-plan/1", FORMAT)
DEFAULT_REPORT_CONTEXTS = (1024, 4096, 8192, 32768, 131072)
MAX_PLAN_BYTES = 16 << 20  # a plan of a 1000-layer, 1000-head model is a few MB
MAX_TOKENS = (1 << 31) - 1  # contexts, windows, sinks: slots are int32 in the kernels' tables
MAX_LAYERS = MAX_HEADS = 1024  # far above any released model; bounds what a plan file can make the loader build


class PlanError(ValueError):
    """A plan file is malformed, or does not fit the model it is applied to."""


@dataclass(frozen=True)
class Block:
    """A run of consecutive layers of one KV head: shared (one copy of distant keys) or streaming."""

    layers: tuple[int, ...]
    similarity: float | None = None  # shared: lowest follower-to-anchor similarity under the plan's criterion
    kind: BlockKind = BlockKind.SHARED
    window: int | None = None  # streaming: recent window of every layer of the block

    def __post_init__(self):
        if self.kind in tuple(BlockKind):  # a plan-file word becomes the enum; anything else fails validation
            object.__setattr__(self, "kind", BlockKind(self.kind))

    @property
    def anchor(self) -> int:
        return self.layers[0]

    @property
    def followers(self) -> tuple[int, ...]:
        return self.layers[1:] if self.kind == BlockKind.SHARED else ()

    def head_spec(self, layer: int, follower_window: int) -> HeadSpec:
        """What this block's head stores at `layer`: streaming (its own window), the anchor (FULL) or a follower
        (the plan's window, the anchor's distant keys)."""
        if self.kind == BlockKind.STREAMING:
            return HeadSpec(HeadKind.STREAMING, layer, self.window)
        if layer == self.anchor:
            return HeadSpec(HeadKind.FULL, layer, 0)
        return HeadSpec(HeadKind.FOLLOWER, self.anchor, follower_window)


@dataclass(frozen=True)
class ModelSignature:
    """What a plan was calibrated for; `Plan.apply` refuses any model that differs."""

    name: str
    architecture: str
    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    config_fingerprint: str
    weights_fingerprint: str | None = None


@dataclass(frozen=True)
class Adaptation:
    """The ``adapted:`` section: `ilc adapt` trained a LoRA adapter so that the planned model matches the full one.
    `Plan.apply` refuses to run this plan without that adapter, and the adapter without this plan."""

    adapter: str  # digest of the adapter's tensors (`ilc.runtime.adapter.adapter_fingerprint`)
    base_weights: str  # weights fingerprint of the model the adapter was trained on (= model.weights_fingerprint)
    mode: str  # sharing mode trained (scores / keys); the plan's sharing.mode is the same
    tokens: int  # training tokens seen
    steps: int
    rank: int  # LoRA rank
    targets: tuple[str, ...]  # adapted projections (q_proj, ...)
    layers: tuple[int, ...]  # layers whose projections carry the adapter
    loss_initial: float  # distillation loss (KL to the full model) on held-apart samples, before training
    loss_final: float  # the same after training


@dataclass(frozen=True)
class Plan:
    """A validated compression plan. Build it with `load_plan` or from the compiler; it is immutable."""

    model: ModelSignature
    sinks: int
    window: int
    blocks: tuple[tuple[Block, ...], ...]  # one tuple of blocks per KV head
    mode: Mode = Mode.SCORES
    skip_threshold: float | None = None
    criterion: dict = field(default_factory=dict)  # how the blocks were chosen (method, metric, thresholds)
    calibration: dict = field(default_factory=dict)  # provenance: data digest, tokens, versions, settings
    distance_curve: dict = field(default_factory=dict)  # attention mass by distance, for `ilc inspect`
    similarity: dict = field(default_factory=dict)  # banded similarity matrix per KV head, for `ilc inspect`
    extensions: dict = field(default_factory=dict)  # other tools' data, kept as written (`extensions:`)
    selection: Selection | None = None  # token selection at the end of prefill (`selection:`)
    adapted: Adaptation | None = None  # the weights this plan runs on were adapted to it (`adapted:`)
    precision: Precision | None = None  # bits per (layer, KV head) (`precision:`); None: all in the model's dtype

    def __post_init__(self):
        if self.mode in tuple(Mode):  # "scores" / "keys" become the enum; anything else fails validation
            object.__setattr__(self, "mode", Mode(self.mode))
        _validate(self, source="plan")

    # ---------------------------------------------------------------------------------------------- structure
    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.model.num_kv_heads

    def head_table(self) -> tuple[tuple[HeadSpec, ...], ...]:
        """head_table()[layer][kv_head] -> what that head stores (kind, anchor layer, window)."""
        return self._head_table

    @cached_property
    def _head_table(self) -> tuple[tuple[HeadSpec, ...], ...]:  # built once: a plan is immutable
        table = [[None] * self.num_kv_heads for _ in range(self.num_layers)]
        for h, blocks in enumerate(self.blocks):
            for block in blocks:
                for layer in block.layers:
                    table[layer][h] = block.head_spec(layer, self.window)
        return tuple(tuple(row) for row in table)

    def anchor_table(self) -> list[list[int]]:
        """anchor_table()[layer][kv_head] -> the layer whose keys serve distant tokens (itself unless a follower)."""
        return [[spec.anchor for spec in row] for row in self.head_table()]

    def kind_counts(self) -> dict[str, int]:
        """(layer, KV head) pairs per kind: {"full": n, "follower": n, "streaming": n}."""
        counts = {kind.label: 0 for kind in HeadKind}
        for row in self.head_table():
            for spec in row:
                counts[spec.kind.label] += 1
        return counts

    @property
    def quantized(self) -> bool:
        """Some heads store keys or values as integers."""
        return self.precision is not None and self.precision.any_quantized

    def layer_precisions(self, layer: int) -> tuple[HeadPrecision, ...]:
        """layer_precisions(layer)[kv_head] -> that head's bits (16-bit everywhere without ``precision:``)."""
        if self.precision is None:
            return (FULL_PRECISION,) * self.num_kv_heads
        return tuple(self.precision.of(layer, h) for h in range(self.num_kv_heads))

    @property
    def heads_agree(self) -> bool:
        return all([b.layers for b in blocks] == [b.layers for b in self.blocks[0]] for blocks in self.blocks)

    @property
    def mean_blocks_per_head(self) -> float:
        return sum(len(b) for b in self.blocks) / len(self.blocks)

    # ------------------------------------------------------------------------------------------------ savings
    def kv_tokens(self, context: int) -> tuple[int, int]:
        """(dense, planned) count of stored K and V head-token vectors for one sequence of `context` tokens.

        Dense stores K and V for every layer and KV head; the plan what `heads.stored_vectors` says per head
        (followers: V everywhere, K for the sinks and window; streaming: K and V for the sinks and window).
        """
        dense = dense_vectors(self.num_layers, self.num_kv_heads, context)
        planned = sum(stored_vectors(spec, context, self.sinks, self.selection) for row in self.head_table()
                      for spec in row)
        return dense, planned

    def estimated_saving(self, context: int) -> float:
        """Share of a 16-bit dense cache's bytes saved at `context` tokens (0.0 when the window covers the context
        and nothing is quantized)."""
        dense, planned = self.kv_bytes(context)
        return 1.0 - planned / dense

    def kv_bytes(self, context: int, batch: int = 1, dtype_bytes: int = 2) -> tuple[int, int]:
        """(dense, planned) KV bytes for `batch` sequences of `context` tokens, floats at `dtype_bytes` per element
        (quantized heads: integers as stored, scales and minimums at 2 bytes; `bits.head_bytes`)."""
        d = self.model.head_dim
        dense = self.kv_tokens(context)[0] * d * dtype_bytes
        residual = self.precision.residual if self.precision else DEFAULT_RESIDUAL
        planned = sum(head_bytes(spec, precision, context, self.sinks, d, residual, self.selection, dtype_bytes)
                      for layer, row in enumerate(self.head_table())
                      for spec, precision in zip(row, self.layer_precisions(layer)))
        return batch * dense, batch * planned

    # ------------------------------------------------------------------------------------------ conveniences
    def apply(self, model, **options):
        """Apply this plan to `model` (`ilc.runtime.apply.apply_plan`); returns the model."""
        return SERVING.call("apply_plan")(self, model, **options)

    def new_cache(self, model=None, **options):
        """A fresh compressed cache for this plan, to pass as `past_key_values=` (`ilc.runtime.apply.new_cache`)."""
        return SERVING.call("new_cache")(self, model, **options)

    def cache_report(self, cache):
        """Bytes the cache holds against a dense cache of the same tokens (`ilc.runtime.report.cache_report`)."""
        return SERVING.call("cache_report")(cache)

    def with_options(self, **changes) -> "Plan":
        """A copy with some fields replaced (e.g. ``mode="keys"`` or ``window=512``), validated again."""
        return replace(self, **changes)

    # ------------------------------------------------------------------------------------------------ file I/O
    def to_dict(self) -> dict:
        blocks = [[_block_to_yaml(b) for b in head] for head in self.blocks]
        same = all(head == self.blocks[0] for head in self.blocks)  # layers, kinds, windows and similarities
        block_section: dict[str, Any] = {"all_heads": blocks[0]} if same else {"per_head": blocks}
        return {
            "format": FORMAT,
            "model": asdict(self.model),
            "windows": {"sinks": self.sinks, "window": self.window},
            "sharing": {"mode": self.mode.value, "skip_threshold": self.skip_threshold, "blocks": block_section},
            **({"selection": asdict(self.selection)} if self.selection else {}),
            **({"adapted": _adaptation_to_yaml(self.adapted)} if self.adapted else {}),
            **({"precision": _precision_to_yaml(self.precision)} if self.precision else {}),
            "criterion": dict(self.criterion),
            "calibration": dict(self.calibration),
            "estimated_savings": {c: round(self.estimated_saving(c), 4) for c in DEFAULT_REPORT_CONTEXTS},
            "distance_curve": dict(self.distance_curve),
            "similarity": _flow_rows(self.similarity),
            **({"extensions": dict(self.extensions)} if self.extensions else {}),
        }

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_PlanDumper, sort_keys=False, width=120, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        """Write the plan atomically: through a temporary file of a unique name in the target folder, renamed over
        `path` once complete (a failed write leaves neither half a plan nor a stray file; no other file is touched)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_yaml())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


@dataclass
class Serving:
    """The functions behind `Plan.apply / new_cache / cache_report`. They live in the layers above this module
    (`ilc.runtime.apply`, `ilc.runtime.report`), which fill this table when the package is imported (importing
    any `ilc.runtime` module imports the package first), so this module imports nothing above it."""

    functions: dict[str, Callable] = field(default_factory=dict)

    def install(self, **functions: Callable) -> None:
        self.functions.update(functions)

    def call(self, name: str) -> Callable:
        return self.functions[name]


SERVING = Serving()


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file. Raises `PlanError` naming the file and the offending field."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: no such plan file")
    try:
        if path.stat().st_size > MAX_PLAN_BYTES:
            raise PlanError(f"{path}: {path.stat().st_size} bytes is not a plan (plans are at most "
                            f"{MAX_PLAN_BYTES >> 20} MiB)")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise PlanError(f"{path}: not a plan (not UTF-8 text; a binary file?)") from None
    except OSError as exc:
        raise PlanError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return plan_from_dict(parse_yaml(text, str(path)), source=str(path))


def parse_yaml(text: str, source: str) -> Any:
    """Plan YAML as a person means it: YAML 1.2 scalars (``0656`` is 656, ``yes`` is a string; YAML 1.1 would read
    octal, base-60 and yes/no booleans), no duplicate keys, no aliases (a 9 KB alias bomb expands to gigabytes)."""
    try:
        return yaml.load(text, Loader=_PlanLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PlanError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise PlanError(f"{source}: not a plan (YAML nested too deeply)") from None


TOP_LEVEL_KEYS = ("format", "model", "windows", "sharing", "selection", "adapted", "precision", "criterion",
                  "calibration",
                  "estimated_savings", "distance_curve", "similarity", "extensions")


def plan_from_dict(raw: Any, source: str = "plan") -> Plan:
    """Build a `Plan` from parsed YAML, checking every field."""
    r = _Reader(raw, source)
    fmt = r.get("format", str)
    if fmt not in READABLE_FORMATS:
        raise PlanError(f"{source}: format: expected one of {READABLE_FORMATS}, got {fmt!r}")
    r.only(TOP_LEVEL_KEYS)
    m = r.section("model")
    m.only([f.name for f in fields(ModelSignature)])
    model = ModelSignature(
        name=m.get("name", str),
        architecture=m.get("architecture", str),
        model_type=m.get("model_type", str),
        num_layers=m.get("num_layers", int, minimum=1, maximum=MAX_LAYERS),
        num_attention_heads=m.get("num_attention_heads", int, minimum=1, maximum=MAX_HEADS),
        num_kv_heads=m.get("num_kv_heads", int, minimum=1, maximum=MAX_HEADS),
        head_dim=m.get("head_dim", int, minimum=1, maximum=MAX_HEADS),
        max_context=m.get("max_context", int, minimum=1, maximum=MAX_TOKENS),
        config_fingerprint=m.get("config_fingerprint", str),
        weights_fingerprint=m.get("weights_fingerprint", str, optional=True),
    )
    w = r.section("windows")
    w.only(("sinks", "window"))
    sharing = r.section("sharing")
    sharing.only(("mode", "skip_threshold", "blocks"))
    mode = sharing.get("mode", str)
    skip = sharing.get("skip_threshold", float, optional=True)
    blocks_section = sharing.section("blocks")
    blocks_section.only(("all_heads", "per_head"))
    if "all_heads" in blocks_section.raw and "per_head" in blocks_section.raw:
        raise PlanError(f"{source}: sharing.blocks: give either all_heads or per_head, not both")
    streaming_ok = fmt != "ilc-plan/1"
    if "all_heads" in blocks_section.raw:
        one = _parse_blocks(blocks_section.get("all_heads", list), f"{source}: sharing.blocks.all_heads", streaming_ok)
        heads = tuple(one for _ in range(model.num_kv_heads))
    elif "per_head" in blocks_section.raw:
        per = blocks_section.get("per_head", list)
        heads = tuple(_parse_blocks(h, f"{source}: sharing.blocks.per_head[{i}]", streaming_ok)
                      for i, h in enumerate(per))
    else:
        raise PlanError(f"{source}: sharing.blocks: missing all_heads or per_head")
    selection = None
    if "selection" in r.raw:
        if fmt == "ilc-plan/1":
            raise PlanError(f"{source}: selection: not part of format ilc-plan/1 (write format: {FORMAT})")
        sel = r.section("selection")
        sel.only([f.name for f in fields(Selection)])
        types = {"scorer": str, "window": int, "pool": int}  # optional: Selection's defaults where absent
        selection = Selection(keep=sel.get("keep", float),
                              **{k: sel.get(k, t) for k, t in types.items() if sel.raw.get(k) is not None})
    adapted = _parse_adaptation(r.section("adapted"), fmt) if "adapted" in r.raw else None
    precision = _parse_precision(r.section("precision"), fmt, model) if "precision" in r.raw else None
    plan_kwargs = dict(
        model=model,
        selection=selection,
        adapted=adapted,
        precision=precision,
        sinks=w.get("sinks", int, minimum=0),
        window=w.get("window", int, minimum=1),
        blocks=heads,
        mode=mode,
        skip_threshold=skip,
        criterion=r.get("criterion", dict, optional=True) or {},
        calibration=r.get("calibration", dict, optional=True) or {},
        distance_curve=r.get("distance_curve", dict, optional=True) or {},
        similarity=r.get("similarity", dict, optional=True) or {},
        extensions=r.get("extensions", dict, optional=True) or {},
    )
    try:
        return Plan(**plan_kwargs)
    except PlanError as exc:
        raise PlanError(str(exc).replace("plan:", f"{source}:", 1)) from None


def _parse_adaptation(a: "_Reader", fmt: str) -> Adaptation:
    if fmt == "ilc-plan/1":
        raise PlanError(f"{a.source}: adapted: not part of format ilc-plan/1 (write format: {FORMAT})")
    a.only([f.name for f in fields(Adaptation)])
    targets, layers = tuple(a.get("targets", list)), tuple(a.get("layers", list))
    if not all(isinstance(t, str) for t in targets) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                               for x in layers):
        raise PlanError(f"{a.source}: adapted.targets / adapted.layers: expected lists of names / layer numbers")
    return Adaptation(adapter=a.get("adapter", str), base_weights=a.get("base_weights", str), mode=a.get("mode", str),
                      tokens=a.get("tokens", int, minimum=0), steps=a.get("steps", int, minimum=0),
                      rank=a.get("rank", int, minimum=1), targets=targets, layers=layers,
                      loss_initial=a.get("loss_initial", float), loss_final=a.get("loss_final", float))


def _parse_precision(p: "_Reader", fmt: str, model: ModelSignature) -> Precision:
    """The ``precision:`` section: residual, group, and K<bits>[c]V<bits> names per KV head (``per_head``, one
    list of layers per head) or for every head alike (``all_heads``)."""
    if fmt == "ilc-plan/1":
        raise PlanError(f"{p.source}: precision: not part of format ilc-plan/1 (write format: {FORMAT})")
    p.only(("residual", "group", "all_heads", "per_head"))
    residual = p.get("residual", int, optional=True, minimum=0, maximum=model.max_context)
    group = p.get("group", int, optional=True, minimum=1, maximum=MAX_HEADS)
    residual = DEFAULT_RESIDUAL if residual is None else residual
    group = DEFAULT_GROUP if group is None else group
    if ("all_heads" in p.raw) == ("per_head" in p.raw):
        raise PlanError(f"{p.source}: precision: give either all_heads or per_head (one list of names per layer)")

    def row(names, where: str) -> tuple[HeadPrecision, ...]:
        if not isinstance(names, list) or len(names) > MAX_LAYERS:
            raise PlanError(f"{p.source}: {where}: expected a list of precisions, one per layer")
        try:
            return tuple(HeadPrecision.parse(n, group) for n in names)
        except ValueError as exc:
            raise PlanError(f"{p.source}: {where}: {exc}") from None

    if "all_heads" in p.raw:
        one = row(p.get("all_heads", list), "precision.all_heads")
        heads = tuple(one for _ in range(model.num_kv_heads))
    else:
        per = p.get("per_head", list)
        if len(per) > MAX_HEADS:
            raise PlanError(f"{p.source}: precision.per_head: {len(per)} heads given")
        heads = tuple(row(names, f"precision.per_head[{i}]") for i, names in enumerate(per))
    return Precision(heads, residual)


def _precision_to_yaml(p: Precision) -> dict:
    names = [_Flow(x.name for x in head) for head in p.heads]
    same = all(head == p.heads[0] for head in p.heads)
    return {"residual": p.residual, "group": p.group,
            **({"all_heads": names[0]} if same else {"per_head": names})}


def _validate_precision(plan: Plan, where: str) -> None:
    p, m = plan.precision, plan.model
    if not isinstance(p, Precision):
        raise PlanError(f"{where.rstrip('.')}: expected a Precision, got {type(p).__name__}")
    if len(p.heads) != m.num_kv_heads or any(len(head) != m.num_layers for head in p.heads):
        raise PlanError(f"{where}per_head: expected {m.num_kv_heads} KV heads of {m.num_layers} layers each, got "
                        f"{len(p.heads)} heads of {sorted({len(h) for h in p.heads})} layers")
    for layer, row in enumerate(plan.head_table()):
        for h, spec in enumerate(row):
            x = p.of(layer, h)
            problem = stream_layout_error(x, spec.window, p.residual) if spec.kind == HeadKind.STREAMING else None
            if problem:
                raise PlanError(f"{where}per_head[{h}][{layer}]: {problem}")
            if spec.kind == HeadKind.FOLLOWER and x.key_bits < 16:
                raise PlanError(f"{where}per_head[{h}][{layer}]: {x.name} on a follower; a follower's keys are its "
                                "anchor's, only its values can be quantized (K16V<bits>)")
            problem = x.layout_error(m.head_dim)
            if problem:
                raise PlanError(f"{where}per_head[{h}][{layer}]: {problem}")


def _adaptation_to_yaml(a: Adaptation) -> dict:
    out = asdict(a)
    out["targets"], out["layers"] = _Flow(a.targets), _Flow(a.layers)
    out["loss_initial"], out["loss_final"] = round(a.loss_initial, 6), round(a.loss_final, 6)
    return out


# -------------------------------------------------------------------------------------------------- validation
MODES = tuple(m.value for m in Mode)  # the plan-file words of `Mode`, for messages and CLI choices


def check_runtime_options(mode, skip_threshold, where: str = "") -> None:
    """The one rule for `mode` and `skip_threshold`, in a plan file and in `apply(...)` alike."""
    if mode not in MODES:
        raise PlanError(f"{where}mode: expected one of {MODES}, got {mode!r}")
    if skip_threshold is not None and (isinstance(skip_threshold, bool) or not isinstance(skip_threshold, (int, float))
                                       or not 0.0 < skip_threshold <= 1.0):
        raise PlanError(f"{where}skip_threshold: expected a number in (0, 1], got {skip_threshold!r}")


def _validate(plan: Plan, source: str) -> None:
    m = plan.model
    _validate_bounds(plan, source)
    if m.num_attention_heads % m.num_kv_heads:
        raise PlanError(f"{source}: model.num_attention_heads ({m.num_attention_heads}) is not a multiple of "
                        f"model.num_kv_heads ({m.num_kv_heads})")
    check_runtime_options(plan.mode, plan.skip_threshold, f"{source}: sharing.")
    if plan.sinks < 0 or plan.window < 1:
        raise PlanError(f"{source}: windows: sinks must be >= 0 and window >= 1 (got {plan.sinks}, {plan.window})")
    if plan.selection is not None:
        _validate_selection(plan, f"{source}: selection.")
    if plan.adapted is not None:
        _validate_adaptation(plan, f"{source}: adapted.")
    if plan.precision is not None:
        _validate_precision(plan, f"{source}: precision.")
    if len(plan.blocks) != m.num_kv_heads:
        raise PlanError(f"{source}: sharing.blocks: {len(plan.blocks)} KV heads given, model has {m.num_kv_heads}")
    checked = set()  # heads that share one tuple of blocks (the all_heads form) are checked once
    for h, blocks in enumerate(plan.blocks):
        if id(blocks) in checked:
            continue
        checked.add(id(blocks))
        where = f"{source}: sharing.blocks (KV head {h})"
        expected = 0
        for block in blocks:
            if not block.layers:
                raise PlanError(f"{where}: empty block")
            if list(block.layers) != list(range(block.layers[0], block.layers[0] + len(block.layers))):
                raise PlanError(f"{where}: block {list(block.layers)} is not a run of consecutive layers")
            if block.layers[0] != expected:
                raise PlanError(f"{where}: block {list(block.layers)} should start at layer {expected} "
                                "(blocks must cover every layer once, in order)")
            if block.similarity is not None and not -1e-6 <= block.similarity <= 1 + 1e-6:
                raise PlanError(f"{where}: block {list(block.layers)}: similarity {block.similarity} is not in [0, 1]")
            if block.kind not in tuple(BlockKind):
                raise PlanError(f"{where}: block {list(block.layers)}: kind: expected one of {BLOCK_KINDS}, "
                                f"got {block.kind!r}")
            if block.kind == BlockKind.STREAMING and (not isinstance(block.window, int) or block.window < 1):
                raise PlanError(f"{where}: block {list(block.layers)}: window: a streaming block needs a window "
                                f">= 1, got {block.window!r}")
            if block.kind == BlockKind.STREAMING and block.window > m.max_context:
                raise PlanError(f"{where}: block {list(block.layers)}: window {block.window} exceeds the model's "
                                f"context of {m.max_context} tokens (model.max_context)")
            if block.kind == BlockKind.SHARED and block.window is not None:
                raise PlanError(f"{where}: block {list(block.layers)}: window: only streaming blocks have their own "
                                "window (followers use windows.window)")
            expected = block.layers[-1] + 1
        if expected != m.num_layers:
            raise PlanError(f"{where}: blocks cover layers 0..{expected - 1}, model has {m.num_layers} layers")


BLOCK_KINDS = tuple(k.value for k in BlockKind)


def _validate_bounds(plan: Plan, source: str) -> None:
    """Sizes a plan file states are bounded by what a model can hold, before anything is built from them."""
    m = plan.model
    if not isinstance(m, ModelSignature):
        raise PlanError(f"{source}: model: expected a ModelSignature, got {type(m).__name__}")
    for name, value in (("windows.sinks", plan.sinks), ("windows.window", plan.window)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise PlanError(f"{source}: {name}: expected int, got {value!r}")
    if plan.selection is not None and not isinstance(plan.selection, Selection):
        raise PlanError(f"{source}: selection: expected a Selection, got {type(plan.selection).__name__}")
    for name, value, limit in (("model.num_layers", m.num_layers, MAX_LAYERS),
                               ("model.num_attention_heads", m.num_attention_heads, MAX_HEADS),
                               ("model.num_kv_heads", m.num_kv_heads, m.num_attention_heads),
                               ("model.max_context", m.max_context, MAX_TOKENS),
                               ("windows.window", plan.window, m.max_context),
                               ("windows.sinks", plan.sinks, m.max_context)):
        if value > limit:
            raise PlanError(f"{source}: {name}: {value} exceeds {limit}"
                            + (" (model.max_context)" if limit == m.max_context else ""))


def _validate_selection(plan: Plan, where: str) -> None:
    sel = plan.selection
    if not 0.0 < sel.keep < 1.0:
        raise PlanError(f"{where}keep: the share of distant tokens kept must be in (0, 1), got {sel.keep!r}")
    if sel.scorer not in SCORERS:
        raise PlanError(f"{where}scorer: expected one of {tuple(SCORERS)}, got {sel.scorer!r}")
    if sel.window < 1 or sel.pool < 1 or sel.pool % 2 == 0:
        raise PlanError(f"{where}window must be >= 1 and pool an odd number >= 1 (got {sel.window}, {sel.pool})")
    if max(sel.window, sel.pool) > plan.model.max_context:
        raise PlanError(f"{where}window {sel.window} / pool {sel.pool}: at most the model's context of "
                        f"{plan.model.max_context} tokens (model.max_context)")
    if plan.kind_counts()["follower"] and sel.window < plan.window:
        raise PlanError(f"{where}window {sel.window} is below windows.window {plan.window}: followers need the values "
                        "of their whole proximal window, so selection must keep at least that many recent tokens")


def _validate_adaptation(plan: Plan, where: str) -> None:
    a = plan.adapted
    if a.mode != plan.mode:
        raise PlanError(f"{where}mode: the adapter was trained for {a.mode!r} mode, the plan runs {plan.mode!r}")
    if plan.model.weights_fingerprint and a.base_weights != plan.model.weights_fingerprint:
        raise PlanError(f"{where}base_weights {a.base_weights} is not the plan's model.weights_fingerprint "
                        f"{plan.model.weights_fingerprint}")
    bad = [x for x in a.layers if not 0 <= x < plan.num_layers]
    if bad or not a.targets:
        raise PlanError(f"{where}layers {list(a.layers)} / targets {list(a.targets)}: layers must exist "
                        f"(0..{plan.num_layers - 1}) and targets be named")


def _parse_blocks(items: Any, where: str, streaming_ok: bool = True) -> tuple[Block, ...]:
    if not isinstance(items, list):
        raise PlanError(f"{where}: expected a list of blocks")
    allowed = {"layers", "similarity", "kind", "window"} if streaming_ok else {"layers", "similarity"}
    out = []
    for i, item in enumerate(items):
        if isinstance(item, list):
            item = {"layers": item}
        elif not isinstance(item, dict):
            raise PlanError(f"{where}[{i}]: expected a list of layers or {{layers: [...], similarity: x}}")
        unknown = set(item) - allowed
        if unknown:
            raise PlanError(f"{where}[{i}]: unknown keys {sorted(unknown)}{_did_you_mean(unknown, allowed)} "
                            f"(allowed: {sorted(allowed)})")
        layers, sim = item.get("layers"), item.get("similarity")
        kind, window = item.get("kind", BlockKind.SHARED.value), item.get("window")
        if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise PlanError(f"{where}[{i}].layers: expected a list of integers, got {layers!r}")
        if sim is not None and (not isinstance(sim, (int, float)) or isinstance(sim, bool)):
            raise PlanError(f"{where}[{i}].similarity: expected a number, got {sim!r}")
        if kind not in BLOCK_KINDS:
            raise PlanError(f"{where}[{i}].kind: expected one of {BLOCK_KINDS}, got {kind!r}")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool)):
            raise PlanError(f"{where}[{i}].window: expected an integer, got {window!r}")
        out.append(Block(tuple(layers), None if sim is None else float(sim), kind, window))
    return tuple(out)


def _flow_rows(similarity: dict) -> dict:
    out = dict(similarity)
    if "per_head" in out:
        out["per_head"] = [[_Flow(row) for row in head] for head in out["per_head"]]
    return out


def _block_to_yaml(block: Block) -> dict:
    item: dict[str, Any] = {"layers": _Flow(block.layers)}
    if block.kind != BlockKind.SHARED:
        item["kind"] = block.kind.value
        item["window"] = int(block.window)
    if block.similarity is not None:
        item["similarity"] = round(float(block.similarity), 4)
    return _FlowDict(item)


class _Reader:
    """Typed access to one mapping of the parsed YAML, with errors that name the field (e.g. ``windows.sinks``)."""

    def __init__(self, raw: Any, source: str, prefix: str = ""):
        if not isinstance(raw, dict):
            raise PlanError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {type(raw).__name__}")
        self.raw, self.source, self.prefix = raw, source, prefix

    def get(self, key: str, kind: type, optional: bool = False, minimum: int | None = None,
            maximum: int | None = None):
        name = f"{self.source}: {self.prefix}{key}"
        if key not in self.raw or self.raw[key] is None:
            if optional:
                return None
            raise PlanError(f"{name}: missing")
        value = self.raw[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise PlanError(f"{name}: expected {kind.__name__}, got {value!r}")
        if minimum is not None and value < minimum:
            raise PlanError(f"{name}: must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise PlanError(f"{name}: must be <= {maximum}, got {value}")
        return value

    def section(self, key: str) -> "_Reader":
        return _Reader(self.get(key, dict), self.source, f"{self.prefix}{key}.")

    def only(self, allowed) -> None:
        """Reject keys other than `allowed` (a typo is never silently ignored)."""
        unknown = [k for k in self.raw if k not in allowed]
        if unknown:
            where = self.prefix.rstrip(".") or "top level"
            raise PlanError(f"{self.source}: {where}: unknown key {', '.join(map(repr, unknown))}"
                            f"{_did_you_mean(unknown, allowed)}; data of other tools goes under 'extensions:'")


def _did_you_mean(unknown, allowed) -> str:
    close = [m for k in unknown for m in difflib.get_close_matches(str(k), list(allowed), n=1, cutoff=0.75)]
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


class _PlanLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema scalars, duplicate keys refused and aliases refused."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} is not allowed in a plan",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise yaml.constructor.ConstructorError(None, None, f"a key must be a name or a number, got "
                                                        f"{type(key).__name__}", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.2 core schema for bool, int and float (null and strings as PyYAML reads them)
_PlanLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern, _first in (
        ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
        ("tag:yaml.org,2002:float",
         r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
         "-+.0123456789")):
    _PlanLoader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))
_PlanLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: _yaml12_int(loader.construct_scalar(node)))


def _yaml12_int(text: str) -> int:
    """A YAML 1.2 integer: decimal (leading zeros are decimal), 0o octal or 0x hex."""
    sign, body = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    base = 16 if body.startswith("0x") else 8 if body.startswith("0o") else 10
    return sign * int(body[2:] if base != 10 else body, base)


class _Flow(tuple):
    """A list written in YAML flow style ([0, 1, 2]) to keep plans compact and readable."""


class _FlowDict(dict):
    """A mapping written in YAML flow style."""


class _PlanDumper(yaml.SafeDumper):
    pass


_PlanDumper.add_representer(_Flow, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", list(v), flow_style=True))
_PlanDumper.add_representer(_FlowDict, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True))
_PlanDumper.add_representer(tuple, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", list(v)))
for _word in (Mode, BlockKind):  # the vocabulary's enums are written as their plan-file words
    _PlanDumper.add_representer(_word, lambda d, v: d.represent_str(v.value))


def blocks_from_layers(groups: Sequence[Sequence[int]], similarities: Iterable[float | None] | None = None) -> tuple[Block, ...]:
    """Shared blocks for one KV head from lists of layers, e.g. ``[[0], [1, 2, 3], [4, 5]]``."""
    sims = list(similarities) if similarities is not None else [None] * len(groups)
    return tuple(Block(tuple(int(x) for x in g), None if s is None else round(float(s), 4)) for g, s in zip(groups, sims))


def streaming_block(layer: int, window: int) -> Block:
    """A one-layer streaming block: that layer keeps K and V for the sinks and its last `window` tokens only."""
    return Block((int(layer),), None, BlockKind.STREAMING, int(window))
