"""Gradient statistics computed on the device, in a few batched kernels.

A pass can reach thousands of parameters. Computing a norm per parameter costs
an op dispatch each (about 1.5 us on a CPU), so small gradients are flattened
into one buffer (a single C++ call) and reduced by segment; large ones go
through torch's fused foreach norm. Nothing here reads a value back to the host:
the caller moves the result in one transfer when the pass ends.
"""
from __future__ import annotations

import math
import operator
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from .._torch_compat import flatten_dense_tensors, foreach_norm
from ..records import VALUE_FIELDS

# On a CPU a value read back costs nothing (there is no device to wait for): the CPU paths
# reduce in numpy and redo the rare rows that need exact extra work after looking at them.
# The host-sync tests turn this off to run the accelerators' code path on a CPU.
HOST_READS_ARE_FREE = True


def host_reads_are_free(device: torch.device) -> bool:
    return HOST_READS_ARE_FREE and device.type == "cpu"


# Gradients up to this many elements are flattened and reduced together; the
# copy is cheap at this size and saves one dispatch per parameter.
SMALL_NUMEL = 1 << 16


def _dense(g: torch.Tensor) -> torch.Tensor:
    """A dense, local view of a gradient: sparse grads reduce over their values."""
    if g.is_sparse:
        return g.coalesce().values()
    to_local = getattr(g, "to_local", None)  # DTensor (FSDP2): statistics of the local shard
    if to_local is not None and callable(to_local):
        g = to_local()
    if g.is_complex():  # the modulus has the complex norm and max |g|; the real part alone does not
        return g.abs()
    return g


# (device, dtype, small?, positions, where each gradient of a small group lies in its flat buffer)
Layout = List[Tuple[torch.device, torch.dtype, bool, List[int], Optional["Segments"]]]


def grad_stats(grads: Sequence[torch.Tensor], layout_cache: Optional[Dict[Tuple, Layout]] = None,
               key: Optional[Tuple] = None) -> Dict[torch.device, Tuple[List[int], torch.Tensor]]:
    """Per gradient: (L2 norm, max |g|, NaN/Inf count), one (n, 3) tensor per device.

    Returns ``{device: (positions, stats)}`` where ``positions[i]`` is the index
    into ``grads`` of row ``i``. "Exactly zero" must be judged on max |g|: the
    float32 norm of ``[1e-30, 1e-30]`` is 0.

    Passes of a training loop reach the same parameters in the same order, so
    the grouping by (device, dtype, size) is cached under ``key``; a gradient
    that no longer fits its cached group sends the call down the full path.
    """
    layout = layout_cache.get(key) if layout_cache is not None and key is not None else None
    if layout is not None:
        try:
            return _reduce(list(grads), layout)
        except (RuntimeError, TypeError, ValueError):
            layout = None  # a gradient changed dtype, device or layout since: group again
    dense = [g if type(g) is torch.Tensor and g.layout is torch.strided and not g.is_complex() else _dense(g)
             for g in grads]
    groups: Dict[Tuple[torch.device, torch.dtype, bool], List[int]] = {}
    for i, g in enumerate(dense):
        groups.setdefault((g.device, g.dtype, g.numel() <= SMALL_NUMEL), []).append(i)
    layout = []
    for (device, dtype, small), idx in groups.items():
        if small and host_reads_are_free(device):
            idx = _by_trailing_shape(dense, idx)
        layout.append((device, dtype, small, idx, Segments([dense[i] for i in idx]) if small else None))
    # Cache only when every gradient was used as it is (a sparse or DTensor one was
    # replaced by its values); compare by identity: == on tensors is elementwise.
    if layout_cache is not None and key is not None and all(d is g for d, g in zip(dense, grads)):
        if len(layout_cache) >= 8:
            layout_cache.pop(next(iter(layout_cache)))
        layout_cache[key] = layout
    return _reduce(dense, layout)


