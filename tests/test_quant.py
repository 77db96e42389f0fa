"""KV quantization arithmetic (ilc.runtime.quant): packing, round trips within half a step, real byte counts."""

import pytest
import torch

from ilc.runtime.bits import Axis, QuantSpec
from ilc.runtime.quant import dequantize, pack, quantize, unpack


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_unpack_round_trip_and_layout(bits):
    q = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8)
    data = pack(q, bits)
    assert data.shape == (3, 5, 64 * bits // 8) and data.dtype == torch.uint8
    assert torch.equal(unpack(data, bits), q)
    if bits == 4:  # element d in the low nibble, d + D/2 in the high nibble
        assert torch.equal(data & 15, q[..., :32]) and torch.equal(data >> 4, q[..., 32:])


@pytest.mark.parametrize("spec", [QuantSpec(8, 32), QuantSpec(4, 32), QuantSpec(2, 16), QuantSpec(4, 16, Axis.CHANNEL),
                                  QuantSpec(2, 32, Axis.CHANNEL)])
def test_round_trip_error_is_at_most_half_a_step(spec):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 64) * torch.linspace(0.1, 4, 64) + 3  # T != D; groups away from 0  # channels of different scales, as keys have
    q = quantize(x, spec)
    y = dequantize(q)
    groups = x.reshape(2, 3, 96, 64 // spec.group, spec.group) if spec.axis == Axis.TOKEN else \
        x.reshape(2, 3, 96 // spec.group, spec.group, 64).transpose(-1, -2)
    step = (groups.amax(-1) - groups.amin(-1)) / ((1 << spec.bits) - 1)  # per group
    err = (x - y).abs()
    err_groups = err.reshape(groups.shape) if spec.axis == Axis.TOKEN else \
        err.reshape(2, 3, 96 // spec.group, spec.group, 64).transpose(-1, -2)
    # half a step, plus what rounding the scale and the minimum to fp16 adds
    rounding = step * 2 ** -10 * (1 << spec.bits) + groups.abs().amax(-1) * 2 ** -10
    assert (err_groups.amax(-1) <= step * 0.5 * 1.01 + rounding + 1e-6).all()
    assert q.nbytes() == spec.stored_bytes(96, 64) * 6  # what is held is what the formula counts


def test_more_bits_less_error_and_per_channel_keys_win_on_channel_outliers():
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 256, 64)
    keys[..., 5] += 20  # one outlier channel, as post-RoPE keys of real models have
    errs = {b: (dequantize(quantize(keys, QuantSpec(b, 32))) - keys).norm() for b in (8, 4, 2)}
    assert errs[8] < errs[4] < errs[2]
    per_channel = (dequantize(quantize(keys, QuantSpec(4, 32, Axis.CHANNEL))) - keys).norm()
    assert per_channel < errs[4]


def test_bytes_count_scales_and_minimums():
    assert QuantSpec(4, 32).stored_bytes(10, 64) == 10 * 32 + 4 * 10 * 2  # ints + (scale, minimum) per token-group
    assert QuantSpec(8, 64).stored_bytes(1, 64) == 64 + 4
    assert QuantSpec(2, 32, Axis.CHANNEL).stored_bytes(64, 64) == 64 * 16 + 4 * 2 * 64
    # int4 with one 16-bit (scale, minimum) per 64 channels: 72 B per token-head K or V; fp16 is 128 B
    assert QuantSpec(4, 64).stored_bytes(1, 64) == 36 and 2 * 36 / (2 * 128) == pytest.approx(0.28, abs=0.01)


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(3)
    with pytest.raises(ValueError, match="group"):
        QuantSpec(4, 0)
    with pytest.raises(ValueError):
        QuantSpec(4, 32, "row")
