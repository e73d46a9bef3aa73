"""Norms, max |g| and NaN/Inf counts are exact over each dtype's whole range.

The reference never squares an extreme value: it is computed on the host as
max |g| times the norm of g / max |g| (``math.fsum``), so a float64 gradient
of 1e-200 or 1e300, a float32 one of 1e-30 or 1e25, and the largest and
subnormal values of every dtype have a known answer. Both of gradtrace's
paths are covered, each on the CPU's and the accelerators' code: small gradients (segment-reduced together) and large ones
(``_foreach_norm`` + ``aminmax``).
"""
from __future__ import annotations

import math
from typing import List

import pytest
import torch
from hypothesis import given, settings, HealthCheck, strategies as st

import gradtrace
from gradtrace.capture import stats

SMALL, LARGE = 7, stats.SMALL_NUMEL + 9


# Every case on both reductions: the host's (numpy, reading rows back) and the device's
# (everything on the device, no read), which a CPU runs when asked to.
REDUCTIONS = {"host": stats.HOST, "device": stats.DEVICE}
WATCH_STATISTICS = {"host": "auto", "device": "device"}


@pytest.fixture(autouse=True, scope="module", params=list(REDUCTIONS))
def code_path(request):
    return request.param

# Per dtype: its max, smallest normal, smallest subnormal, a middle subnormal, and the values issue 14 named.
EXTREMES = {
    torch.float64: [1.7976931348623157e308, 2.2250738585072014e-308, 5e-324, 1e-310, 1e-200, 1e150, 1e300],
    torch.float32: [3.4028234663852886e38, 1.1754943508222875e-38, 1.401298464324817e-45, 1e-40, 1e-30, 1e25],
    torch.bfloat16: [3.3895313892515355e38, 1.1754943508222875e-38, 9.183549615799121e-41, 1e-39],
    torch.float16: [65504.0, 6.103515625e-05, 5.960464477539063e-08, 1e-6],
}
CASES = [(dtype, value) for dtype, values in EXTREMES.items() for value in values]


def rel_tol(g: torch.Tensor) -> float:
    """Rounding allowed: small gradients (under either reduction's threshold) and float64 ones are summed
    in float64; large float32 ones sum float32 products in blocks (the host's BLAS dot, ~1e-7 seen at
    65,545 elements; torch's float32 ``_foreach_norm`` was ~2e-5 there), the price of the fast path,
    not a lost range."""
    return 1e-10 if g.dtype == torch.float64 or g.numel() <= stats.HOST_SMALL_NUMEL else 1e-6


def reference(g: torch.Tensor):
    """(norm, max |g|, NaN/Inf count) on the host, scaled so that nothing under- or overflows."""
    values = [abs(v) for v in g.detach().double().flatten().tolist()]
    nonfinite = sum(not math.isfinite(v) for v in values)
    if nonfinite:
        top = max(values)
        return (math.nan if any(math.isnan(v) for v in values) else math.inf), top, nonfinite
    top = max(values, default=0.0)
    if top == 0.0:
        return 0.0, 0.0, 0
    return top * math.sqrt(math.fsum((v / top) ** 2 for v in values)), top, 0


def assert_exact(row: List[float], g: torch.Tensor, what: str = "") -> None:
    norm, top, bad = row
    want_norm, want_top, want_bad = reference(g)
    assert top == want_top, f"{what}: max |g| {top!r} != {want_top!r}"
    assert bad == want_bad, f"{what}: NaN/Inf count {bad} != {want_bad}"
    if math.isnan(want_norm):
        assert math.isnan(norm), what
        return
    # abs_tol: a norm that is itself subnormal in float64 is exact only to its spacing (5e-324).
    assert math.isclose(norm, want_norm, rel_tol=rel_tol(g), abs_tol=1e-322), \
        f"{what}: norm {norm!r} != {want_norm!r}"


def host_rows(code_path: str, grads: List[torch.Tensor], **kwargs) -> List[List[float]]:
    return REDUCTIONS[code_path].figures(grads, **kwargs).to_host().tolist()


