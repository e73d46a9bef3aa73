"""Reachability: which parameters a tensor's graph can reach, before any backward.

An iterative walk of ``grad_fn.next_functions`` down to ``AccumulateGrad``
nodes (a loop with a seen-set: big graphs would overflow a recursive walk).
It runs no backward and touches no ``.grad``. Reentrant checkpointing hides
the segment's parameters until recompute, so its node marks the answer as
partial ("may reach more") rather than wrong.
"""
from __future__ import annotations

from typing import Dict, Set, Tuple

import torch


def reachable_params(t: torch.Tensor, names_by_id: Dict[int, str]) -> Tuple[Set[str], bool]:
    """(names of watched parameters reachable from ``t``, partial?)"""
    found: Set[str] = set()
    partial = False
    if t.grad_fn is None:
        if t.requires_grad and id(t) in names_by_id:
            found.add(names_by_id[id(t)])
        return found, partial
    stack = [t.grad_fn]
    seen = {t.grad_fn}
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)
        if variable is not None:  # AccumulateGrad: a leaf
            name = names_by_id.get(id(variable))
            if name is not None:
                found.add(name)
            continue
        if "CheckpointFunction" in type(node).__name__:
            partial = True
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return found, partial
