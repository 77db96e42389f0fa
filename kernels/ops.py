"""The Triton launchers as `torch.library` custom ops, so that `torch.compile` traces through them.

`ilc::decode_attention`, `ilc::quantized_decode_attention`, `ilc::decode_merge` and `ilc::prefill_attention` wrap the launchers of this package
one to one (same arguments, plain tensors, ints and floats). Each writes into tensors it is given (declared in
`mutates_args`) and returns nothing, so the fake implementations, which the compiler runs on meta tensors to
learn shapes, have nothing to compute. `ilc.runtime.kernel_dispatch` calls these ops, never the launchers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import decode_attention as _decode_attention
from . import decode_merge as _decode_merge
from . import prefill_attention as _prefill_attention
from . import quantized_decode_attention as _quantized_decode_attention


@torch.library.custom_op("ilc::decode_attention", mutates_args=("logits", "mid_o", "mid_lse"))
def decode_attention(query: Tensor, table: Tensor, group: int, values: Tensor, anchor_keys: Tensor,
                     sink_keys: Tensor, ring_keys: Tensor, dist_keys: Tensor, sink_values: Tensor,
                     ring_values: Tensor, logits: Tensor, row_start: Tensor, mid_o: Tensor, mid_lse: Tensor,
                     total: int, rs_min: int, sinks: int, window: int, scaling: float, nsplit: int,
                     split_len: int, total_at: Tensor | None = None) -> None:
    """See `ilc.kernels.decode_attention`."""
    _decode_attention(query, table, group=group, values=values, anchor_keys=anchor_keys, sink_keys=sink_keys,
                      ring_keys=ring_keys, dist_keys=dist_keys, sink_values=sink_values, ring_values=ring_values,
                      logits=logits, row_start=row_start, mid_o=mid_o, mid_lse=mid_lse, total=total, rs_min=rs_min,
                      sinks=sinks, window=window, scaling=scaling, nsplit=nsplit, split_len=split_len,
                      total_at=total_at)


@decode_attention.register_fake
def _(query, table, group, values, anchor_keys, sink_keys, ring_keys, dist_keys, sink_values, ring_values, logits,
      row_start, mid_o, mid_lse, total, rs_min, sinks, window, scaling, nsplit, split_len, total_at=None) -> None:
    return None


@torch.library.custom_op("ilc::quantized_decode_attention", mutates_args=("mid_o", "mid_lse"))
def quantized_decode_attention(query: Tensor, table: Tensor, group: int, head_k: Tensor, head_v: Tensor,
                               k_data: Tensor, k_scale: Tensor, k_min: Tensor, v_data: Tensor, v_scale: Tensor,
                               v_min: Tensor, tail_k: Tensor, tail_v: Tensor, row_start: Tensor, mid_o: Tensor,
                               mid_lse: Tensor, k_prefix: int, k_packed: int, v_prefix: int, v_packed: int,
                               total: int, scaling: float, key_bits: int, value_bits: int, key_channel: bool,
                               quant_group: int, nsplit: int, split_len: int, k_ring: int = 0, v_ring: int = 0,
                               residual: int = 0, total_at: Tensor | None = None, sink_k: Tensor | None = None,
                               sink_v: Tensor | None = None, sinks: int = 0, window: int = 0, k_first: int = 0,
                               v_first: int = 0, groups: int = 0) -> None:
    """See `ilc.kernels.quantized_decode_attention`."""
    _quantized_decode_attention(
        query, table, group=group, head_k=head_k, head_v=head_v, k_data=k_data, k_scale=k_scale, k_min=k_min,
        v_data=v_data, v_scale=v_scale, v_min=v_min, tail_k=tail_k, tail_v=tail_v, row_start=row_start, mid_o=mid_o,
        mid_lse=mid_lse, k_prefix=k_prefix, k_packed=k_packed, v_prefix=v_prefix, v_packed=v_packed, total=total,
        scaling=scaling, key_bits=key_bits, value_bits=value_bits, key_channel=key_channel, quant_group=quant_group,
        nsplit=nsplit, split_len=split_len, k_ring=k_ring, v_ring=v_ring, residual=residual, total_at=total_at,
        sink_k=sink_k, sink_v=sink_v, sinks=sinks, window=window, k_first=k_first, v_first=v_first, groups=groups)


@quantized_decode_attention.register_fake
def _(query, table, group, head_k, head_v, k_data, k_scale, k_min, v_data, v_scale, v_min, tail_k, tail_v, row_start,
      mid_o, mid_lse, k_prefix, k_packed, v_prefix, v_packed, total, scaling, key_bits, value_bits, key_channel,
      quant_group, nsplit, split_len, k_ring=0, v_ring=0, residual=0, total_at=None, sink_k=None, sink_v=None, sinks=0,
      window=0, k_first=0, v_first=0, groups=0) -> None:
    return None


@torch.library.custom_op("ilc::decode_merge", mutates_args=("out",))
def decode_merge(out: Tensor, mid_o: Tensor, mid_lse: Tensor, nsplit: int) -> None:
    """See `ilc.kernels.decode_merge`."""
    _decode_merge(out, mid_o, mid_lse, nsplit)


@decode_merge.register_fake
def _(out, mid_o, mid_lse, nsplit) -> None:
    return None


@torch.library.custom_op("ilc::prefill_attention", mutates_args=("out",))
def prefill_attention(out: Tensor, query: Tensor, q_dist: Tensor, table: Tensor, group: int, sink_keys: Tensor,
                      recent_keys: Tensor, recent_start: int, dist_keys: Tensor, values: Tensor, sink_values: Tensor,
                      recent_values: Tensor, row_start: Tensor, rs_min: int, start: int, total: int, sinks: int,
                      window: int, scaling: float, streaming: bool = False) -> None:
    """See `ilc.kernels.prefill_attention`."""
    _prefill_attention(out, query, q_dist, table, group=group, sink_keys=sink_keys, recent_keys=recent_keys,
                       recent_start=recent_start, dist_keys=dist_keys, values=values, sink_values=sink_values,
                       recent_values=recent_values, row_start=row_start, rs_min=rs_min, start=start, total=total,
                       sinks=sinks, window=window, scaling=scaling, streaming=streaming)


@prefill_attention.register_fake
def _(out, query, q_dist, table, group, sink_keys, recent_keys, recent_start, dist_keys, values, sink_values,
      recent_values, row_start, rs_min, start, total, sinks, window, scaling, streaming=False) -> None:
    return None
