"""The compression plan: the one file the calibration compiler writes and the runtime reads.

A plan says, per KV head, how consecutive layers form blocks. The first layer of a block (its anchor) stores
the keys of distant tokens; the other layers (followers) reuse them and keep only their own proximal keys
(the first ``sinks`` tokens and the last ``window`` tokens). Values are never shared.

The file is versioned YAML (``format: ilc-plan/1``) and is validated on load: every rejection names the field.
This module imports only the standard library, torch-free, plus PyYAML, so serving code stays lean.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

FORMAT = "ilc-plan/1"
MODES = ("scores", "keys")
DEFAULT_REPORT_CONTEXTS = (1024, 4096, 8192, 32768, 131072)


class PlanError(ValueError):
    """A plan file is malformed, or does not fit the model it is applied to."""


@dataclass(frozen=True)
class Block:
    """A run of consecutive layers that share one copy of distant keys for one KV head."""

    layers: tuple[int, ...]
    similarity: float | None = None  # lowest follower-to-anchor similarity under the plan's criterion

    @property
    def anchor(self) -> int:
        return self.layers[0]

    @property
    def followers(self) -> tuple[int, ...]:
        return self.layers[1:]


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
class Plan:
    """A validated compression plan. Build it with `load_plan` or from the compiler; it is immutable."""

    model: ModelSignature
    sinks: int
    window: int
    blocks: tuple[tuple[Block, ...], ...]  # one tuple of blocks per KV head
    mode: str = "scores"
    skip_threshold: float | None = None
    criterion: dict = field(default_factory=dict)  # how the blocks were chosen (method, metric, thresholds)
    calibration: dict = field(default_factory=dict)  # provenance: data digest, tokens, versions, settings
    distance_curve: dict = field(default_factory=dict)  # attention mass by distance, for `ilc inspect`
    similarity: dict = field(default_factory=dict)  # banded similarity matrix per KV head, for `ilc inspect`

    def __post_init__(self):
        _validate(self, source="plan")

    # ---------------------------------------------------------------------------------------------- structure
    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.model.num_kv_heads

    def anchor_of(self, layer: int, kv_head: int) -> int:
        """The layer whose distant keys `layer` uses for `kv_head` (itself when it is an anchor)."""
        for block in self.blocks[kv_head]:
            if layer in block.layers:
                return block.anchor
        raise PlanError(f"layer {layer} is in no block of KV head {kv_head}")

    def anchor_table(self) -> list[list[int]]:
        """anchor_table()[layer][kv_head] -> anchor layer."""
        table = [[0] * self.num_kv_heads for _ in range(self.num_layers)]
        for h, blocks in enumerate(self.blocks):
            for block in blocks:
                for layer in block.layers:
                    table[layer][h] = block.anchor
        return table

    @property
    def heads_agree(self) -> bool:
        return all([b.layers for b in blocks] == [b.layers for b in self.blocks[0]] for blocks in self.blocks)

    @property
    def mean_blocks_per_head(self) -> float:
        return sum(len(b) for b in self.blocks) / len(self.blocks)

    # ------------------------------------------------------------------------------------------------ savings
    def kv_tokens(self, context: int) -> tuple[int, int]:
        """(dense, planned) count of stored K and V head-token vectors for one sequence of `context` tokens.

        Dense stores K and V for every layer and KV head. The plan stores V everywhere, K for every token on
        anchors, and K for only the sinks plus the last `window` tokens on followers (paper section 4.4).
        """
        proximal = min(context, self.sinks + self.window)
        dense = 2 * self.num_layers * self.num_kv_heads * context
        planned = dense
        for blocks in self.blocks:
            followers = sum(len(b.followers) for b in blocks)
            planned -= followers * (context - proximal)
        return dense, planned

    def estimated_saving(self, context: int) -> float:
        """Share of KV-cache bytes saved at `context` tokens (0.0 when the window covers the context)."""
        dense, planned = self.kv_tokens(context)
        return 1.0 - planned / dense

    def kv_bytes(self, context: int, batch: int = 1, dtype_bytes: int = 2) -> tuple[int, int]:
        """(dense, planned) KV bytes for `batch` sequences of `context` tokens at `dtype_bytes` per element."""
        dense, planned = self.kv_tokens(context)
        scale = batch * self.model.head_dim * dtype_bytes
        return dense * scale, planned * scale

    # --------------------------------------------------------------------------------------------- runtime API
    def apply(self, model, **kwargs):
        """Apply this plan to `model` (see `ilc.runtime.apply.apply_plan`); returns the model."""
        from .apply import apply_plan

        return apply_plan(self, model, **kwargs)

    def new_cache(self, model=None, **kwargs):
        """A fresh compressed cache for this plan, to pass as `past_key_values=`."""
        from .cache import PoDCache

        applied = getattr(model, "_ilc_applied", None)
        if applied is not None and applied.plan == self and not kwargs:
            return applied.new_cache()  # the options given to apply() (mode, skip threshold, kernels)
        return PoDCache(self, **kwargs)

    def cache_report(self, cache) -> "CacheReport":  # noqa: F821 - imported lazily
        """Bytes the cache holds against a dense cache of the same tokens, by layer."""
        from .report import cache_report

        return cache_report(cache)

    def with_options(self, **changes) -> "Plan":
        """A copy with some fields replaced (e.g. ``mode="keys"`` or ``window=512``), validated again."""
        from dataclasses import replace

        return replace(self, **changes)

    # ------------------------------------------------------------------------------------------------ file I/O
    def to_dict(self) -> dict:
        blocks = [[_block_to_yaml(b) for b in head] for head in self.blocks]
        block_section: dict[str, Any] = {"all_heads": blocks[0]} if self.heads_agree else {"per_head": blocks}
        if self.heads_agree and len(self.blocks) > 1:  # similarities may differ per head even when layers agree
            sims = [[b.similarity for b in head] for head in self.blocks]
            if any(s != sims[0] for s in sims):
                block_section = {"per_head": blocks}
        return {
            "format": FORMAT,
            "model": asdict(self.model),
            "windows": {"sinks": self.sinks, "window": self.window},
            "sharing": {"mode": self.mode, "skip_threshold": self.skip_threshold, "blocks": block_section},
            "criterion": dict(self.criterion),
            "calibration": dict(self.calibration),
            "estimated_savings": {c: round(self.estimated_saving(c), 4) for c in DEFAULT_REPORT_CONTEXTS},
            "distance_curve": dict(self.distance_curve),
            "similarity": _flow_rows(self.similarity),
        }

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_PlanDumper, sort_keys=False, width=120, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_yaml())
        tmp.replace(path)  # atomic: a failed write never leaves half a plan behind
        return path


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file. Raises `PlanError` naming the offending field."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: no such plan file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: not valid YAML ({exc})") from None
    return plan_from_dict(raw, source=str(path))


def plan_from_dict(raw: Any, source: str = "plan") -> Plan:
    """Build a `Plan` from parsed YAML, checking every field."""
    r = _Reader(raw, source)
    fmt = r.get("format", str)
    if fmt != FORMAT:
        raise PlanError(f"{source}: format: expected {FORMAT!r}, got {fmt!r}")
    m = r.section("model")
    model = ModelSignature(
        name=m.get("name", str),
        architecture=m.get("architecture", str),
        model_type=m.get("model_type", str),
        num_layers=m.get("num_layers", int, minimum=1),
        num_attention_heads=m.get("num_attention_heads", int, minimum=1),
        num_kv_heads=m.get("num_kv_heads", int, minimum=1),
        head_dim=m.get("head_dim", int, minimum=1),
        max_context=m.get("max_context", int, minimum=1),
        config_fingerprint=m.get("config_fingerprint", str),
        weights_fingerprint=m.get("weights_fingerprint", str, optional=True),
    )
    w = r.section("windows")
    sharing = r.section("sharing")
    mode = sharing.get("mode", str)
    skip = sharing.get("skip_threshold", float, optional=True)
    blocks_section = sharing.section("blocks")
    if "all_heads" in blocks_section.raw and "per_head" in blocks_section.raw:
        raise PlanError(f"{source}: sharing.blocks: give either all_heads or per_head, not both")
    if "all_heads" in blocks_section.raw:
        one = _parse_blocks(blocks_section.get("all_heads", list), f"{source}: sharing.blocks.all_heads")
        heads = tuple(one for _ in range(model.num_kv_heads))
    elif "per_head" in blocks_section.raw:
        per = blocks_section.get("per_head", list)
        heads = tuple(_parse_blocks(h, f"{source}: sharing.blocks.per_head[{i}]") for i, h in enumerate(per))
    else:
        raise PlanError(f"{source}: sharing.blocks: missing all_heads or per_head")
    plan_kwargs = dict(
        model=model,
        sinks=w.get("sinks", int, minimum=0),
        window=w.get("window", int, minimum=1),
        blocks=heads,
        mode=mode,
        skip_threshold=skip,
        criterion=r.get("criterion", dict, optional=True) or {},
        calibration=r.get("calibration", dict, optional=True) or {},
        distance_curve=r.get("distance_curve", dict, optional=True) or {},
        similarity=r.get("similarity", dict, optional=True) or {},
    )
    try:
        return Plan(**plan_kwargs)
    except PlanError as exc:
        raise PlanError(str(exc).replace("plan:", f"{source}:", 1)) from None


def config_fingerprint(config) -> str:
    """A digest of the config fields that decide KV-cache shapes and attention numerics."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    keys = (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "vocab_size", "rope_theta", "rope_parameters", "rope_scaling",
        "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    )
    picked = {k: getattr(text, k, None) for k in keys}
    blob = json.dumps(picked, sort_keys=True, default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]


