"""Attach a plan to a model so that plain `model.generate()` runs with a PoD-compressed cache.

`apply_plan` checks the model against the plan, selects the registered ``ilc_pod`` attention function and
installs one forward pre-hook on the model instance. The hook gives every forward that has no cache (or the
empty `DynamicCache` that `generate` builds) a fresh `PoDCache`, refuses a cache built for another plan or mode,
records left padding, and refuses contexts beyond the model's limit. Nothing in transformers is patched and no
state is global or shared: the model gets its own copy of its config before its attention implementation
changes (another model built from the same config object is untouched), two models with two plans work side by
side, and `remove_plan` restores the model.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import AttentionMaskInterface

from .adapter import check_adapter, merge_adapter
from .architectures import check_supported, model_signature, text_config
from .attention import ATTENTION_NAME, pod_attention, pod_mask
from .cache import PoDCache
from .sequence import SEQUENCE_KWARG
from .static_cache import StaticPoDCache
from .plan import Plan, PlanError, check_runtime_options


class QualityWarning(UserWarning):
    """The requested setting is known to give poor outputs (e.g. keys mode on weights that were not adapted)."""


KEYS_MODE_WARNING = ("keys mode (own query on the anchor's keys) needs weights adapted to the plan; on unadapted "
                     "weights the output degenerates (repetition). No adapter is recorded in this plan: use scores "
                     "mode, or adapt the model with `ilc adapt --mode keys` and run the plan it writes.")


def check_cache_options(mode, skip_threshold, kernels) -> None:
    """The runtime options of `apply` and `new_cache`, checked by the plan format's own rule."""
    check_runtime_options(mode, skip_threshold)
    if kernels not in (None, True, False):
        raise PlanError(f"kernels: expected None, True or False, got {kernels!r}")


@dataclass
class AppliedPlan:
    """What `apply_plan` leaves on the model, so that it can be undone."""

    plan: Plan
    previous_attention: str | None
    hook: torch.utils.hooks.RemovableHandle
    mode: str
    skip_threshold: float | None
    kernels: bool | None

    def new_cache(self) -> PoDCache:
        return PoDCache(self.plan, mode=self.mode, skip_threshold=self.skip_threshold, kernels=self.kernels)


def register_attention() -> None:
    """Register the attention and mask functions under one name (idempotent, stateless)."""
    AttentionInterface.register(ATTENTION_NAME, pod_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, pod_mask)


def check_plan_matches(plan: Plan, model, strict: bool = True) -> None:
    """Raise `PlanError` if `model` is not the model the plan was calibrated for."""
    check_supported(model.config)
    sig = model_signature(model)
    want = plan.model
    for field in ("model_type", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim"):
        if getattr(sig, field) != getattr(want, field):
            raise PlanError(f"plan for {want.name!r} does not fit this model: {field} is {getattr(sig, field)}, "
                            f"the plan expects {getattr(want, field)}")
    if sig.config_fingerprint != want.config_fingerprint:
        raise PlanError(f"plan for {want.name!r} does not fit this model: config fingerprint "
                        f"{sig.config_fingerprint} != {want.config_fingerprint}")
    if strict and want.weights_fingerprint and sig.weights_fingerprint != want.weights_fingerprint:
        raise PlanError(f"plan for {want.name!r} was calibrated on other weights (weights fingerprint "
                        f"{sig.weights_fingerprint} != {want.weights_fingerprint}). Calibrate a plan for this "
                        "checkpoint, or pass strict=False to apply it anyway (e.g. to a fine-tune of the same base).")


def apply_plan(plan: Plan, model, *, mode: str | None = None, skip_threshold: float | None = None,
               strict: bool = True, kernels: bool | None = None, adapter=None):
    """Make `model` run with `plan`'s compressed cache; returns `model`. Undo with `remove_plan(model)`.

    mode / skip_threshold override the plan's; strict=False accepts other weights with the same config;
    kernels: None uses the Triton kernels on CUDA and the PyTorch reference elsewhere, True/False forces;
    adapter: the directory (str or Path) `ilc adapt` wrote for an adapted plan, merged into the model's weights
    (in place, once; `remove_plan` leaves the merged weights).
    """
    check_plan_matches(plan, model, strict=strict)
    mode = mode or plan.mode
    check_cache_options(mode, skip_threshold, kernels)
    if plan.adapted is not None and mode != plan.adapted.mode:
        raise PlanError(f"this plan's adapter was trained for {plan.adapted.mode!r} mode; it cannot run {mode!r}")
    to_merge = check_adapter(plan, model, adapter)
    if mode == "keys" and plan.adapted is None:
        warnings.warn(KEYS_MODE_WARNING, QualityWarning, stacklevel=3)
    if getattr(model, "_ilc_applied", None) is not None:
        remove_plan(model)
    register_attention()
    _own_config(model)
    if to_merge is not None:
        merge_adapter(model, adapter, to_merge)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    max_context = getattr(text_config(model.config), "max_position_embeddings", None)
    applied = AppliedPlan(plan, previous, None, mode,
                          plan.skip_threshold if skip_threshold is None else skip_threshold, kernels)

    def before_forward(module, args, kwargs):
        if module.config._attn_implementation != ATTENTION_NAME:
            raise PlanError(f"an ilc plan is applied, but the attention implementation was changed to "
                            f"{module.config._attn_implementation!r}; call ilc.runtime.remove_plan(model) first")
        if kwargs.get(SEQUENCE_KWARG) is not None:  # a whole-sequence forward (training): no cache at all
            return args, _sequence_kwargs(args, kwargs, max_context)
        cache = kwargs.get("past_key_values")
        if cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0):
            cache = applied.new_cache()
            kwargs["past_key_values"] = cache
        elif not isinstance(cache, PoDCache):
            raise PlanError(f"an ilc plan is applied, but the forward got a {type(cache).__name__} that already "
                            "holds tokens; use plan.new_cache(model) or no cache")
        elif cache.plan != applied.plan or cache.state.mode != applied.mode:
            raise PlanError("this PoDCache was built for another plan (or mode) than the one applied to this model; "
                            "use plan.new_cache(model) with the applied plan, or no cache")
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if tokens is None and args:
            tokens = args[0]
        new = tokens.shape[1] if tokens is not None else 0
        if isinstance(cache, StaticPoDCache):
            # No host read of the device token count on a decode step: the cache was sized within the model's
            # context at construction, so only its first forward records padding.
            if not cache.layers[0].is_initialized:
                _record_padding(cache, kwargs.get("attention_mask"), 0)
            return args, kwargs
        seen = cache.get_seq_length()
        if max_context and seen + new > max_context:
            raise PlanError(f"context of {seen + new} tokens exceeds the model's limit of {max_context} "
                            "(max_position_embeddings); nothing was computed")
        _record_padding(cache, kwargs.get("attention_mask"), seen)
        return args, kwargs

    applied.hook = model.register_forward_pre_hook(before_forward, with_kwargs=True)
    model._ilc_applied = applied
    return model