def _spread(value: float, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """n values of magnitude up to ``value``, both signs, the maximum attained, some exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    g = (u * value).to(dtype)
    g[::3] = -g[::3]
    g[1::5] = 0
    g[0] = value
    return g


@pytest.mark.parametrize("n", [SMALL, LARGE], ids=["small", "large"])
@pytest.mark.parametrize("dtype,value", CASES, ids=[f"{str(d)[6:]}-{v:.3g}" for d, v in CASES])
def test_constant_extreme_gradient(dtype, value, n, code_path):
    g = torch.full((n,), value, dtype=dtype)
    g[1] = -g[1]
    assert_exact(host_rows(code_path, [g])[0], g, f"{dtype} {value} x{n}")


@pytest.mark.parametrize("n", [SMALL, LARGE], ids=["small", "large"])
@pytest.mark.parametrize("dtype,value", CASES, ids=[f"{str(d)[6:]}-{v:.3g}" for d, v in CASES])
def test_spread_extreme_gradient(dtype, value, n, code_path):
    """Values from the extreme down to zero: the subnormals and zeros inside a row count too."""
    g = _spread(value, n, dtype)
    assert_exact(host_rows(code_path, [g])[0], g, f"{dtype} {value} x{n}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n", [SMALL, LARGE], ids=["small", "large"])
def test_exact_on_cuda_without_a_host_sync(n):
    """The accelerator branches (always scaled, never read back) give the same exact answers."""
    grads = [_spread(value, n, dtype, seed=i).cuda() for i, (dtype, value) in enumerate(CASES)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        figures = stats.DEVICE.figures(grads)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for row, g in zip(figures.to_host(), grads, strict=True):
        assert_exact(row, g, f"cuda {g.dtype} x{n}")


def test_regression_float64_1e_minus_200_is_not_zero(code_path):
    """Issue 14: its float64 sum of squares underflowed, so the norm read 0 while max |g| did not."""
    for n in (SMALL, LARGE):
        norm, top, _ = host_rows(code_path, [torch.full((n,), 1e-200, dtype=torch.float64)])[0]
        assert top == 1e-200
        assert math.isclose(norm, 1e-200 * math.sqrt(n), rel_tol=1e-12)


def test_regression_float64_huge_is_finite(code_path):
    for n in (SMALL, LARGE):
        norm, _, bad = host_rows(code_path, [torch.full((n,), 1e300, dtype=torch.float64)])[0]
        assert bad == 0
        assert math.isclose(norm, 1e300 * math.sqrt(n), rel_tol=1e-12)


def test_mixed_batch_every_row_exact(code_path):
    """One call groups by dtype and size: extreme and ordinary rows side by side, each exact."""
    grads = []
    for i, (dtype, value) in enumerate(CASES):
        grads.append(_spread(value, SMALL + i % 3, dtype, seed=i))
        grads.append(torch.randn(5, dtype=dtype))  # an ordinary row in the same group
    grads.append(_spread(1e-200, LARGE, torch.float64))
    grads.append(torch.randn(LARGE, dtype=torch.float64))
    grads.append(torch.zeros(4, dtype=torch.float64))
    grads.append(torch.zeros(0, dtype=torch.float64))
    cache = {}
    for _ in range(2):  # the second call takes the cached layout
        for row, g in zip(host_rows(code_path, grads, layout_cache=cache, key=("k",)), grads, strict=True):
            assert_exact(row, g, f"{g.dtype} x{g.numel()}")
    assert cache


@pytest.mark.parametrize("n", [SMALL, LARGE], ids=["small", "large"])
@pytest.mark.parametrize("dtype", list(EXTREMES))
def test_nonfinite_counts_exact_beside_extremes(dtype, n, code_path):
    g = torch.full((n,), EXTREMES[dtype][2], dtype=dtype)  # the smallest subnormal
    g[3] = math.inf
    g[4] = -math.inf
    g[n - 1] = math.nan
    norm, top, bad = host_rows(code_path, [g])[0]
    assert bad == 3
    assert math.isnan(top) or top == math.inf
    assert not math.isfinite(norm)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(list(EXTREMES)),
    fraction=st.floats(0.0, 1.0),
    sizes=st.lists(st.sampled_from([1, 2, 5, 64, 1000, LARGE]), min_size=1, max_size=4),
    zeros=st.booleans(),
    seed=st.integers(0, 2 ** 16),
)
def test_property_random_magnitudes(dtype, fraction, sizes, zeros, seed, code_path):
    """Any magnitude between the dtype's smallest subnormal and its max, any size, several grads at once."""
    finfo = torch.finfo(dtype)
    lo = math.log2(EXTREMES[dtype][2])
    hi = math.log2(finfo.max)
    grads = []
    for i, n in enumerate(sizes):
        exponent = lo + fraction * (hi - lo)
        value = float(torch.tensor(finfo.max if exponent >= hi else 2.0 ** exponent, dtype=torch.float64).to(dtype))
        assert 0.0 < value < math.inf
        g = _spread(value, n, dtype, seed=seed + i)
        if zeros:
            g[: n // 2] = 0
        grads.append(g)
        fraction = (fraction * 7.31 + 0.17) % 1.0  # other rows at other magnitudes
    for row, g in zip(host_rows(code_path, grads), grads, strict=True):
        assert_exact(row, g, f"{dtype} x{g.numel()}")


# ---------------------------------------------------------------- through watch


class Scaled(torch.nn.Module):
    """One parameter per (dtype, value, size); the loss (p * c).sum() gives p the gradient c everywhere."""

    def __init__(self, cases):
        super().__init__()
        self.consts = {}
        for i, (dtype, value, n) in enumerate(cases):
            name = f"p{i}"
            self.register_parameter(name, torch.nn.Parameter(torch.ones(n, dtype=dtype)))
            c = torch.full((n,), value, dtype=dtype)
            c[::2] = -c[::2]
            self.consts[name] = c

    def forward(self):
        # Summed in float64 (alternating signs) so the loss itself stays finite; each gradient is exactly c.
        return sum((getattr(self, n) * c).double().sum() for n, c in self.consts.items())


WATCH_CASES = [(dtype, value, n) for dtype, value in CASES for n in (SMALL, LARGE)]


def _watched_model():
    return Scaled(WATCH_CASES)


@pytest.mark.parametrize("kind", ["backward", "grad"])
def test_watch_records_exact_norms_at_the_extremes(kind, code_path):
    model = _watched_model()
    params = list(model.parameters())
    with gradtrace.watch(model, cuts="off", statistics=WATCH_STATISTICS[code_path]) as trace:
        with trace.pass_("P"):
            if kind == "backward":
                model().backward()
                grads = [p.grad for p in params]
            else:
                grads = torch.autograd.grad(model(), params)
    pt = trace.passes["P"]
    for (name, _), g, c in zip(model.named_parameters(), grads, model.consts.values(), strict=True):
        assert torch.equal(g, c), f"{name}: the test model's gradient is not c"
        record = pt.records[name]
        want_norm, want_top, _ = reference(g)
        assert record.max_abs == want_top, name
        assert not record.zero and record.nonfinite == 0, name
        assert math.isclose(record.norm, want_norm, rel_tol=rel_tol(g), abs_tol=1e-322), \
            f"{name} ({g.dtype}, {g.numel()}): {record.norm!r} != {want_norm!r}"


def test_watch_counts_nonfinite_exactly_beside_extremes(code_path):
    model = Scaled([(torch.float64, 1e-200, SMALL), (torch.float64, 1e-200, LARGE)])
    with torch.no_grad():
        model.consts["p0"][2] = math.inf
        model.consts["p1"][5] = math.inf
        model.consts["p1"][6] = math.inf
    with gradtrace.watch(model, cuts="off", statistics=WATCH_STATISTICS[code_path]) as trace:
        with trace.pass_("P"):
            torch.autograd.grad(model(), list(model.parameters()))
    records = trace.passes["P"].records
    assert records["p0"].nonfinite == 1
    assert records["p1"].nonfinite == 2


def test_empty_gradients_between_others_stay_zero_and_do_not_shift_rows(code_path):
    # numpy's reduceat gives an empty segment its neighbour's first element: the CPU path must not.
    grads = [torch.zeros(0), torch.tensor([3.0, -4.0]), torch.zeros(0), torch.tensor([float("inf"), 1.0]),
             torch.zeros(0, 5), torch.tensor([1e-30] * 3), torch.zeros(0)]
    for row, g in zip(host_rows(code_path, grads), grads, strict=True):
        assert_exact(row, g, f"shape {tuple(g.shape)}")
    assert host_rows(code_path, [torch.zeros(0), torch.zeros(0, 2)]) == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_extreme_float64_gradients_raise_no_numpy_warning(code_path):
    """The CPU path squares float64 values in numpy: an overflow there is expected (the row is
    redone scaled) and must not reach the user as a RuntimeWarning."""
    import warnings

    grads = [torch.full((5,), 1e300, dtype=torch.float64), torch.full((3,), 1e-200, dtype=torch.float64)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = host_rows(code_path, grads)
    for row, g in zip(rows, grads, strict=True):
        assert_exact(row, g)


@pytest.mark.parametrize("dtype,value", CASES, ids=[f"{str(d)[6:]}-{v:.3g}" for d, v in CASES])
def test_chunked_large_gradients_stay_exact(dtype, value, code_path):
    """Above ``CHUNK_NUMEL`` elements a converted copy is made a chunk at a time (bounded memory):
    the chunks' norms combine to the whole tensor's, at every extreme, NaN/Inf counted across chunks."""
    n = 2 * stats.CHUNK_NUMEL + 3
    g = torch.full((n,), value, dtype=dtype)
    g[1::2] = -g[1::2]
    exact = float(torch.tensor(value, dtype=dtype).double()) * math.sqrt(n)  # |v| sqrt(n), no sum taken
    norm, top, bad = host_rows(code_path, [g])[0]
    assert top == float(torch.tensor(value, dtype=dtype).double()) and bad == 0
    assert math.isclose(norm, exact, rel_tol=rel_tol(g), abs_tol=1e-322), f"{norm!r} != {exact!r}"
    g[3] = math.nan
    g[stats.CHUNK_NUMEL + 5] = math.inf
    g[n - 1] = -math.inf
    norm, top, bad = host_rows(code_path, [g])[0]
    assert bad == 3 and math.isnan(top) and math.isnan(norm)
