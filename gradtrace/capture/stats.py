"""Gradient statistics: one definition of each figure, two ways of reducing it.

The figures of one gradient ``g`` (its dense, local values ``x``: a sparse
gradient's values, a DTensor's local shard, a complex gradient's modulus):

* ``norm``: ``sqrt(sum x**2)``, the squares taken in float64. Squares of any
  float32 (or narrower) value neither under- nor overflow there; a float64
  gradient whose max |x| is outside ``SAFE_RANGE[float64]`` is first scaled by a
  power of two (exact), so 1e-200 and 1e300 keep their norm.
* ``max_abs``: ``max |x|``, NaN/Inf propagating. "Exactly zero" is judged on
  it, never on the norm: the float32 norm of ``[1e-30, 1e-30]`` is 0.
* ``nonfinite``: how many elements are NaN or +-Inf.

Both reductions follow those definitions, over one grouping (``Reduction.figures``):
gradients of up to ``small_numel`` elements (the reduction's) are concatenated
per device and dtype, in batches of at most ``BATCH_NUMEL`` elements, and
reduced by segment (a torch op costs a few microseconds of dispatch however
small its input); larger ones are reduced one by one, and where a reduction
needs a converted copy (bfloat16/float16 to a wider type, a scaled float64) it
converts ``CHUNK_NUMEL`` elements at a time. So the memory a pass end takes on
top of the gradients is bounded by those pieces, never a copy of every gradient.

* ``HostReduction``: for values already on the host (CPU tensors). Reading a
  value back costs nothing there, so it takes fast paths and redoes, exactly,
  the rare rows that need it (a norm out of float32's safe range, a NaN/Inf
  count where max |x| is not finite), found from the figures themselves. A
  gradient above ``HOST_SMALL_NUMEL`` elements is read twice in place and
  never copied: ``aminmax`` for max |x|, BLAS ``dot`` for the sum of squares
  (float32 products summed in float32 per ``DOT_NUMEL`` elements, the partial
  sums in float64: under 1e-6 relative rounding at any size, where torch's
  float32 norm reached 1e-4 at 4M elements). Its rows are numpy arrays: the
  host transfer is free. Values on an accelerator go to ``DeviceReduction``.
* ``DeviceReduction``: never reads a value back (no host synchronisation): every
  row takes the exact path, with no branch on values.

Which one a watch uses is an explicit choice (``reduction_for``): "auto" is the
host reduction (CPU values on the host, accelerator values on the device);
"device" runs the device reduction everywhere (what an accelerator runs, and how
the tests exercise it on a CPU).
"""
from __future__ import annotations

import math
import operator
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._torch_compat import flatten_dense_tensors, foreach_norm

# Gradients up to this many elements are concatenated and reduced together: on the device, where
# a kernel launch costs more than reading 65,536 values...
SMALL_NUMEL = 1 << 16
# ... and on the host, where converting a concatenation to float64 costs 7 times a float32 BLAS dot
# of the gradient where it lies (measured: 35 vs 4 us at 65,536 elements): above this, one by one.
HOST_SMALL_NUMEL = 1 << 12
# The host's float32 dot of a large gradient sums this many products in float32 (4e-7 relative rounding
# measured at this size), the partial sums in float64.
DOT_NUMEL = 1 << 18
# At most this many elements go into one concatenated buffer (its float64 copies bound the memory).
BATCH_NUMEL = 1 << 18
# A large gradient that needs a converted copy is converted this many elements at a time.
CHUNK_NUMEL = 1 << 18

# Where a sum of squares is exact (to rounding) in the dtype it is accumulated in: squares stay
# normal, and 2**32 of them stay finite. Outside it, float64 1e-200 squares to 0 and 1e160 to inf.
SAFE_RANGE = {torch.float64: (2.0 ** -480, 2.0 ** 480), torch.float32: (2.0 ** -60, 2.0 ** 40)}


