"""The attention function registered with transformers for PoD-compressed caches: a small dispatcher.

`pod_attention` receives what the cache's `update` returned and sends it down one path:
- a whole-sequence forward without a cache (training, `ilc.runtime.sequence`);
- the replay scorer's dense forwards (`ilc.runtime.replay`);
- a decode step over a `StaticPoDCache` (`StaticStep`): the Triton decode kernel reading the slot count on the
  device (`kernel_dispatch.static_decode_triton`) or `reference.static_decode`;
- an update of a growing `PoDCache` (`PoDKeys`): the Triton kernels (`kernel_dispatch`, on CUDA or with
  kernels=True; not for token selection nor followers of quantized anchors) or the PyTorch reference (`reference.reference_attention`).
Around the call it keeps what later layers need: an anchor's query for its scores-mode followers (dropped after
its last reader), and the last prompt queries that token selection scores with. The rule itself is stated in
`ilc.runtime.reference`.
"""

from __future__ import annotations

import math

import torch

from .cache import CacheState, PoDKeys
from .heads import Mode
from .kernel_dispatch import pod_attention_triton, prepare_static, static_decode_triton
from .reference import reference_attention, static_decode
from .replay import REPLAY_KWARG, replay_attention
from .sequence import SEQUENCE_KWARG, sequence_attention
from .static_cache import StaticPoDLayer, StaticStep

ATTENTION_NAME = "ilc_pod"


def pod_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: returns ([B, q, Hq, D], None)."""
    if dropout:
        raise RuntimeError("ilc's PoD attention does not support attention dropout")
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    recorder = kwargs.get(REPLAY_KWARG)
    if recorder is not None:  # the replay scorer re-reading the prompt over a dense cache (`replay`)
        return replay_attention(module.layer_idx, query, key, value, scaling, recorder).transpose(1, 2), None
    sequence = kwargs.get(SEQUENCE_KWARG)
    if sequence is not None:  # a whole-sequence forward without a cache (training: `ilc.runtime.sequence`)
        return sequence_attention(module.layer_idx, query, key, value, scaling, sequence).transpose(1, 2), None
    if not isinstance(key, (PoDKeys, StaticStep)):
        raise RuntimeError(
            f"layer {getattr(module, 'layer_idx', '?')}: an ilc plan is applied to this model, but it ran with a "
            f"cache that is not the plan's (got keys of type {type(key).__name__}). Pass no cache, or "
            "`past_key_values=plan.new_cache(model)`, or call `ilc.runtime.remove_plan(model)` first."
        )
    layer, state = key.layer, key.state
    if state.mode == Mode.SCORES and layer.layer_idx in layer.cache.last_reader:
        state.queries[layer.layer_idx] = query
    if state.selection is not None and not state.selected and layer.anchor_heads:  # the scorers' last queries
        _observe(state, layer.layer_idx, query, scaling)
    out = _dispatch(query, key, value, scaling)
    for anchor in {a for a in layer.anchors if a != layer.layer_idx}:
        if layer.cache.last_reader.get(anchor) == layer.layer_idx:
            state.queries.pop(anchor, None)
    return out.transpose(1, 2).contiguous(), None


def _dispatch(query, key: PoDKeys | StaticStep, value, scaling: float) -> torch.Tensor:
    """[B, Hq, q, D] from the path that serves this update (see the module docstring)."""
    layer, state = key.layer, key.state
    if isinstance(key, StaticStep):  # a decode step over a StaticPoDCache (selection is refused there)
        kernels = layer.uses_kernels(query) and not state.reference_only
        return (static_decode_triton if kernels else static_decode)(query, key, value, scaling)
    if isinstance(layer, StaticPoDLayer) and layer.layer_idx == 0 and layer.uses_kernels(query):
        prepare_static(layer.cache, query.shape[0], query.device)  # a static prefill: before a decode is captured
    if state.selection is None and not state.reference_only and (state.kernels or (state.kernels is None
                                                                                      and query.is_cuda)):
        return pod_attention_triton(query, key, value, scaling)
    return reference_attention(query, key, value, scaling)


def _observe(state: CacheState, layer_idx: int, query: torch.Tensor, scaling: float) -> None:
    """Keep the layer's last `selection.observation` queries [B, Hq, w, D] of the prompt for selection."""
    w = state.selection.observation
    old = state.observed.get(layer_idx, (None, scaling))[0]
    recent = query[:, :, -w:] if old is None else torch.cat([old, query], dim=2)[:, :, -w:]
    state.observed[layer_idx] = (recent.detach(), scaling)


def pod_mask(*args, attention_mask=None, **kwargs):
    """Mask builder registered under the same name: the attention needs no mask (padding lives in the cache as
    row starts), so the 2-D padding mask is handed on unchanged. `generate` builds "4-D" masks through this for
    compileable caches and passes the result to the model, where the plan's hook reads the padding from it."""
    return attention_mask
