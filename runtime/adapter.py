"""Adapters trained by `ilc adapt`, as serving code loads them: a peft LoRA directory merged into the weights.

`ilc adapt` writes the adapter in peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``) and
a copy of the plan with an ``adapted:`` section naming the adapter's digest. At serving time
`plan.apply(model, adapter=DIR)` merges the adapter into the model's weights (no extra compute per token) and
marks the model's config with the digest (``config.ilc_adapter``); weights saved after merging (`ilc adapt
--merge`) carry the same mark, so loading them is enough. `check_adapter` is the one rule, both ways: an adapted
plan runs only on weights carrying its adapter, and weights carrying an adapter run only its plan.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .heads import short_digest
from .plan import Plan, PlanError

ADAPTER_MARK = "ilc_adapter"  # config attribute: digest of the adapter merged into these weights
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_fingerprint(directory: str | Path) -> str:
    """A digest of the adapter: its configuration (``adapter_config.json`` as parsed, so that an edited scale or
    target list is another adapter) and its tensors (names, dtypes, shapes and bytes), independent of file metadata
    and key order. A file that is missing or cannot be read is a `PlanError` naming it."""
    directory = Path(directory)
    config, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for path in (config, weights):
        if not path.is_file():
            raise PlanError(f"adapter {directory}: no {path.name} (expected the adapter directory `ilc adapt` wrote)")
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"adapter {config}: cannot be read as JSON ({' '.join(str(exc).split())})") from None
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) on a damaged file
        raise PlanError(f"adapter {weights}: cannot be read as safetensors ({' '.join(str(exc).split())})") from None
    h = hashlib.sha256(json.dumps(_canonical(settings), sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return short_digest(h)


def _canonical(value):
    """A configuration with its lists of names sorted: peft writes `target_modules` from a set, in an order that
    changes with Python's hash seed, and the order of module names means nothing."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_canonical(v) for v in value]
        return sorted(items) if all(isinstance(v, str) for v in items) else items
    return value


def carried_adapter(model) -> str | None:
    """Digest of the ilc adapter merged into `model`'s weights, or None."""
    return getattr(model.config, ADAPTER_MARK, None)


def unmerged_lora(model) -> bool:
    """The model holds LoRA layers that are not merged (e.g. a peft model in training)."""
    return any(hasattr(module, "lora_A") for module in model.modules())


def check_adapter(plan: Plan, model, adapter: str | Path | None) -> str | None:
    """Raise `PlanError` unless `plan`, `model` and `adapter` (a directory or None) belong together. Returns the
    adapter's digest when it still has to be merged, else None."""
    carried = carried_adapter(model)
    if unmerged_lora(model):
        raise PlanError("this model holds unmerged LoRA layers; merge them first (peft's merge_and_unload) or pass "
                        "the adapter directory as plan.apply(model, adapter=DIR)")
    if plan.adapted is None:
        if adapter is not None:
            raise PlanError(f"adapter={adapter}: this plan has no adapted: section; pass the plan that `ilc adapt` "
                            "wrote next to the adapter")
        if carried is not None:
            raise PlanError(f"this model carries the ilc adapter {carried}; run the adapted plan `ilc adapt` wrote "
                            "for it, not an unadapted one")
        return None
    want = plan.adapted.adapter
    if adapter is None:
        if carried != want:
            raise PlanError(f"this plan was adapted (adapter {want}) but the model "
                            + (f"carries another adapter ({carried})" if carried else "carries none")
                            + ": pass plan.apply(model, adapter=DIR) with the adapter `ilc adapt` wrote, or load "
                              "the merged weights it wrote (--merge)")
        return None
    got = adapter_fingerprint(adapter)
    if got != want:
        raise PlanError(f"adapter {adapter} ({got}) is not the adapter this plan was adapted with ({want})")
    if carried == want:
        return None  # already merged (applied before, or merged weights loaded)
    if carried is not None:
        raise PlanError(f"this model already carries another ilc adapter ({carried}); load the base weights")
    return got


def merge_adapter(model, adapter: str | Path, fingerprint: str):
    """Merge the LoRA adapter in `adapter` into `model`'s weights in place and mark the config; returns `model`."""
    from peft import PeftModel

    return mark_adapter(PeftModel.from_pretrained(model, str(adapter)).merge_and_unload(), fingerprint)


def mark_adapter(model, fingerprint: str):
    """Record in `model`'s config that its weights carry the adapter `fingerprint` (merged); returns `model`."""
    setattr(model.config, ADAPTER_MARK, fingerprint)
    return model