def dense(g: torch.Tensor) -> torch.Tensor:
    """The values a figure is taken over: sparse grads' values, a DTensor's local shard, the modulus."""
    if g.is_sparse:
        return g.coalesce().values()
    to_local = getattr(g, "to_local", None)  # DTensor (FSDP2): statistics of the local shard
    if to_local is not None and callable(to_local):
        g = to_local()
    if g.is_complex():  # the modulus has the complex norm and max |g|; the real part alone does not
        return g.abs()
    return g


def _is_plain(g: torch.Tensor) -> bool:
    return type(g) is torch.Tensor and g.layout is torch.strided and not g.is_complex()


def scale_exponent(top: float) -> int:
    """The power of two that brings ``top`` (> 0, finite) near 1, clamped so that 2**e is a normal float64."""
    return max(-1022, min(1023, -math.frexp(top)[1]))


def _chunks(t: torch.Tensor) -> List[torch.Tensor]:
    flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
    return list(flat.split(CHUNK_NUMEL)) if flat.numel() > CHUNK_NUMEL else [flat]


class Figures:
    """The figures of ``count`` gradients, still where they were computed; ``to_host`` reads them once.

    A row per gradient: (norm, max |g|, NaN/Inf count), float64: a torch tensor on the device that
    computed it, or a numpy array when the host reduction computed it there (nothing left to read)."""

    __slots__ = ("per_device", "count")

    def __init__(self, per_device: Dict[torch.device, Tuple[List[int], "Rows"]], count: int):
        self.per_device = per_device  # {device: (positions in the input, (n, 3) float64 rows)}
        self.count = count

    def to_host(self) -> np.ndarray:
        """The (count, 3) float64 figures in input order: one host transfer per device."""
        n = self.count
        if len(self.per_device) == 1:
            positions, rows = next(iter(self.per_device.values()))
            if len(positions) == n and all(map(operator.eq, positions, range(n))):
                return _on_host(rows)  # the common case: one device, one group, already in order
        out = np.zeros((n, 3))
        for positions, rows in self.per_device.values():
            out[np.asarray(positions, dtype=np.int64)] = _on_host(rows)
        return out


# (n, 3) float64 figures: numpy when computed on the host, a torch tensor on the device that computed them.
Rows = Union[np.ndarray, torch.Tensor]


def _on_host(rows: Rows) -> np.ndarray:
    return rows if isinstance(rows, np.ndarray) else rows.cpu().numpy()


# (device, dtype, small?, positions, where each gradient of a small batch lies in its flat buffer)
Layout = List[Tuple[torch.device, torch.dtype, bool, List[int], Optional["Segments"]]]


