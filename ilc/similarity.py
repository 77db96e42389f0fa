"""How alike two layers' attention over distant tokens is, per KV head: the matrix that grouping optimizes.

Two criteria, registered by name (the plan records which one built it):
- ``jsd`` (the paper's): 1 - Jensen-Shannon divergence (log base 2, so in [0, 1]) between the two layers'
  attention distributions over distant tokens, renormalized over the distant span.
- ``output``: 1 - the relative change of the follower's attention output when it uses the anchor's distant
  logits (scores mode: one softmax over its own proximal logits and the anchor's distant logits, then its own
  values). This measures what sharing breaks, including the proximal/distant mass balance that JSD ignores.

Each returns sim[h, a, f] for anchor a <= f < a + span (1 on the diagonal, 0 outside the span), averaged over
samples, sampled rows and the query heads of KV head h.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .attention_stats import SampleRecord


def distant_mask(rows: torch.Tensor, t: int, sinks: int, window: int) -> torch.Tensor:
    """[R, T]: key j is distant for query row i (j >= sinks and i - j >= window)."""
    j = torch.arange(t)[None, :]
    return (j >= sinks) & (j <= rows[:, None] - window)


def _per_kv_head(x: torch.Tensor, num_kv: int) -> torch.Tensor:
    """[Hq] -> [Hkv] mean over the query heads of each KV head."""
    return x.view(num_kv, -1).mean(-1)


def output_error(out: torch.Tensor, reference: torch.Tensor, num_kv: int) -> torch.Tensor:
    """[Hkv] relative change ||out - reference|| / ||reference|| of attention outputs [Hq, R, D], averaged over the
    R rows and the query heads of each KV head (not clipped): the error every option is priced by."""
    rel = ((out - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-6)).mean(-1)  # [Hq]
    return _per_kv_head(rel, num_kv)


def jsd_similarity(records: list[SampleRecord], sinks: int, window: int, span: int) -> np.ndarray:
    num_layers, hq = records[0].probs.shape[:2]
    hkv = records[0].values.shape[1]
    sim = np.zeros((hkv, num_layers, num_layers))
    for r in records:
        mask = distant_mask(r.rows, r.probs.shape[-1], sinks, window)
        keep = mask.any(-1)
        if not keep.any():
            raise ValueError(f"no distant tokens at the sampled rows (sinks={sinks}, window={window}); "
                             "calibrate with a longer --seq-len or a smaller --window")
        dist = []
        for layer in range(num_layers):
            p = r.probs[layer][:, keep].float() * mask[keep]
            dist.append(p / p.sum(-1, keepdim=True).clamp_min(1e-12))
        for a in range(num_layers):
            sim[:, a, a] += 1.0
            for f in range(a + 1, min(num_layers, a + span)):
                m = 0.5 * (dist[a] + dist[f])
                kl_a = torch.xlogy(dist[a], dist[a]).sum(-1) - torch.xlogy(dist[a], m).sum(-1)
                kl_f = torch.xlogy(dist[f], dist[f]).sum(-1) - torch.xlogy(dist[f], m).sum(-1)
                jsd = (0.5 * (kl_a + kl_f) / np.log(2)).clamp(0, 1).mean(-1)  # [Hq]
                sim[:, a, f] += (1 - _per_kv_head(jsd, hkv)).numpy()
    return sim / len(records)


def output_similarity(records: list[SampleRecord], sinks: int, window: int, span: int) -> np.ndarray:
    num_layers, hq = records[0].probs.shape[:2]
    hkv = records[0].values.shape[1]
    group = hq // hkv
    sim = np.zeros((hkv, num_layers, num_layers))
    for r in records:
        t = r.probs.shape[-1]
        dmask = distant_mask(r.rows, t, sinks, window).float()  # [R, T]
        causal = (torch.arange(t)[None, :] <= r.rows[:, None]).float()
        pmask = causal - dmask
        for f in range(num_layers):
            v = r.values[f].float().repeat_interleave(group, dim=0)  # [Hq, T, D]
            pf = r.probs[f].float()
            o_full = pf @ v
            o_prox = (pf * pmask) @ v
            log_prox = (r.lse[f] + (pf * pmask).sum(-1).clamp_min(1e-30).log())  # [Hq, R]
            for a in range(max(0, f - span + 1), f):
                pa = r.probs[a].float() * dmask
                log_dist = r.lse[a] + pa.sum(-1).clamp_min(1e-30).log()
                log_z = torch.logaddexp(log_prox, log_dist)
                o_new = (log_prox - log_z).exp()[..., None] * (o_prox / (pf * pmask).sum(-1, keepdim=True)
                                                              .clamp_min(1e-30)) \
                    + (log_dist - log_z).exp()[..., None] * ((pa @ v) / pa.sum(-1, keepdim=True).clamp_min(1e-30))
                sim[:, a, f] += (1 - output_error(o_new, o_full, hkv)).clamp(0, 1).numpy()
            sim[:, f, f] += 1.0
    return sim / len(records)


CRITERIA: dict[str, Callable[..., np.ndarray]] = {"jsd": jsd_similarity, "output": output_similarity}


def streaming_error(records: list[SampleRecord], sinks: int, windows: Sequence[int]) -> np.ndarray:
    """err[h, layer, k]: relative change of KV head h's attention output at `layer` when it keeps only the sinks
    and the last windows[k] tokens (a STREAMING head: distant tokens dropped, the rest renormalized), averaged over
    samples, sampled rows and the query heads of h; clipped to [0, 1] like the follower criterion."""
    num_layers, hq = records[0].probs.shape[:2]
    hkv = records[0].values.shape[1]
    group = hq // hkv
    err = np.zeros((hkv, num_layers, len(windows)))
    for r in records:
        t = r.probs.shape[-1]
        causal = (torch.arange(t)[None, :] <= r.rows[:, None]).float()
        keeps = [causal - distant_mask(r.rows, t, sinks, w).float() for w in windows]  # [R, T] each
        for layer in range(num_layers):
            v = r.values[layer].float().repeat_interleave(group, dim=0)  # [Hq, T, D]
            p = r.probs[layer].float()
            o_full = p @ v
            for k, keep in enumerate(keeps):
                pk = p * keep
                o_new = (pk @ v) / pk.sum(-1, keepdim=True).clamp_min(1e-30)
                err[:, layer, k] += output_error(o_new, o_full, hkv).clamp(0, 1).numpy()
    return err / len(records)
