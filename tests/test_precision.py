"""Pricing KV precision per head (ilc.precision) on records of a tiny model."""

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from ilc.attention_stats import record_sample, recording
from ilc.precision import precision_error
from ilc.runtime.bits import Axis, HeadPrecision


@pytest.fixture(scope="module")
def records():
    model = tiny_llama(layers=3, heads=4, kv_heads=2, head_dim=32, init_range=0.2)
    rows = torch.tensor([40, 70, 95])
    with recording(model):
        return [record_sample(model, torch.randint(3, 90, (1, 96), generator=torch.Generator().manual_seed(s)),
                              rows, with_keys=True) for s in range(2)]


def test_errors_shrink_with_bits_and_vanish_unquantized(records):
    options = [HeadPrecision(16, 16), HeadPrecision(8, 8), HeadPrecision(4, 4), HeadPrecision(2, 2),
               HeadPrecision(4, 4, Axis.CHANNEL)]
    err = precision_error(records, sinks=2, residual=8, options=options)
    assert err["K16V16"].shape == (2, 3) and np.all(err["K16V16"] == 0)
    assert np.all(err["K8V8"] < err["K4V4"]) and np.all(err["K4V4"] < err["K2V2"])
    assert np.all(err["K4cV4"] > 0)


def test_a_residual_over_every_row_keeps_everything_exact(records):
    err = precision_error(records, sinks=0, residual=200, options=[HeadPrecision(2, 2)])
    assert np.allclose(err["K2V2"], 0, atol=1e-6)


def test_bytes_per_token_count_scales():
    assert HeadPrecision(16, 16).bytes_per_token(64) == 256
    assert HeadPrecision(4, 4, group=64).bytes_per_token(64) == 72  # 32 B of ints + 4 B of params, twice
    assert HeadPrecision(8, 4).bytes_per_token(64) < HeadPrecision(8, 8).bytes_per_token(64)


def test_records_without_keys_are_refused():
    model = tiny_llama(layers=1)
    with recording(model):
        rec = record_sample(model, torch.randint(3, 90, (1, 32)), torch.tensor([20]))
    with pytest.raises(ValueError, match="with_keys"):
        precision_error([rec], 1, 4, [HeadPrecision(8, 8)])