class Reduction:
    """Figures of many gradients in a few batched kernels; subclasses say how a group is reduced."""

    name = ""
    small_numel = SMALL_NUMEL  # gradients up to this many elements are concatenated and reduced together

    def figures(self, grads: Sequence[torch.Tensor], layout_cache: Optional[Dict[Tuple, Layout]] = None,
                key: Optional[Tuple] = None) -> Figures:
        """Per gradient: (norm, max |g|, NaN/Inf count), still on the device.

        Passes of a training loop reach the same parameters in the same order, so
        the grouping by (device, dtype, size) is cached under ``key``; a gradient
        that no longer fits its cached group sends the call down the full path.
        """
        layout = layout_cache.get(key) if layout_cache is not None and key is not None else None
        if layout is not None:
            try:
                return Figures(self._reduce(list(grads), layout), len(grads))
            except (RuntimeError, TypeError, ValueError):
                pass  # a gradient changed dtype, device or layout since: group again
        values = [g if _is_plain(g) else dense(g) for g in grads]
        layout = self._layout(values)
        # Cache only when every gradient was used as it is (a sparse or DTensor one was
        # replaced by its values); compare by identity: == on tensors is elementwise.
        if layout_cache is not None and key is not None and all(map(operator.is_, values, grads)):
            if len(layout_cache) >= 8:
                layout_cache.pop(next(iter(layout_cache)))
            layout_cache[key] = layout
        return Figures(self._reduce(values, layout), len(grads))

    def tensor_figures(self, grad: torch.Tensor) -> torch.Tensor:
        """The (3,) float64 figures of one gradient (a registered tensor's), on its device."""
        g = dense(grad.detach() if grad.requires_grad else grad)
        if g.numel() == 0:
            return torch.zeros(3, dtype=torch.float64, device=g.device)
        row = self._large([g], g.dtype)[0]
        return torch.from_numpy(row) if isinstance(row, np.ndarray) else row

    def _layout(self, values: List[torch.Tensor]) -> Layout:
        groups: Dict[Tuple[torch.device, torch.dtype, bool], List[int]] = {}
        for i, g in enumerate(values):
            groups.setdefault((g.device, g.dtype, g.numel() <= self.small_numel), []).append(i)
        layout: Layout = []
        for (device, dtype, small), idx in groups.items():
            if not small:
                layout.append((device, dtype, False, idx, None))
                continue
            for batch in _batches(values, _by_trailing_shape(values, idx)):
                layout.append((device, dtype, True, batch, Segments([values[i] for i in batch])))
        return layout

    def _reduce(self, values: List[torch.Tensor], layout: Layout) -> Dict[torch.device, Tuple[List[int], Rows]]:
        per_device: Dict[torch.device, Tuple[List[int], List[Rows]]] = {}
        for device, dtype, small, idx, segments in layout:
            tensors = [values[i] for i in idx]
            if tensors[0].dtype != dtype or tensors[0].device != device:
                raise TypeError("cached layout no longer matches")
            positions, parts = per_device.setdefault(device, ([], []))
            positions.extend(idx)
            rows = self._small(tensors, segments) if small else self._large(tensors, dtype)
            # create_graph=True gradients require grad: their figures never join the graph (checked per
            # group, not per gradient; torch.no_grad() around every call cost more on small models).
            parts.append(rows.detach() if isinstance(rows, torch.Tensor) and rows.requires_grad else rows)
        return {dev: (pos, parts[0] if len(parts) == 1 else _joined(parts)) for dev, (pos, parts) in per_device.items()}

    # What a reduction defines: the (n, 3) figures of a batch of small gradients (concatenated,
    # ``segments`` says where each lies) and of large gradients of one dtype.
    def _small(self, tensors: List[torch.Tensor], segments: "Segments") -> Rows:
        raise NotImplementedError

    def _large(self, tensors: List[torch.Tensor], dtype: torch.dtype) -> Rows:
        raise NotImplementedError


