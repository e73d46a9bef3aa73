"""The memory a pass end takes on top of the gradients (issue 24 item 5).

bfloat16/float16 gradients over 65,536 elements were converted to float32 all at
once (+563 MiB peak for 256 MiB of bf16 gradients, +1,076 MiB with one NaN): an
OOM at the end of a pass for a bf16 LLM on a GPU. Large gradients are now reduced
one by one and converted a chunk at a time; small ones are concatenated in
bounded batches. The peak extra memory must stay within 10% of the gradients' size.

Measured at the allocator, not by timing: torch's allocations through the
profiler's memory events (every allocation and free, in order: the peak is the
largest running sum), numpy's through ``tracemalloc`` (numpy reports its buffers
to it); the two peaks are added, an upper bound of the true peak.
"""
from __future__ import annotations

import tracemalloc
import warnings

import pytest
import torch
from torch import nn

import gradtrace
from gradtrace.capture import stats

MIB = 1 << 20


def _torch_peak(prof) -> int:
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_extra_bytes(fn) -> int:
    """Peak bytes allocated (torch + numpy) while ``fn`` runs, above what was allocated before."""
    from torch.profiler import ProfilerActivity, profile

    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the profiler's own notices
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                tracemalloc.reset_peak()
                before = tracemalloc.get_traced_memory()[0]
                fn()
                numpy_peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return _torch_peak(prof) + numpy_peak


class Wide(nn.Module):
    """Four 2048x2048 bf16 (or f16) weights: 32 MiB of gradients, each far above 65,536 elements."""

    def __init__(self, dtype):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2048, 2048, bias=False, dtype=dtype) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.float().pow(2).mean()


def _grad_bytes(model) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("statistics", ["auto", "device"])
@pytest.mark.parametrize("nan", [False, True], ids=["finite", "one_nan"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_pass_end_of_large_half_precision_gradients_takes_under_a_tenth_more(dtype, nan, statistics):
    torch.manual_seed(0)
    model = Wide(dtype)
    x = torch.randn(2, 2048, dtype=dtype) * 0.01
    with gradtrace.watch(model, cuts="off", statistics=statistics) as trace:
        label = trace.pass_("X")
        label.__enter__()
        model(x).backward()
        if nan:
            with torch.no_grad():
                model.layers[1].weight.grad[7, 7] = float("nan")
        extra = peak_extra_bytes(lambda: label.__exit__(None, None, None))
        size = _grad_bytes(model)
    record = trace.passes["X"].records["layers.1.weight"]
    assert record.nonfinite == (1 if nan else 0)  # the figures are still right
    assert extra <= 0.10 * size, f"pass end took {extra / MIB:.1f} MiB over {size / MIB:.0f} MiB of gradients"


@pytest.mark.parametrize("reduction", [stats.HOST, stats.DEVICE], ids=["host", "device"])
def test_small_gradients_are_reduced_in_bounded_batches(reduction):
    """Many gradients of 65,536 elements (small on the device: concatenated a bounded batch at a time;
    large on the host: read where they lie), so the working memory is a few MiB however many there are
    (it was several copies of all of them)."""
    grads = [torch.randn(256, 256) for _ in range(64)]  # 16 MiB of float32, every one "small"
    extra = peak_extra_bytes(lambda: reduction.figures(grads).to_host())
    batch = stats.BATCH_NUMEL * (4 + 8 + 8 + 8)  # a batch's float32 concatenation and its float64 work
    assert extra <= batch, f"{extra / MIB:.1f} MiB for 16 MiB of small gradients"
    # ... and the figures are the per-gradient ones (the host sums float32 products of a gradient this
    # large in float32 blocks: ~1e-7 relative rounding, far below the spread of 64 random norms)
    rows = reduction.figures(grads).to_host()
    for k in (0, 5, 63):
        assert rows[k][0] == pytest.approx(grads[k].double().norm().item(), rel=1e-6)
        assert rows[k][1] == grads[k].abs().max().item()