def _reduce(dense: List[torch.Tensor], layout: Layout) -> Dict[torch.device, Tuple[List[int], torch.Tensor]]:
    per_device: Dict[torch.device, Tuple[List[int], List[torch.Tensor]]] = {}
    for device, dtype, small, idx, segments in layout:
        tensors = [dense[i] for i in idx]
        if tensors[0].dtype != dtype or tensors[0].device != device:
            raise TypeError("cached layout no longer matches")
        stats = _small_stats(tensors, segments) if small else _large_stats(tensors, dtype)
        positions, parts = per_device.setdefault(device, ([], []))
        positions.extend(idx)
        parts.append(stats)
    return {dev: (pos, parts[0] if len(parts) == 1 else torch.cat(parts)) for dev, (pos, parts) in per_device.items()}


def _by_trailing_shape(dense: List[torch.Tensor], idx: List[int]) -> List[int]:
    """``idx`` reordered so that gradients of one trailing shape (``shape[1:]``) sit together.

    Same-trailing-shape tensors concatenate along dim 0 in one ``torch.cat``, four
    times cheaper per tensor than flattening each; the rows come back in input order
    through the positions the layout keeps.
    """
    runs: Dict[Optional[Tuple[int, ...]], List[int]] = {}
    for i in idx:
        runs.setdefault(_trailing_shape(dense[i]), []).append(i)
    return [i for members in runs.values() for i in members]


def _trailing_shape(t: torch.Tensor) -> Optional[Tuple[int, ...]]:
    """``shape[1:]``, what ``torch.cat`` along dim 0 needs to agree on; None for a 0-dim tensor (no dim 0)."""
    return tuple(t.shape[1:]) if t.dim() else None


class Segments:
    """Where each gradient of a small group lies in the flattened buffer (cached with the layout)."""

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


def _small_stats(tensors: List[torch.Tensor], segments: Segments) -> torch.Tensor:
    if host_reads_are_free(tensors[0].device):
        return _small_stats_cpu(tensors, segments)
    return _small_stats_device(tensors, segments)


def _small_stats_cpu(tensors: List[torch.Tensor], segments: Segments) -> torch.Tensor:
    """The small group on a CPU: one flatten in torch, the segment reductions in numpy.

    A torch op costs a few microseconds of dispatch however small its input; a
    numpy reduction about one. Nothing waits on a device here, so the rare rows
    that need exact extra work (NaN/Inf counts, float64 norms out of the safe
    range) are found from the figures themselves and redone alone.
    """
    flat = _concatenated(tensors, segments.runs)
    if flat.numel() != segments.total:
        raise ValueError("cached segment lengths no longer match the gradients")
    n = segments.count
    if segments.total == 0:
        return torch.zeros(n, 3, dtype=torch.float64)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # bfloat16 and float16 values are exact in float32
    x = flat.numpy()
    if x.dtype != np.float64:  # float32 squares in float64 cannot overflow: no warning to silence
        return _reduce_on_host(x, segments, n)
    with np.errstate(all="ignore"):  # float64 squares of extreme float64 gradients overflow: redone below
        return _reduce_on_host(x, segments, n)


def _reduce_on_host(x: np.ndarray, segments: "Segments", n: int) -> torch.Tensor:
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
        lo, hi = _F64_SAFE
        for i in np.flatnonzero(np.isfinite(amax) & (amax > 0) & ((amax < lo) | (amax > hi) | ~np.isfinite(norms))):
            norms[i] = _exact_norm_host(wide[segments.starts[i]:segments.end(i)], float(amax[i]))
    return torch.from_numpy(np.stack([norms, amax, bad], axis=1))