def _joined(parts: List[Rows]) -> Rows:
    """One device's row groups as one array (all numpy on the host, all torch on a device)."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    return torch.cat([torch.from_numpy(p) if isinstance(p, np.ndarray) else p for p in parts])


def _batches(values: List[torch.Tensor], idx: List[int]) -> List[List[int]]:
    """``idx`` cut into runs of at most ``BATCH_NUMEL`` elements (one batch when they all fit)."""
    batches, current, size = [], [], 0
    for i in idx:
        n = values[i].numel()
        if current and size + n > BATCH_NUMEL:
            batches.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        batches.append(current)
    return batches


def _by_trailing_shape(values: List[torch.Tensor], idx: List[int]) -> List[int]:
    """``idx`` reordered so that gradients of one trailing shape (``shape[1:]``) sit together.

    Same-trailing-shape tensors concatenate along dim 0 in one ``torch.cat``, four
    times cheaper per tensor than flattening each; the rows come back in input order
    through the positions the layout keeps.
    """
    runs: Dict[Optional[Tuple[int, ...]], List[int]] = {}
    for i in idx:
        runs.setdefault(_trailing_shape(values[i]), []).append(i)
    return [i for members in runs.values() for i in members]


def _trailing_shape(t: torch.Tensor) -> Optional[Tuple[int, ...]]:
    """``shape[1:]``, what ``torch.cat`` along dim 0 needs to agree on; None for a 0-dim tensor (no dim 0)."""
    return tuple(t.shape[1:]) if t.dim() else None


class Segments:
    """Where each gradient of a small batch lies in its concatenated buffer (cached with the layout)."""

    __slots__ = ("lengths", "total", "count", "starts", "reduce_at", "filled", "runs")

    def __init__(self, tensors: List[torch.Tensor]):
        sizes = [t.numel() for t in tensors]
        # Slices of tensors with one trailing shape (and at least one dim): one torch.cat each.
        self.runs: List[Tuple[int, int]] = []
        shape = object()
        for k, t in enumerate(tensors):
            here = _trailing_shape(t)
            if here is None or here != shape or not self.runs:
                self.runs.append((k, k + 1))
            else:
                self.runs[-1] = (self.runs[-1][0], k + 1)
            shape = here
        self.lengths = torch.tensor(sizes, device=tensors[0].device)
        self.total = sum(sizes)
        self.count = len(sizes)
        lens = np.array(sizes, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        # numpy's reduceat gives an empty segment the next element instead of the identity:
        # reduce over the filled segments only, and leave the empty ones at zero.
        self.filled = None if lens.all() else lens > 0
        self.reduce_at = self.starts if self.filled is None else self.starts[self.filled]

    def end(self, i: int) -> int:
        return int(self.starts[i]) + int(self.lengths[i])

    def concatenated(self, tensors: List[torch.Tensor]) -> torch.Tensor:
        """Every tensor's elements, one after another: a ``torch.cat`` per run of one trailing shape."""
        runs = self.runs
        if len(runs) > len(tensors) // 4:  # mostly distinct shapes: one flatten is cheaper than many cats
            flat = flatten_dense_tensors(tensors)
        else:
            parts = [torch.cat(tensors[a:b]).reshape(-1) if b - a > 1 else tensors[a].reshape(-1) for a, b in runs]
            flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        if flat.numel() != self.total:  # the segment reductions trust the lengths: never let them be stale
            raise ValueError("cached segment lengths no longer match the gradients")
        return flat


# ---- on the host ---------------------------------------------------------------------------------


class HostReduction(Reduction):
    """Values on the host are read back freely: fast paths, and exact redos only where the figures say so."""

    name = "host"
    small_numel = HOST_SMALL_NUMEL

    def _small(self, tensors: List[torch.Tensor], segments: Segments) -> Rows:
        """One concatenation in torch, the segment reductions in numpy (about 1 us a call, not a few)."""
        if tensors[0].device.type != "cpu":
            return DEVICE._small(tensors, segments)
        n = segments.count
        if segments.total == 0:
            return np.zeros((n, 3))
        flat = segments.concatenated(tensors)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # bfloat16 and float16 values are exact in float32
        x = (flat.detach() if flat.requires_grad else flat).numpy()
        if x.dtype != np.float64:  # float32 squares in float64 cannot overflow: no warning to silence
            return _segment_figures_host(x, segments, n)
        with np.errstate(all="ignore"):  # float64 squares of extreme float64 gradients overflow: redone below
            return _segment_figures_host(x, segments, n)

    def _large(self, tensors: List[torch.Tensor], dtype: torch.dtype) -> Rows:
        """Each gradient read where it lies, twice in a row (the second read finds it in the cache):
        ``aminmax`` for max |x| and BLAS ``dot`` for the sum of squares (float32 or float64, as the values
        are); the rows that need it redone exactly (float64, scaled for float64 values); bfloat16/float16
        in float64 a chunk at a time (numpy has no bfloat16; no float32 copy of the whole)."""
        if tensors[0].device.type != "cpu":
            return DEVICE._large(tensors, dtype)
        narrow = dtype not in (torch.float32, torch.float64)
        bounds, norms = [], []
        for t in tensors:
            bounds.extend(torch.aminmax(t))
            norms.append(math.nan if narrow else _dot_norm(t))
        both = torch.stack(bounds)
        lows, highs = (both.detach() if both.requires_grad else both).to(torch.float64).numpy().reshape(-1, 2).T
        amax = np.maximum(highs, -lows)  # NaN propagates
        rows = np.zeros((len(tensors), 3))
        rows[:, 0] = norms
        rows[:, 1] = amax
        lo, hi = SAFE_RANGE.get(dtype, (0.0, math.inf))
        for i, (t, top, norm) in enumerate(zip(tensors, amax.tolist(), norms, strict=False)):
            if not math.isfinite(top):  # aminmax propagates NaN: the norm is NaN with a NaN, inf with only Infs
                rows[i, 0], rows[i, 2] = top, float(_nonfinite_count(t))
            elif top == 0.0:
                rows[i, 0] = 0.0  # every value is zero: so is the norm
            elif narrow:
                rows[i, 0] = float(_combined(foreach_norm(_chunks(t), 2, dtype=torch.float64)))
            elif not (lo <= top <= hi) or not math.isfinite(norm):
                # squares out of the dtype's safe range: float64 sums, float64 values scaled first
                rows[i, 0] = float(_exact_norm(t, scale_exponent(top) if dtype == torch.float64 else 0))
        return rows


