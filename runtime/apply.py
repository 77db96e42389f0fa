"""Attach a plan to a model so that plain `model.generate()` runs with a PoD-compressed cache.

This is the top layer of the runtime and the only one with policy: `apply_plan` checks the model against the
plan, settles the runtime options (mode, skip threshold, kernels, adapter), selects the registered ``ilc_pod``
attention function and installs one forward pre-hook on the model instance; `new_cache` chooses between a growing
`PoDCache` and a preallocated `StaticPoDCache`. `Plan.apply` and `Plan.new_cache` call these two (installed
below). The hook gives every forward that has no cache (or the empty `DynamicCache` that `generate` builds) a
fresh `PoDCache`, refuses a cache built for another plan or mode, records left padding, and refuses contexts
beyond the model's limit. Nothing in transformers is patched and no
state is global or shared: the model gets its own copy of its config before its attention implementation
changes (another model built from the same config object is untouched), two models with two plans work side by
side, and `remove_plan` restores the model.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import AttentionMaskInterface

from .adapter import check_adapter, merge_adapter
from .architectures import check_supported, config_mismatch, model_signature, text_config
from .attention import ATTENTION_NAME, pod_attention, pod_mask
from .cache import PoDCache
from .heads import SCORERS, Mode
from .plan import SERVING, Plan, PlanError, check_runtime_options
from .replay import REPLAY_KWARG, replay_scores
from .report import cache_report
from .sequence import SEQUENCE_KWARG
from .static_cache import StaticPoDCache


class QualityWarning(UserWarning):
    """The requested setting is known to give poor outputs (e.g. keys mode on weights that were not adapted)."""


KEYS_MODE_WARNING = ("keys mode (own query on the anchor's keys) needs weights adapted to the plan; on unadapted "
                     "weights the output degenerates (repetition). No adapter is recorded in this plan: use scores "
                     "mode, or adapt the model with `ilc adapt --mode keys` and run the plan it writes.")


def check_cache_options(mode, skip_threshold, kernels) -> None:
    """The runtime options of `apply` and `new_cache`, checked by the plan format's own rule; kernels=True only
    where the Triton kernels can run (a CUDA GPU, or Triton's CPU interpreter with TRITON_INTERPRET=1)."""
    check_runtime_options(mode, skip_threshold)
    if kernels not in (None, True, False):
        raise PlanError(f"kernels: expected None, True or False, got {kernels!r}")
    if kernels and importlib.util.find_spec("triton") is None:
        raise PlanError("kernels=True: Triton is not installed on this machine; pass kernels=None (the PyTorch "
                        "reference runs off CUDA)")
    if kernels and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise PlanError("kernels=True: no CUDA GPU on this machine (the Triton kernels need one, or TRITON_INTERPRET=1 "
                        "for Triton's slow CPU interpreter); pass kernels=None to use the PyTorch reference")


@dataclass
class AppliedPlan:
    """What `apply_plan` leaves on the model, so that it can be undone."""

    plan: Plan
    previous_attention: str | None
    hook: torch.utils.hooks.RemovableHandle | None
    mode: Mode
    skip_threshold: float | None
    kernels: bool | None
    max_context: int | None = None

    def new_cache(self) -> PoDCache:
        return PoDCache(self.plan, mode=self.mode, skip_threshold=self.skip_threshold, kernels=self.kernels)


def new_cache(plan: Plan, model=None, *, mode: str | None = None, skip_threshold: float | None = None,
              kernels: bool | None = None, max_length: int | None = None) -> PoDCache:
    """A fresh compressed cache for `plan`, to pass as `past_key_values=`. With `model` and no options, the
    options given to `apply()`; a model running another plan is refused. With `max_length`: a `StaticPoDCache`
    preallocated for that many tokens (prompt + new tokens), whose decode step `torch.compile` / CUDA graphs can
    capture; it runs no compute skip, so a skip threshold given here or to `apply()` is refused, not dropped."""
    check_cache_options(plan.mode if mode is None else mode, skip_threshold, kernels)
    applied = getattr(model, "_ilc_applied", None)
    if applied is not None and applied.plan != plan:
        raise PlanError("new_cache: this model runs another plan; build the cache from the applied plan")
    if max_length is not None:
        if skip_threshold is not None or (applied is not None and applied.skip_threshold is not None):
            raise PlanError("new_cache: a static cache (max_length) does not run the compute skip; apply the plan "
                            "with skip_threshold=None, or build a growing cache (no max_length)")
        if applied is not None:  # options not given here are the ones given to apply()
            mode = applied.mode if mode is None else mode
            kernels = applied.kernels if kernels is None else kernels
        return StaticPoDCache(plan, max_length, mode=mode, kernels=kernels)
    if applied is not None and mode is None and skip_threshold is None and kernels is None:
        return applied.new_cache()  # the options given to apply() (mode, skip threshold, kernels)
    return PoDCache(plan, mode=mode, skip_threshold=skip_threshold, kernels=kernels)


def register_attention() -> None:
    """Register the attention and mask functions under one name (idempotent, stateless)."""
    AttentionInterface.register(ATTENTION_NAME, pod_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, pod_mask)


def check_plan_matches(plan: Plan, model, strict: bool = True) -> None:
    """Raise `PlanError` if `model` is not the model the plan was calibrated for."""
    check_supported(model.config)
    want = plan.model
    if (problem := config_mismatch(want, model.config)) is not None:
        raise PlanError(f"plan for {want.name!r} does not fit this model: {problem}")
    sig = model_signature(model)
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
    if strict not in (True, False):
        raise PlanError(f"strict: expected True or False, got {strict!r}")
    check_plan_matches(plan, model, strict=strict)
    mode = plan.mode if mode is None else mode
    check_cache_options(mode, skip_threshold, kernels)
    if plan.adapted is not None and mode != plan.adapted.mode:
        raise PlanError(f"this plan's adapter was trained for {plan.adapted.mode!r} mode; it cannot run {mode!r}")
    to_merge = check_adapter(plan, model, adapter)
    if mode == Mode.KEYS and plan.adapted is None:
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
    applied = AppliedPlan(plan, previous, None, Mode(mode),
                          plan.skip_threshold if skip_threshold is None else skip_threshold, kernels, max_context)
    applied.hook = model.register_forward_pre_hook(PlanHook(applied), with_kwargs=True)
    model._ilc_applied = applied
    return model


@dataclass
class PlanHook:
    """The forward pre-hook `apply_plan` installs: gives each forward the plan's cache and checks what it brings
    (a class, not a closure, so that a planned model pickles)."""

    applied: AppliedPlan

    def __call__(self, module, args, kwargs):
        applied = self.applied
        if module.config._attn_implementation != ATTENTION_NAME:
            raise PlanError(f"an ilc plan is applied, but the attention implementation was changed to "
                            f"{module.config._attn_implementation!r}; call ilc.runtime.remove_plan(model) first")
        if kwargs.get(SEQUENCE_KWARG) is not None:  # a whole-sequence forward (training): no cache at all
            return args, _sequence_kwargs(args, kwargs, applied.max_context)
        if kwargs.get(REPLAY_KWARG) is not None:  # the replay scorer's own forwards (`_replay`), dense cache
            return args, kwargs
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
        new = _new_tokens(args, kwargs)
        if isinstance(cache, StaticPoDCache):
            # No host read of the device token count: the cache was sized within the model's context at
            # construction and counts what forwards bring on the host (not while a compiled graph is traced).
            if not cache.layers[0].is_initialized:
                _record_padding(cache, kwargs.get("attention_mask"), 0)
            if not torch.compiler.is_compiling():
                cache.check_room(new)
            return args, kwargs
        seen = cache.get_seq_length()
        if applied.max_context and seen + new > applied.max_context:
            raise PlanError(f"context of {seen + new} tokens exceeds the model's limit of {applied.max_context} "
                            "(max_position_embeddings); nothing was computed")
        _record_padding(cache, kwargs.get("attention_mask"), seen)
        if seen == 0 and new > 1 and cache.state.selection is not None and SCORERS[cache.state.selection.scorer].replay:
            _replay(module, cache, args, kwargs)
        return args, kwargs


def _replay(model, cache: PoDCache, args: tuple, kwargs: dict) -> None:
    """The replay scorer: score the prompt before the plan's own prefill (`ilc.runtime.replay`)."""
    ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
    if ids is None or ids.is_floating_point():
        raise PlanError("the replay scorer re-reads the prompt's token ids: pass input_ids, not inputs_embeds")
    state = cache.state
    row_start = state.row_starts(ids.shape[0], ids.device)
    state.replay_scores = replay_scores(model, ids, row_start)


def _new_tokens(args: tuple, kwargs: dict) -> int:
    """Tokens a forward brings (input_ids or inputs_embeds, by keyword or first positional argument)."""
    tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if tokens is None and args:
        tokens = args[0]
    return tokens.shape[1] if tokens is not None else 0


def _sequence_kwargs(args: tuple, kwargs: dict, max_context: int | None) -> dict:
    """Checks of a forward that carries a `SequenceForward`: no cache, unpadded rows within the model's context."""
    if kwargs.get("past_key_values") is not None:
        raise PlanError(f"{SEQUENCE_KWARG}: a whole-sequence forward takes no cache (past_key_values)")
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise PlanError(f"{SEQUENCE_KWARG}: a whole-sequence forward takes unpadded rows only")
    new = _new_tokens(args, kwargs)
    if max_context and new > max_context:
        raise PlanError(f"context of {new} tokens exceeds the model's limit of {max_context} "
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


SERVING.install(apply_plan=apply_plan, new_cache=new_cache, cache_report=cache_report)
