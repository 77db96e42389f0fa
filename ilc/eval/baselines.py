"""Baselines that `ilc eval` compares a plan against, all measured on the same prompts, all run by ilc's runtime.

Each is a plan derived from the plan under test, so the same cache, attention and byte accounting serve every
method:
- StreamingLLM: every (layer, KV head) a STREAMING head with the plan's sinks and one window: distant tokens are
  dropped (the token-loss baseline PoD argues against);
- StreamingLLM at equal memory: the window enlarged until the cache holds as many bytes as the plan's;
- uniform blocks: every KV head grouped into fixed shared blocks of 2, 3 or 4 consecutive layers (is
  calibration worth it?);
- token selection alone (our SnapKV): every head FULL with the plan's selection rule, keeping as many distant
  tokens as makes the cache hold the plan's bytes (does sharing add anything to selection?);
- quantization alone (KIVI-style): every head FULL at one precision (e.g. K4cV4), sinks and the residual at 16 bits.
Baselines carry no selection or precision of the plan's own unless they are that baseline, and no adaptation:
they run on the base weights. Equal memory is equal bytes (`Plan.kv_bytes`, scales counted).
"""

from __future__ import annotations

import math
from dataclasses import replace

from ilc.runtime.bits import DEFAULT_RESIDUAL, HeadPrecision, uniform_precision
from ilc.runtime.heads import Selection, dense_vectors
from ilc.runtime.plan import Plan, blocks_from_layers, streaming_block


def streaming_plan(plan: Plan, window: int) -> Plan:
    """StreamingLLM as a plan: the plan's model and sinks, every head streaming with `window`."""
    head = tuple(streaming_block(layer, window) for layer in range(plan.num_layers))
    return replace(plan, blocks=tuple(head for _ in range(plan.num_kv_heads)),
                   criterion={"method": f"streaming-{window}"}, similarity={}, selection=None, adapted=None,
                   precision=None)


def uniform_plan(plan: Plan, size: int) -> Plan:
    """The plan's windows and model, with every KV head grouped into blocks of `size` consecutive layers."""
    groups = [list(range(a, min(plan.num_layers, a + size))) for a in range(0, plan.num_layers, size)]
    return replace(plan, blocks=tuple(blocks_from_layers(groups) for _ in range(plan.num_kv_heads)),
                   criterion={"method": f"uniform-{size}"}, similarity={}, selection=None, adapted=None,
                   precision=None)


def selection_plan(plan: Plan, selection: Selection) -> Plan:
    """Token selection alone: every head FULL (no sharing, no streaming), `selection` at the end of prefill."""
    groups = [[layer] for layer in range(plan.num_layers)]
    return replace(plan, blocks=tuple(blocks_from_layers(groups) for _ in range(plan.num_kv_heads)),
                   criterion={"method": f"selection-{selection.scorer}-{selection.keep:.3f}"}, similarity={},
                   selection=selection, adapted=None, precision=None)


def quantized_plan(plan: Plan, precision: HeadPrecision) -> Plan:
    """Quantization alone: every head FULL at `precision` (groups of at most head_dim elements), the plan's sinks
    and residual (KIVI's 128 without one)."""
    groups = [[layer] for layer in range(plan.num_layers)]
    dense = replace(plan, blocks=tuple(blocks_from_layers(groups) for _ in range(plan.num_kv_heads)),
                    criterion={"method": f"quantized-{precision.name}"}, similarity={}, selection=None, adapted=None,
                    precision=None)
    residual = plan.precision.residual if plan.precision else DEFAULT_RESIDUAL
    precision = replace(precision, group=min(precision.group, plan.model.head_dim))
    return replace(dense, precision=uniform_precision(dense.head_table(), precision, residual))


def _tokens_per_head(plan: Plan, context: int) -> float:
    """The plan's bytes at `context` tokens as 16-bit tokens per (layer, KV head) (K and V each)."""
    per_token = dense_vectors(plan.num_layers, plan.num_kv_heads, 1) * plan.model.head_dim * 2
    return plan.kv_bytes(context)[1] / per_token


def equal_memory_selection(plan: Plan, context: int) -> Selection:
    """The selection-only rule (the plan's scorer and window, else SnapKV's defaults) whose cache holds the plan's
    bytes after a `context`-token prompt."""
    rule = plan.selection or Selection(keep=0.5)
    per_head = _tokens_per_head(plan, context)  # tokens each head may keep
    distant = context - min(context, plan.sinks + rule.window)
    keep = (per_head - plan.sinks - rule.window) / distant if distant > 0 else 0.5
    return replace(rule, keep=min(max(keep, 1e-3), 0.999))


def equal_memory_window(plan: Plan, context: int) -> int:
    """The StreamingLLM window whose cache holds the plan's bytes at `context` tokens."""
    return max(1, min(context, math.floor(_tokens_per_head(plan, context)) - plan.sinks))