def weights_fingerprint(model) -> str:
    """A cheap digest of a few weight slices: tells a base model from its fine-tune with the same config.

    Slices are rounded to bfloat16 first, so loading the same checkpoint in another dtype gives the same digest.
    """
    import torch

    emb = model.get_input_embeddings().weight
    last = list(model.parameters())[-1]
    h = hashlib.sha256()
    for t in (emb[:8, :64], last.reshape(-1)[:512]):
        h.update(t.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


# -------------------------------------------------------------------------------------------------- validation
def _validate(plan: Plan, source: str) -> None:
    m = plan.model
    if m.num_attention_heads % m.num_kv_heads:
        raise PlanError(f"{source}: model.num_attention_heads ({m.num_attention_heads}) is not a multiple of "
                        f"model.num_kv_heads ({m.num_kv_heads})")
    if plan.mode not in MODES:
        raise PlanError(f"{source}: sharing.mode: expected one of {MODES}, got {plan.mode!r}")
    if plan.skip_threshold is not None and not 0.0 < plan.skip_threshold <= 1.0:
        raise PlanError(f"{source}: sharing.skip_threshold: expected a number in (0, 1], got {plan.skip_threshold}")
    if plan.sinks < 0 or plan.window < 1:
        raise PlanError(f"{source}: windows: sinks must be >= 0 and window >= 1 (got {plan.sinks}, {plan.window})")
    if len(plan.blocks) != m.num_kv_heads:
        raise PlanError(f"{source}: sharing.blocks: {len(plan.blocks)} KV heads given, model has {m.num_kv_heads}")
    for h, blocks in enumerate(plan.blocks):
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
            expected = block.layers[-1] + 1
        if expected != m.num_layers:
            raise PlanError(f"{where}: blocks cover layers 0..{expected - 1}, model has {m.num_layers} layers")


def _parse_blocks(items: Any, where: str) -> tuple[Block, ...]:
    if not isinstance(items, list):
        raise PlanError(f"{where}: expected a list of blocks")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, list):
            layers, sim = item, None
        elif isinstance(item, dict):
            unknown = set(item) - {"layers", "similarity"}
            if unknown:
                raise PlanError(f"{where}[{i}]: unknown keys {sorted(unknown)}")
            layers, sim = item.get("layers"), item.get("similarity")
        else:
            raise PlanError(f"{where}[{i}]: expected a list of layers or {{layers: [...], similarity: x}}")
        if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise PlanError(f"{where}[{i}].layers: expected a list of integers, got {layers!r}")
        if sim is not None and not isinstance(sim, (int, float)):
            raise PlanError(f"{where}[{i}].similarity: expected a number, got {sim!r}")
        out.append(Block(tuple(layers), None if sim is None else float(sim)))
    return tuple(out)


