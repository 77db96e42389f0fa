"""How a plan maps onto vLLM's paged KV cache (no vLLM import: the main test suite checks all of this).

vLLM keeps one block table per KV cache group, and a group is a set of attention layers that keep the same
tokens. ilc decides per (layer, KV head), so each decoder layer is split into *head groups*: its FULL heads, and
its STREAMING heads per window. Each KV head runs as a vLLM attention layer of its own (`model.py`), with the cache
spec of its group (`spec.py`): full heads keep every token, a streaming head keeps its sink blocks and the blocks
of its window, and vLLM frees the blocks in between.

The split is an exact rewrite of the checkpoint: per layer, the KV heads are permuted so that each head group is
contiguous, the query heads move with their KV head (GQA) and the `o_proj` input columns with their query heads.
With tensor parallelism, every rank gets the same share of every head group (vLLM requires the same cache layout on
each rank), so each group's head count must divide by the TP size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..heads import HeadKind
from ..plan import Plan, PlanError

class UnservablePlanError(PlanError):
    """The plan uses something the vLLM plugin does not serve (yet), or cannot be split over the TP ranks."""


@dataclass(frozen=True)
class HeadGroup:
    """KV heads of one layer that keep the same tokens: FULL (window 0) or STREAMING with one window."""

    kind: HeadKind
    window: int
    kv_heads: tuple[int, ...]  # the plan's KV-head indices, in layout order


@dataclass(frozen=True)
class LayerLayout:
    """One decoder layer: its head groups (full first, then streaming by window) and the KV-head permutation."""

    groups: tuple[HeadGroup, ...]
    order: tuple[int, ...]  # order[new position] = the plan's KV head there, over all TP ranks

    def local_groups(self, tensor_parallel: int) -> tuple[tuple[HeadGroup, int], ...]:
        """(group, KV heads on each rank) in the order one rank lays them out."""
        return tuple((g, len(g.kv_heads) // tensor_parallel) for g in self.groups)


@dataclass(frozen=True)
class ServingLayout:
    """A plan laid out for vLLM: per layer head groups and permutations, for `tensor_parallel` ranks."""

    sinks: int
    num_kv_heads: int
    num_attention_heads: int
    head_dim: int
    tensor_parallel: int
    layers: tuple[LayerLayout, ...]

    @property
    def queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_kv_heads

    def query_order(self, layer: int) -> torch.Tensor:
        """Query-head permutation of `layer` [num_attention_heads]: each KV head's GQA queries move with it."""
        g = self.queries_per_kv
        return torch.tensor([kv * g + i for kv in self.layers[layer].order for i in range(g)])

    def kv_order(self, layer: int) -> torch.Tensor:
        return torch.tensor(self.layers[layer].order)


def check_servable(plan: Plan, where: str = "plan") -> None:
    """Refuse, in one line naming the plan and the reason, what the vLLM plugin does not serve."""
    counts = plan.kind_counts()
    if counts[HeadKind.FOLLOWER.label]:
        raise UnservablePlanError(
            f"{where}: {counts['follower']} follower heads (PoD sharing); the vLLM plugin serves full and streaming "
            "heads only so far (docs/serving.md says what followers need). Calibrate with --kinds streaming.")
    if plan.selection is not None:
        raise UnservablePlanError(f"{where}: token selection (selection:) has no paged-cache form in vLLM yet; "
                                  "calibrate without --keep")
    if plan.adapted is not None:
        raise UnservablePlanError(f"{where}: adapted plans (an `ilc adapt` adapter) are not served by the vLLM "
                                  "plugin yet")
    if plan.quantized:
        raise UnservablePlanError(f"{where}: quantized heads (precision:) are not served by the vLLM plugin yet "
                                  "(vLLM's cache holds one dtype per layer); calibrate without --precision")


def serving_layout(plan: Plan, tensor_parallel: int = 1, where: str = "plan") -> ServingLayout:
    """The plan's head groups and permutations for `tensor_parallel` ranks; UnservablePlanError if it cannot."""
    check_servable(plan, where)
    kv = plan.num_kv_heads
    if tensor_parallel < 1 or kv % tensor_parallel:
        raise UnservablePlanError(f"{where}: {kv} KV heads do not split over tensor-parallel size {tensor_parallel}")
    layers = []
    for index, row in enumerate(plan.head_table()):
        by_window: dict[int, list[int]] = {}
        for head, spec in enumerate(row):
            by_window.setdefault(spec.window if spec.kind == HeadKind.STREAMING else 0, []).append(head)
        groups = tuple(HeadGroup(HeadKind.STREAMING if w else HeadKind.FULL, w, tuple(heads))
                       for w, heads in sorted(by_window.items()))
        for g in groups:
            if len(g.kv_heads) % tensor_parallel:
                what = "full" if g.kind == HeadKind.FULL else f"streaming (window {g.window})"
                raise UnservablePlanError(
                    f"{where}: layer {index} has {len(g.kv_heads)} {what} KV heads, which do not split evenly over "
                    f"tensor-parallel size {tensor_parallel} (vLLM needs the same cache layout on every rank)")
        order = [h for rank in range(tensor_parallel) for g in groups
                 for h in _rank_share(g.kv_heads, rank, tensor_parallel)]
        layers.append(LayerLayout(groups, tuple(order)))
    m = plan.model
    return ServingLayout(plan.sinks, kv, m.num_attention_heads, m.head_dim, tensor_parallel, tuple(layers))


def _rank_share(heads: tuple[int, ...], rank: int, ranks: int) -> tuple[int, ...]:
    n = len(heads) // ranks
    return heads[rank * n:(rank + 1) * n]


def permute_checkpoint_tensor(layout: ServingLayout, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The checkpoint tensor `name` (Hugging Face Llama names) rewritten for the layout: rows of q/k/v_proj
    (weight [heads * head_dim, hidden], bias [heads * head_dim]) and columns of o_proj.weight
    [hidden, heads * head_dim] permuted per head; every other tensor unchanged."""
    layer, projection = _attention_projection(name)
    if projection is None:
        return tensor
    order = layout.kv_order(layer) if projection in ("k_proj", "v_proj") else layout.query_order(layer)
    d = layout.head_dim
    index = (order[:, None] * d + torch.arange(d)).reshape(-1)
    return tensor.index_select(1 if projection == "o_proj" else 0, index.to(tensor.device))


def _attention_projection(name: str) -> tuple[int, str | None]:
    """(layer, projection) for `model.layers.<i>.self_attn.<q|k|v|o>_proj.<weight|bias>`, else (-1, None)."""
    parts = name.split(".")
    if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[3] == "self_attn" and parts[2].isdigit():
        if parts[4] in ("q_proj", "k_proj", "v_proj") or (parts[4] == "o_proj" and parts[5] == "weight"):
            return int(parts[2]), parts[4]
    return -1, None


def describe(plan: Plan, layout: ServingLayout, context: int) -> str:
    """One line for the startup log: the plan, its kinds, and KV bytes per token against dense at `context`
    (16-bit, the plan's count: vLLM's block rounding adds to it)."""
    counts = plan.kind_counts()
    dense, planned = (n // context for n in plan.kv_bytes(context))
    windows = sorted({g.window for layer in layout.layers for g in layer.groups if g.window})
    return (f"ilc plan {plan.model.name}: {counts['full']} full + {counts['streaming']} streaming KV heads (sinks "
            f"{plan.sinks}, windows {windows}), tensor-parallel {layout.tensor_parallel}; KV bytes per token at "
            f"{context} tokens: {planned} vs {dense} dense ({1 - planned / dense:.1%} saved)")