def _dot_norm(t: torch.Tensor) -> float:
    """sqrt(sum x**2) of a float32/float64 gradient from BLAS dot products of ``DOT_NUMEL`` elements, their
    sum in float64 (no copy of a contiguous gradient). Exact to rounding where max |x| is in the dtype's
    safe range (the caller redoes the others); NaN where numpy cannot share the values (redone too)."""
    x = (t.detach() if t.requires_grad else t).reshape(-1)
    try:
        flat = x.numpy()
    except (RuntimeError, TypeError):  # a view numpy cannot share (a negative bit)
        return math.nan
    with np.errstate(all="ignore"):  # an out-of-range square overflows or underflows: that row is redone
        if flat.size <= DOT_NUMEL:
            return math.sqrt(float(np.dot(flat, flat)))
        return math.sqrt(math.fsum(float(np.dot(c, c)) for c in (flat[k:k + DOT_NUMEL]
                                                                 for k in range(0, flat.size, DOT_NUMEL))))


def _segment_figures_host(x: np.ndarray, segments: Segments, n: int) -> np.ndarray:
    at, filled = segments.reduce_at, segments.filled
    amax = np.maximum.reduceat(np.abs(x), at).astype(np.float64)  # NaN propagates
    wide = x.astype(np.float64)  # float32 squares neither under- nor overflow in float64
    sumsq = np.add.reduceat(wide * wide, at)
    if filled is not None:
        amax, sumsq = _spread(amax, filled), _spread(sumsq, filled)
    norms = np.sqrt(sumsq)
    if np.isfinite(sumsq).all():
        bad = np.zeros(n)
    else:
        bad = np.add.reduceat((~np.isfinite(x)).astype(np.float64), at)
        bad = bad if filled is None else _spread(bad, filled)
    if x.dtype == np.float64:
        lo, hi = SAFE_RANGE[torch.float64]
        for i in np.flatnonzero(np.isfinite(amax) & (amax > 0) & ((amax < lo) | (amax > hi) | ~np.isfinite(norms))):
            factor = math.ldexp(1.0, scale_exponent(float(amax[i])))
            scaled = wide[segments.starts[i]:segments.end(i)] * factor
            norms[i] = math.sqrt(float(np.dot(scaled, scaled))) / factor
    return np.stack([norms, amax, bad], axis=1)


def _spread(values: np.ndarray, filled: np.ndarray) -> np.ndarray:
    out = np.zeros(len(filled))
    out[filled] = values
    return out


def _max_abs(t: torch.Tensor) -> torch.Tensor:
    """max |t| in t's own dtype (exact, NaN propagating, no copy): ``aminmax`` beats the inf-norm."""
    lo, hi = torch.aminmax(t)
    return torch.maximum(hi, -lo)


def _combined(norms: Sequence[torch.Tensor]) -> torch.Tensor:
    """The norm of a tensor from the norms of its chunks (squared in float64: never under- or overflows here)."""
    if len(norms) == 1:
        return norms[0].to(torch.float64)
    return torch.stack(norms).to(torch.float64).square().sum().sqrt()


