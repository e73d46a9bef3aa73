"""Inner products between two passes' gradients, optionally Adam-preconditioned.

The entropy probe's ``U_cross`` is ``sum_p <g_X, g_Y / (sqrt(v_hat) + eps)>``
with ``v_hat = exp_avg_sq / (1 - beta2**step)``, read from the optimizer's own
state. Everything is reduced on the device and read back once.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from ..errors import GradtraceError
from ..records import Contribution, InnerProduct

TOP = 10


def adam_denominators(optimizer: Any, params: Dict[str, torch.Tensor], names: List[str]) -> Dict[str, torch.Tensor]:
    """``sqrt(v_hat) + eps`` per parameter name, from an Adam/AdamW optimizer's state."""
    groups = getattr(optimizer, "param_groups", None)
    state = getattr(optimizer, "state", None)
    if groups is None or state is None:
        raise GradtraceError(f"precondition= takes a torch optimizer (Adam/AdamW), got {type(optimizer).__name__}")
    settings = {}
    for group in groups:
        if "betas" not in group or "eps" not in group:
            raise GradtraceError(f"precondition= needs Adam-style 'betas' and 'eps'; {type(optimizer).__name__} "
                                 "has none. Use torch.optim.Adam or AdamW.")
        for p in group["params"]:
            settings[id(p)] = group
    out = {}
    for name in names:
        p = params[name]
        group = settings.get(id(p))
        s = state.get(p) if group is not None else None
        if group is None:
            raise GradtraceError(f"parameter {name!r} is not in the optimizer passed as precondition=")
        if not s or "exp_avg_sq" not in s:
            raise GradtraceError(f"the optimizer has no second-moment state (exp_avg_sq) for {name!r}: "
                                 f"{type(optimizer).__name__} is not Adam-like, or it has not taken a step yet")
        step = s.get("step", 0)
        step = float(step.item()) if isinstance(step, torch.Tensor) else float(step)
        if step <= 0:
            raise GradtraceError(f"the optimizer state for {name!r} has step 0: take an optimizer step first")
        beta2 = group["betas"][1]
        v_hat = s["exp_avg_sq"] / (1.0 - beta2 ** step)
        out[name] = v_hat.sqrt().add_(group["eps"])
    return out


def inner_products(a: str, b: str, grads_a: Dict[str, torch.Tensor], grads_b: Dict[str, torch.Tensor],
                   precondition: Optional[Any], params: Dict[str, torch.Tensor]) -> InnerProduct:
    common = [n for n in grads_a if n in grads_b]
    denoms = adam_denominators(precondition, params, common) if precondition is not None else {}
    contributions, sq_a, sq_b, sq_a_pre, sq_b_pre = [], [], [], [], []
    for n in common:
        ga, gb = grads_a[n].double(), grads_b[n].double()
        d = denoms.get(n)
        if d is not None:
            d = d.double()
            contributions.append((ga * gb / d).sum())
            sq_a_pre.append(((ga / d) ** 2).sum())
            sq_b_pre.append(((gb / d) ** 2).sum())
        else:
            contributions.append((ga * gb).sum())
    for g in grads_a.values():
        sq_a.append(g.double().pow(2).sum())
    for g in grads_b.values():
        sq_b.append(g.double().pow(2).sum())
    host = _host(contributions, sq_a, sq_b, sq_a_pre, sq_b_pre)
    contrib, sq_a, sq_b, sq_a_pre, sq_b_pre = host
    dot = sum(contrib)
    norm_a, norm_b = sum(sq_a) ** 0.5, sum(sq_b) ** 0.5
    preconditioned = precondition is not None
    return InnerProduct(
        a=a, b=b, preconditioned=preconditioned, dot=dot, norm_a=norm_a, norm_b=norm_b,
        cosine=dot / (norm_a * norm_b) if norm_a and norm_b and not preconditioned else None,
        top=[Contribution(n, c, c / abs(dot) if dot else 0.0)
             for n, c in sorted(zip(common, contrib, strict=False), key=lambda x: -abs(x[1]))[:TOP]],
        numel_b=sum(grads_b[n].numel() for n in common),
        norm_a_pre=sum(sq_a_pre) ** 0.5 if preconditioned else None,
        norm_b_pre=sum(sq_b_pre) ** 0.5 if preconditioned else None,
        optimizer=type(precondition).__name__ if preconditioned else None)


def _host(*groups: List[torch.Tensor]) -> List[List[float]]:
    """All scalars of all groups in one transfer per device."""
    flat = [t for g in groups for t in g]
    if not flat:
        return [[] for _ in groups]
    by_device: Dict[torch.device, List[int]] = {}
    for i, t in enumerate(flat):
        by_device.setdefault(t.device, []).append(i)
    values = [0.0] * len(flat)
    for idx in by_device.values():
        for i, v in zip(idx, torch.stack([flat[i] for i in idx]).tolist(), strict=False):
            values[i] = v
    out, start = [], 0
    for g in groups:
        out.append(values[start:start + len(g)])
        start += len(g)
    return out