def _concatenated(tensors: List[torch.Tensor], runs: List[Tuple[int, int]]) -> torch.Tensor:
    """Every tensor's elements, one after another: a ``torch.cat`` per run of one trailing shape."""
    if len(runs) > len(tensors) // 4:  # mostly distinct shapes: one flatten is cheaper than many cats
        return flatten_dense_tensors(tensors)
    parts = [torch.cat(tensors[a:b]).reshape(-1) if b - a > 1 else tensors[a].reshape(-1) for a, b in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _spread(values: np.ndarray, filled: np.ndarray) -> np.ndarray:
    out = np.zeros(len(filled))
    out[filled] = values
    return out


def _exact_norm_host(x: np.ndarray, top: float) -> float:
    """The norm of float64 values whose max |g| (``top`` > 0) squares out of range: scaled by a power of two."""
    factor = math.ldexp(1.0, max(-1022, min(1023, -math.frexp(top)[1])))
    scaled = x * factor
    return math.sqrt(float(np.dot(scaled, scaled))) / factor


def _small_stats_device(tensors: List[torch.Tensor], segments: Segments) -> torch.Tensor:
    # float64 squares cannot under- or overflow for any float32 (or narrower)
    # value (1e-30 or 1e25 gradients keep their norm); cheap at these sizes.
    # float64 gradients can: their rows are scaled first (_scaled_segment_norm).
    flat = flatten_dense_tensors(tensors).to(torch.float64)
    lengths, total = segments.lengths, segments.total
    if flat.numel() != total:  # segment_reduce(unsafe=True) trusts the lengths: never let them be stale
        raise ValueError("cached segment lengths no longer match the gradients")
    if flat.numel() == 0:
        return torch.zeros(len(tensors), 3, device=flat.device, dtype=flat.dtype)
    # initial=0 keeps an empty gradient at zero instead of the identity (-inf).
    amax = torch.segment_reduce(flat.abs(), "max", lengths=lengths, unsafe=True, initial=0)
    if tensors[0].dtype == torch.float64:
        norms = _scaled_segment_norm(flat, amax, lengths, total)
    else:
        norms = _segment_norm(flat, lengths)
    bad = torch.segment_reduce((~torch.isfinite(flat)).to(flat.dtype), "sum", lengths=lengths, unsafe=True, initial=0)
    return torch.stack([norms, amax, bad], dim=1)


def _segment_norm(flat: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return torch.segment_reduce(flat * flat, "sum", lengths=lengths, unsafe=True, initial=0).sqrt()


# A float64 sum of squares is exact (to rounding) while max |g| lies in this
# range: squares stay normal, and 2**32 of them stay finite. Outside it, 1e-200
# squares to 0 and 1e160 to inf.
_F64_SAFE = (2.0 ** -480, 2.0 ** 480)
# The same for a float32 sum of squares (the large path's _foreach_norm).
_F32_SAFE = (2.0 ** -60, 2.0 ** 40)


def _risky(amax: torch.Tensor) -> torch.Tensor:
    """Rows whose float64 sum of squares would under- or overflow."""
    return torch.isfinite(amax) & (amax > 0) & ((amax < _F64_SAFE[0]) | (amax > _F64_SAFE[1]))


def _power_of_two_scale(amax: torch.Tensor, risky: torch.Tensor) -> torch.Tensor:
    """Per row, a power of two that brings max |g| near 1 where ``risky``, else 1.

    A power of two scales exactly, so the norm is max-|g|-relative exact, and
    rows in the safe range (factor 1) give bitwise the unscaled result. The
    exponent is clamped to float64's normal range so the factor itself is finite
    and nonzero (max |g| then lands between 2**-51 and 4: still safe).
    """
    shift = torch.where(risky, -torch.frexp(amax).exponent, 0).clamp(-1022, 1023)
    return torch.full_like(amax, 2.0).pow(shift.to(amax.dtype))


def _scaled_segment_norm(flat: torch.Tensor, amax: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """Row-wise L2 norms of a float64 buffer that cannot under- or overflow (no host sync on an accelerator)."""
    factor = _power_of_two_scale(amax, _risky(amax))
    # output_size: repeat_interleave would otherwise read the lengths back to the host.
    scaled = flat * torch.repeat_interleave(factor, lengths, output_size=total)
    sumsq = torch.segment_reduce(scaled * scaled, "sum", lengths=lengths, unsafe=True, initial=0)
    return sumsq.sqrt() / factor


def _large_stats(tensors: List[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """(norm, max |g|, NaN/Inf count) of big gradients, exact, with no host sync on an accelerator.

    ``aminmax`` gives an exact max |g| (NaN propagates through it), cheaper than
    the inf-norm. The norm must not under- or overflow (a float32 sum of squares
    does when every |g| < 1e-19 or some |g| > 1e19, a float64 one below 1e-154
    or above 1e154). On an accelerator these reductions are memory-bound, so
    they all run: float32 work in float64, float64 work scaled by a power of two.
    On a CPU, where a float64 norm or a NaN count costs 10x a float32 norm,
    reading values back is free (there is no device to synchronise with), so
    the exact extra work runs only for the rare tensors that need it.
    """
    work = [t.float() for t in tensors] if dtype not in (torch.float32, torch.float64) else tensors
    extremes = [torch.aminmax(t) for t in work]
    amax = torch.stack([torch.maximum(hi, -lo) for lo, hi in extremes]).to(torch.float64)
    if not host_reads_are_free(work[0].device):
        if dtype == torch.float64:
            factor = _power_of_two_scale(amax, _risky(amax))
            norms = torch.stack([torch.linalg.vector_norm(t * f) for t, f in zip(work, factor)]) / factor
        else:
            norms = torch.stack(foreach_norm(work, 2, dtype=torch.float64))
        bad = torch.stack([torch.count_nonzero(t * 0) for t in work]).to(torch.float64)
        return torch.stack([norms, amax, bad], dim=1)
    norms = torch.stack(foreach_norm(work)).to(torch.float64)
    host_norms, host_amax = norms.tolist(), amax.tolist()
    lo, hi = _F64_SAFE if dtype == torch.float64 else _F32_SAFE
    bad = [0.0] * len(work)
    for i, (norm, top) in enumerate(zip(host_norms, host_amax)):
        if not math.isfinite(top):
            bad[i] = float(torch.count_nonzero(work[i] * 0))
        elif (top > 0.0 and not lo <= top <= hi) or not math.isfinite(norm):
            norms[i] = _exact_norm(work[i], top)
    return torch.stack([norms, amax, torch.tensor(bad, dtype=torch.float64)], dim=1)


def _exact_norm(t: torch.Tensor, top: float) -> torch.Tensor:
    """The norm of one tensor whose max |g| (``top``, > 0) is outside the safe range of its sum of squares."""
    if t.dtype != torch.float64:  # float32 squares never under- or overflow in float64
        return torch.linalg.vector_norm(t, dtype=torch.float64)
    # frexp: top = m * 2**e with m in [0.5, 1); a power-of-two factor scales exactly.
    factor = math.ldexp(1.0, max(-1022, min(1023, -math.frexp(top)[1])))
    return torch.linalg.vector_norm(t * factor) / factor


def stats_to_host(per_device: Dict[torch.device, Tuple[List[int], torch.Tensor]], n: int) -> np.ndarray:
    """The (n, 3) float64 figures in the order of the input list: one host transfer per device."""
    if len(per_device) == 1:
        positions, rows = next(iter(per_device.values()))
        if len(positions) == n and all(map(operator.eq, positions, range(n))):
            return rows.cpu().numpy()  # the common case: one device, one group, already in order
    out = np.zeros((n, 3))
    for positions, rows in per_device.values():
        out[np.asarray(positions, dtype=np.int64)] = rows.cpu().numpy()
    return out


def value_stats(t: torch.Tensor) -> torch.Tensor:
    """Value facts of a tensor as one float64 device vector (see ``VALUE_FIELDS``).

    Used for registered tensors (masks, advantages, log-probs): no host sync here,
    the vector is read when the trace is next looked at.
    """
    x = _dense(t).detach()
    if x.is_complex():
        x = x.abs()
    x = x.to(torch.float64)
    n = x.numel()
    if n == 0:
        return torch.zeros(len(VALUE_FIELDS), dtype=torch.float64, device=x.device)
    finite = torch.isfinite(x)
    xf = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    nonfinite = (~finite).sum()
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    lo = torch.where(finite, x, inf).min()
    hi = torch.where(finite, x, -inf).max()
    rows, const_rows = _constant_rows(x)
    return torch.stack([
        torch.tensor(float(n), dtype=x.dtype, device=x.device),
        xf.sum(), (xf * xf).sum(), lo, hi,
        (x == 0).sum().to(x.dtype), nonfinite.to(x.dtype),
        rows, const_rows,
    ])



def _constant_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows along the last dim whose elements are all equal; rows of one element do not count."""
    if x.dim() == 0 or x.shape[-1] < 2:
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return zero, zero
    rows = x.reshape(-1, x.shape[-1])
    const = (rows.amax(dim=1) == rows.amin(dim=1)).sum().to(x.dtype)
    return torch.tensor(float(rows.shape[0]), dtype=x.dtype, device=x.device), const


# ---- row facts of data tensors (masks, attention masks, advantage groups) ---------------


def row_facts(t: torch.Tensor, role: Optional[str],
              attention_mask: Optional[torch.Tensor] = None) -> Optional[Tuple[Tuple[str, ...], torch.Tensor]]:
    """Per-row facts of a registered data tensor as ``(keys, float64 device vector)``; None when it has none.

    Rows run along the last dim (one sequence, one group). A mask (``role`` "mask",
    "completion_mask", "attention_mask", or any bool tensor) gives how many rows
    select nothing and the selected lengths; an attention mask also how many rows
    are left / right padded; a completion mask paired with its attention mask how
    many selected positions fall on padding and how many empty rows still hold
    tokens. A "group" tensor (advantages, rewards) gives a histogram of per-row std
    (``ROW_STD_BINS``). Nothing is read back here.
    """
    x = _dense(t).detach()
    if x.dim() == 0 or x.numel() == 0:
        return None
    rows = x.reshape(-1, x.shape[-1])
    if role == "group":
        return _group_facts(rows)
    if role in ("mask", "completion_mask", "attention_mask") or (role is None and x.dtype == torch.bool):
        keys, parts = _mask_facts(rows != 0)
        if role == "attention_mask":
            k, p = _padding_facts(rows != 0)
            keys, parts = keys + k, parts + p
        if attention_mask is not None:
            k, p = _alignment_facts(rows != 0, _aligned_attention(attention_mask, x.shape))
            keys, parts = keys + k, parts + p
        return keys, torch.stack([q.to(torch.float64) for q in parts])
    return None


ROW_STD_BINS = ((0.0, "std 0"), (1e-6, "std <1e-6"), (1e-3, "std <1e-3"), (1e-1, "std <1e-1"),
                (math.inf, "std >=1e-1"))


def _mask_facts(selected: torch.Tensor):
    lengths = selected.sum(-1)
    return (("rows", "empty_rows", "selected_min", "selected_max", "selected_sum"),
            [torch.tensor(lengths.numel(), device=lengths.device), (lengths == 0).sum(), lengths.min(),
             lengths.max(), lengths.sum()])


def _padding_facts(tokens: torch.Tensor):
    has_tokens = tokens.any(-1)
    return (("left_padded", "right_padded"),
            [(has_tokens & ~tokens[:, 0]).sum(), (has_tokens & ~tokens[:, -1]).sum()])


def _alignment_facts(selected: torch.Tensor, tokens: torch.Tensor):
    k, p = _padding_facts(tokens)
    empty_with_tokens = (~selected.any(-1) & tokens.any(-1)).sum()
    return (("on_padding", "empty_with_tokens") + k, [(selected & ~tokens).sum(), empty_with_tokens] + p)


def _aligned_attention(attention_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The attention mask as rows matching the completion mask (shifted by one for next-token masks)."""
    a = _dense(attention_mask).detach()
    if a.shape[:-1] == shape[:-1] and a.shape[-1] == shape[-1] + 1:
        a = a[..., 1:]  # a mask over next-token log-probs covers positions 1..T-1
    if a.shape != shape:
        raise ValueError(f"the attention mask has shape {tuple(attention_mask.shape)}; the mask has "
                         f"{tuple(shape)} (the same, or one shorter along the last dim, is needed)")
    return (a != 0).reshape(-1, shape[-1])


def _group_facts(rows: torch.Tensor):
    x = rows.to(torch.float64)
    std = x.std(-1, unbiased=False) if x.shape[-1] > 1 else torch.zeros(x.shape[0], dtype=x.dtype,
                                                                         device=x.device)
    counts, lower = [], None
    for upper, _ in ROW_STD_BINS:
        inside = std == 0 if upper == 0.0 else (std > 0) & (std < upper) if lower == 0.0 else \
            (std >= lower) & (std < upper)
        counts.append(inside.sum().to(torch.float64))
        lower = upper
    return ("rows",) + tuple(label for _, label in ROW_STD_BINS), torch.stack(
        [torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)] + counts)