def _nonfinite_count(t: torch.Tensor) -> torch.Tensor:
    """How many elements are NaN or +-Inf, a chunk at a time (``isfinite`` makes a mask as large as its input)."""
    counts = [c.numel() - torch.isfinite(c).sum() for c in _chunks(t)]
    return counts[0] if len(counts) == 1 else torch.stack(counts).sum()


def _exact_norm(t: torch.Tensor, exponent: int) -> torch.Tensor:
    """``t``'s norm accumulated in float64, its values scaled by 2**exponent first (exact), chunk by chunk."""
    if exponent == 0:
        return _combined([torch.linalg.vector_norm(c, dtype=torch.float64) for c in _chunks(t)])
    factor = math.ldexp(1.0, exponent)
    return _combined([torch.linalg.vector_norm(c * factor) for c in _chunks(t)]) / factor


HOST = HostReduction()


# ---- on the device ---------------------------------------------------------------------------------


class DeviceReduction(Reduction):
    """No value is read back: every row takes the exact path (float64 sums, float64 values scaled)."""

    name = "device"

    def _small(self, tensors: List[torch.Tensor], segments: Segments) -> torch.Tensor:
        n = segments.count
        if segments.total == 0:
            return torch.zeros(n, 3, device=tensors[0].device, dtype=torch.float64)
        flat = segments.concatenated(tensors).to(torch.float64)
        lengths = segments.lengths
        # initial=0 keeps an empty gradient at zero instead of the identity (-inf).
        amax = torch.segment_reduce(flat.abs(), "max", lengths=lengths, unsafe=True, initial=0)
        if tensors[0].dtype == torch.float64:
            factor = _power_of_two_scale(amax)
            # output_size: repeat_interleave would otherwise read the lengths back to the host.
            flat = flat * torch.repeat_interleave(factor, lengths, output_size=segments.total)
        else:
            factor = None
        norms = torch.segment_reduce(flat * flat, "sum", lengths=lengths, unsafe=True, initial=0).sqrt()
        if factor is not None:
            norms = norms / factor
        bad = torch.segment_reduce((~torch.isfinite(flat)).to(flat.dtype), "sum", lengths=lengths, unsafe=True,
                                   initial=0)
        return torch.stack([norms, amax, bad], dim=1)

    def _large(self, tensors: List[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        amax = torch.stack([_max_abs(t) for t in tensors]).to(torch.float64)
        if dtype == torch.float64:
            factors = _power_of_two_scale(amax)
            norms = torch.stack([_combined([torch.linalg.vector_norm(c * f) for c in _chunks(t)])
                                 for t, f in zip(tensors, factors, strict=False)]) / factors
        else:
            norms = torch.stack([_combined(foreach_norm(_chunks(t), 2, dtype=torch.float64)) for t in tensors])
        bad = torch.stack([_nonfinite_count(t) for t in tensors]).to(torch.float64)
        return torch.stack([norms, amax, bad], dim=1)


def _power_of_two_scale(amax: torch.Tensor) -> torch.Tensor:
    """Per row, the power of two that brings max |g| near 1 where its float64 sum of squares is unsafe, else 1.

    ``scale_exponent`` on the device: a power of two scales exactly, so the norm is
    max-|g|-relative exact, and rows in the safe range (factor 1) give bitwise the
    unscaled result.
    """
    lo, hi = SAFE_RANGE[torch.float64]
    risky = torch.isfinite(amax) & (amax > 0) & ((amax < lo) | (amax > hi))
    shift = torch.where(risky, -torch.frexp(amax).exponent, 0).clamp(-1022, 1023)
    return torch.full_like(amax, 2.0).pow(shift.to(amax.dtype))


DEVICE = DeviceReduction()

REDUCTIONS = {"auto": HOST, "device": DEVICE}


def reduction_for(choice: str) -> Reduction:
    """``watch(statistics=...)``: "auto" (numpy for CPU values, the device elsewhere) or "device" (the device everywhere)."""
    return REDUCTIONS[choice]
