"""A registered tensor's value facts: mean and std exact for large, nearly equal values (issue 24 item 11).

The std came from a sum of squares minus a squared sum, which cancels: 1e8 + noise in
float64 gave 1.414 where the truth is 0.994. It is now a two-pass spread per call,
merged across calls by Chan's update; the oracle is ``statistics.pstdev`` over every
finite value of every call (exact rational arithmetic).
"""
from __future__ import annotations

import math
import statistics as exact

import pytest
import torch

import gradtrace


def _noise(n, seed, scale=1.0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _record(*calls):
    with gradtrace.watch(torch.nn.Linear(1, 1)) as trace:
        for t in calls:
            trace.tensor("A", t)
    return trace.tensors["A"].values


def _finite(*calls):
    return [v for t in calls for v in t.flatten().tolist() if math.isfinite(v)]


def test_std_of_large_nearly_equal_values_in_one_call():
    x = 1e8 + _noise(10_000, 0)
    values = _record(x)
    want = exact.pstdev(x.tolist())
    assert 0.95 < want < 1.05  # unit noise on 1e8 (the issue saw 0.994 reported as 1.414)
    assert values.std == pytest.approx(want, rel=1e-6)
    assert values.mean == pytest.approx(exact.fmean(x.tolist()), rel=1e-15)


def test_std_merged_across_calls_with_different_means_and_sizes():
    calls = [1e8 + _noise(1000, 1), 1e8 + 3 + _noise(10, 2, 0.1), 1e8 - 2 + _noise(5000, 3, 2.0)]
    values = _record(*calls)
    finite = _finite(*calls)
    assert values.std == pytest.approx(exact.pstdev(finite), rel=1e-6)
    assert values.mean == pytest.approx(exact.fmean(finite), rel=1e-15)
    assert values.numel == 6010


def test_nonfinite_values_are_left_out_of_mean_and_std():
    x = 5.0 + _noise(100, 4)
    x[3] = math.nan
    x[7] = math.inf
    values = _record(x, torch.full((4,), math.nan, dtype=torch.float64), 5.0 + _noise(50, 5))
    finite = _finite(x, 5.0 + _noise(50, 5))
    assert values.nonfinite == 6
    assert values.std == pytest.approx(exact.pstdev(finite), rel=1e-9)
    assert values.mean == pytest.approx(exact.fmean(finite), rel=1e-12)


def test_constant_values_have_std_exactly_zero():
    values = _record(torch.full((7,), 1e8, dtype=torch.float64), torch.full((3, 3), 1e8, dtype=torch.float64))
    assert values.std == 0.0 and values.mean == 1e8