def _sequence_kwargs(args: tuple, kwargs: dict, max_context: int | None) -> dict:
    """Checks of a forward that carries a `SequenceForward`: no cache, unpadded rows within the model's context."""
    if kwargs.get("past_key_values") is not None:
        raise PlanError(f"{SEQUENCE_KWARG}: a whole-sequence forward takes no cache (past_key_values)")
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise PlanError(f"{SEQUENCE_KWARG}: a whole-sequence forward takes unpadded rows only")
    tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    tokens = tokens if tokens is not None or not args else args[0]
    if max_context and tokens is not None and tokens.shape[1] > max_context:
        raise PlanError(f"context of {tokens.shape[1]} tokens exceeds the model's limit of {max_context} "
                        "(max_position_embeddings); nothing was computed")
    return {**kwargs, "use_cache": False}


def _own_config(model) -> None:
    """Give `model` a private copy of its config (every submodule that shared it follows), once, so that changing
    the attention implementation never touches another model built from the same config object."""
    if getattr(model, "_ilc_own_config", None) is model.config:
        return
    old, new = model.config, copy.deepcopy(model.config)
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new
    model._ilc_own_config = new


def remove_plan(model):
    """Undo `apply_plan`: remove the hook and restore the previous attention implementation."""
    applied = getattr(model, "_ilc_applied", None)
    if applied is None:
        return model
    applied.hook.remove()
    model.set_attn_implementation(applied.previous_attention or "sdpa")
    model._ilc_applied = None
    return model


def _record_padding(cache: PoDCache, mask, seen: int) -> None:
    """Left padding -> each row's first real slot. Right padding or holes are refused (never silently wrong)."""
    if mask is None:
        if seen == 0:
            cache.set_row_start(None)
        return
    if mask.ndim != 2:
        raise PlanError("ilc needs a 2-D attention_mask (batch, tokens) of 0/1 values")
    mask = mask.bool()
    if seen == 0:
        row_start = (~mask).long().cumprod(dim=1).sum(dim=1)  # leading zeros per row
        if not bool(mask.long().sum(1).eq(mask.shape[1] - row_start).all()):
            raise PlanError("ilc supports left padding only (padding_side='left'): this attention_mask has zeros "
                            "after real tokens. If you did not pass one, generate() built it from pad_token_id, "
                            "which also occurs inside the prompt; pass attention_mask explicitly")
        cache.set_row_start(row_start)
    elif mask.shape[1] > seen and not bool(mask[:, seen:].all()):
        raise PlanError("ilc supports left padding only: the attention_mask has zeros after the prompt")
