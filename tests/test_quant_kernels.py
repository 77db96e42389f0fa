"""The quantized decode kernel (ilc.kernels.quant_decode) against the PyTorch reference, in Triton's interpreter
on CPU: packed keys and values dequantized in registers give the attention of the dequantized cache."""

import pytest
import torch

from ilc.kernels import decode_merge, decode_splits, quantized_decode_attention
from ilc.kernels.table import LaunchColumn
from ilc.runtime.bits import HeadPrecision
from ilc.runtime.slots import Slots

import conftest  # noqa: F401  (sets TRITON_INTERPRET on machines without a GPU)


def reference(query, keys, values, row_start, scaling):
    """query [B, Hq, 1, D] over keys / values [B, H, T, D] (slots before each row's start masked)."""
    group = query.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    logits = (query @ k.transpose(-1, -2)).float() * scaling  # [B, Hq, 1, T]
    slot = torch.arange(keys.shape[2])
    logits = logits.masked_fill(slot[None, None, None, :] < row_start[:, None, None, None], float("-inf"))
    return logits.softmax(-1) @ v.float()


@pytest.mark.parametrize("name, total, row_start", [("K8V8", 150, (0, 0)), ("K4cV4", 200, (0, 5)),
                                                    ("K4cV2", 97, (3, 0)), ("K2cV2", 64, (0, 0))])
def test_quantized_decode_matches_the_dequantized_reference(name, total, row_start):
    torch.manual_seed(0)
    b, hkv, group, d, prefix, residual = 2, 2, 3, 32, 4 + max(row_start), 16
    precision = HeadPrecision.parse(name, group=16)
    keys, values = torch.randn(b, hkv, total, d), torch.randn(b, hkv, total, d)
    keys[..., 5] += 4.0  # an outlier channel, as real keys have
    k_slots = Slots(precision.key_spec(), residual, prefix, keys[:, :, :0])
    v_slots = Slots(precision.value_spec(), residual, prefix, values[:, :, :0])
    for lo in range(0, total, 40):  # a prompt in chunks
        k_slots.append(keys[:, :, lo:lo + 40])
        v_slots.append(values[:, :, lo:lo + 40])
    assert k_slots.packed == v_slots.packed > 0 or total - prefix - residual < 16
    query = torch.randn(b, hkv * group, 1, d)
    rs = torch.tensor(row_start, dtype=torch.int32)
    want = reference(query, k_slots.read(), v_slots.read(), rs, 0.2)
    table = torch.zeros(hkv, len(LaunchColumn), dtype=torch.int32)
    for col in (LaunchColumn.KV_HEAD, LaunchColumn.OWN, LaunchColumn.VALUE):
        table[:, col] = torch.arange(hkv, dtype=torch.int32)
    cap, nsplit, split_len = decode_splits(query.device, b, hkv, total)
    mid_o = torch.zeros(b, hkv * group, cap, d)
    mid_lse = torch.zeros(b, hkv * group, cap)
    quantized_decode_attention(
        query, table, group=group, head_k=k_slots.head, head_v=v_slots.head, k_data=k_slots.data,
        k_scale=k_slots.scale, k_min=k_slots.minimum, v_data=v_slots.data, v_scale=v_slots.scale,
        v_min=v_slots.minimum, tail_k=k_slots.tail, tail_v=v_slots.tail, row_start=rs, mid_o=mid_o, mid_lse=mid_lse,
        k_prefix=prefix, k_packed=k_slots.packed, v_prefix=prefix, v_packed=v_slots.packed, total=total, scaling=0.2, key_bits=precision.key_bits,
        value_bits=precision.value_bits, key_channel=precision.key_axis == "channel", quant_group=16, nsplit=nsplit,
        split_len=split_len)
    out = torch.empty_like(query)
    decode_merge(out, mid_o, mid_lse, nsplit)
    assert nsplit > 1 and (out - want).abs().max() < 1e-4
    exact = reference(query, keys, values, rs, 0.2)
    assert (out - exact).abs().max() > 1e-4  # the kernel read the integers, not the original floats
