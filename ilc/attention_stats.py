"""Record attention on calibration text without materializing T x T maps.

A calibration attention function, registered with transformers' attention interface as ``ilc_calib``,
computes each layer's output with SDPA and, on the side, the attention probabilities of a few sampled query
rows (plus their log-sum-exp and the layer's values). That is all later stages need: the distance curve, the
distant-token distributions per (layer, KV head), and how much a follower's output changes when it uses its
anchor's distant logits. Memory per sample is O(layers x heads x rows x T), not O(T^2).

The recorder is found through a ContextVar set for the duration of one forward, so nothing is global.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CALIBRATION_ATTENTION = "ilc_calib"
_active: contextvars.ContextVar["SampleRecorder | None"] = contextvars.ContextVar("ilc_calibration", default=None)


@dataclass
class SampleRecord:
    """One calibration sample's attention, for the sampled query rows.

    probs  [L, Hq, R, T] float16  attention probabilities of the sampled rows (causal, each row sums to 1)
    lse    [L, Hq, R]    float32  log-sum-exp of those rows' scaled logits
    values [L, Hkv, T, D] float16 each layer's values (to measure output change under sharing)
    rows   [R] long               positions of the sampled rows
    keys, queries (only when recorded `with_keys`, to price key precision):
    keys    [L, Hkv, T, D] float16 each layer's keys (after RoPE, as the cache stores them)
    queries [L, Hq, R, D] float32  the sampled rows' queries; `scaling` the attention's logit scale
    observed [L, Hq, R, w, D] float16 (only when recorded with `observe` = w, to price token selection): for each
                                   sampled row, the queries of the w positions before it, the end of a prompt that
                                   selection would score right before that row is decoded (`ilc.selection_loss`)
    """

    probs: torch.Tensor
    lse: torch.Tensor
    values: torch.Tensor
    rows: torch.Tensor
    keys: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    scaling: float | None = None
    observed: torch.Tensor | None = None


class SampleRecorder:
    def __init__(self, num_layers: int, rows: torch.Tensor, with_keys: bool = False, observe: int = 0):
        self.rows = rows
        self.with_keys = with_keys
        self.observe_rows = (rows[:, None] - observe + torch.arange(observe)).clamp(min=0) if observe else None
        self.probs: list[torch.Tensor | None] = [None] * num_layers
        self.lse: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.queries: list[torch.Tensor | None] = [None] * num_layers
        self.observed: list[torch.Tensor | None] = [None] * num_layers
        self.scaling: float | None = None

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float):
        rows = self.rows.to(query.device)
        q = query[0, :, rows].float()  # [Hq, R, D]
        group = query.shape[1] // key.shape[1]
        k = key[0].float().repeat_interleave(group, dim=0)  # [Hq, T, D]
        logits = (q @ k.transpose(-1, -2)) * scaling  # [Hq, R, T]
        t = key.shape[2]
        causal = torch.arange(t, device=q.device)[None, :] <= rows[:, None]
        logits = logits.masked_fill(~causal, float("-inf"))
        lse = logits.logsumexp(-1)
        self.probs[layer] = (logits - lse[..., None]).exp().to(torch.float16).cpu()
        self.lse[layer] = lse.cpu()
        self.values[layer] = value[0].to(torch.float16).cpu()
        if self.with_keys:
            self.keys[layer] = key[0].to(torch.float16).cpu()
            self.queries[layer] = q.cpu()
            self.scaling = scaling
        if self.observe_rows is not None:
            observed = query[0, :, self.observe_rows.to(query.device)]  # [Hq, R, w, D]
            self.observed[layer] = observed.to(torch.float16).cpu()

    def finish(self) -> SampleRecord:
        if any(p is None for p in self.probs):
            missing = [i for i, p in enumerate(self.probs) if p is None]
            raise RuntimeError(f"calibration recorded no attention for layers {missing}; does this model route "
                               "attention through transformers' attention interface?")
        record = SampleRecord(torch.stack(self.probs), torch.stack(self.lse), torch.stack(self.values), self.rows)
        if self.with_keys:
            record.keys, record.queries, record.scaling = torch.stack(self.keys), torch.stack(self.queries), self.scaling
        if self.observe_rows is not None:
            record.observed = torch.stack(self.observed)
        return record


def calibration_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA for the layer output; sampled-row probabilities to the active recorder."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    recorder = _active.get()
    if recorder is not None:
        recorder.record(module.layer_idx, query, key, value, scaling)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scaling,
                                         enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    AttentionInterface.register(CALIBRATION_ATTENTION, calibration_attention)
    AttentionMaskInterface.register(CALIBRATION_ATTENTION, sdpa_mask)


def sample_rows(seq_len: int, count: int) -> torch.Tensor:
    """Query rows spread over the second half of a sample (distant tokens exist there; distances vary)."""
    count = max(1, min(count, seq_len // 2))
    return torch.linspace(seq_len // 2, seq_len - 1, count).round().long().unique()


@contextmanager
def recording(model):
    """Run `model` with the calibration attention function; restores the previous implementation after."""
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(CALIBRATION_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def record_sample(model, input_ids: torch.Tensor, rows: torch.Tensor, with_keys: bool = False,
                  observe: int = 0) -> SampleRecord:
    """One forward over one sample [1, T] under `recording(model)`; returns its record (`with_keys`: also the keys
    and the sampled rows' queries; `observe`: also the queries of that many positions before each row)."""
    recorder = SampleRecorder(model.config.get_text_config().num_hidden_layers, rows, with_keys, observe)
    token = _active.set(recorder)
    try:
        model(input_ids.to(model.device), use_cache=False)
    finally:
        _active.reset(token)
    return recorder.finish()