def _flow_rows(similarity: dict) -> dict:
    out = dict(similarity)
    if "per_head" in out:
        out["per_head"] = [[_Flow(row) for row in head] for head in out["per_head"]]
    return out


def _block_to_yaml(block: Block) -> dict:
    item: dict[str, Any] = {"layers": _Flow(block.layers)}
    if block.similarity is not None:
        item["similarity"] = round(float(block.similarity), 4)
    return _FlowDict(item)


class _Reader:
    """Typed access to one mapping of the parsed YAML, with errors that name the field (e.g. ``windows.sinks``)."""

    def __init__(self, raw: Any, source: str, prefix: str = ""):
        if not isinstance(raw, dict):
            raise PlanError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {type(raw).__name__}")
        self.raw, self.source, self.prefix = raw, source, prefix

    def get(self, key: str, kind: type, optional: bool = False, minimum: int | None = None):
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
        return value

    def section(self, key: str) -> "_Reader":
        return _Reader(self.get(key, dict), self.source, f"{self.prefix}{key}.")


class _Flow(tuple):
    """A list written in YAML flow style ([0, 1, 2]) to keep plans compact and readable."""


class _FlowDict(dict):
    """A mapping written in YAML flow style."""


class _PlanDumper(yaml.SafeDumper):
    pass


_PlanDumper.add_representer(_Flow, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", list(v), flow_style=True))
_PlanDumper.add_representer(_FlowDict, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True))
_PlanDumper.add_representer(tuple, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", list(v)))


def blocks_from_layers(groups: Sequence[Sequence[int]], similarities: Iterable[float | None] | None = None) -> tuple[Block, ...]:
    """Blocks for one KV head from lists of layers, e.g. ``[[0], [1, 2, 3], [4, 5]]``."""
    sims = list(similarities) if similarities is not None else [None] * len(groups)
    return tuple(Block(tuple(int(x) for x in g), None if s is None else round(float(s), 4)) for g, s in zip(groups, sims))
