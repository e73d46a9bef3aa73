"""Facts about the values of registered tensors (``trace.tensor``): masks, advantages, log-probs.

Gradients are ``stats``' business; this module looks at what a registered
tensor holds when it is registered. Everything stays on the device as one
float64 vector per call; the live trace reads the vectors back in one batch.

* ``value_stats``: element count, mean and the sum of squared deviations from
  it (``m2``), min, max, exact zeros, NaN/Inf, rows and constant rows. The
  spread is taken around the call's own mean (two passes), never as a sum of
  squares minus a squared sum, which cancels: 1e8 + noise in float64 gave a
  std of 1.414 where the truth was 0.994. Calls are merged with Chan's update
  (``records.ValueStats.merge``), which stays exact across calls too.
* ``row_facts``: per-row facts of a data tensor (rows along the last dim):
  empty rows of a mask, padding sides, per-row std bins of a group tensor.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..records import VALUE_FIELDS
from .stats import dense


def value_stats(t: torch.Tensor) -> torch.Tensor:
    """Value facts of a tensor as one float64 device vector, in ``VALUE_FIELDS`` order; no host sync."""
    x = dense(t).detach()
    if x.is_complex():
        x = x.abs()
    x = x.to(torch.float64)
    n = x.numel()
    if n == 0:
        return torch.zeros(len(VALUE_FIELDS), dtype=torch.float64, device=x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    finite = torch.isfinite(x)
    count = finite.sum().to(x.dtype)
    mean = torch.where(finite, x, zero).sum() / count.clamp(min=1)
    m2 = torch.where(finite, x - mean, zero).square().sum()
    inf = torch.tensor(math.inf, dtype=x.dtype, device=x.device)
    lo = torch.where(finite, x, inf).min()
    hi = torch.where(finite, x, -inf).max()
    rows, const_rows = _constant_rows(x)
    return torch.stack([
        torch.tensor(float(n), dtype=x.dtype, device=x.device),
        mean, m2, lo, hi,
        (x == 0).sum().to(x.dtype), n - count,
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
    x = dense(t).detach()
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
    a = dense(attention_mask).detach()
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
