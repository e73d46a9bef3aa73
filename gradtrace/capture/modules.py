"""The module tree, walked once and without recursion.

``nn.Module.named_modules`` is a recursive generator: every item of a module
nested d deep passes through d generator frames, so one walk of a 3,000-deep
model costs millions of calls (and Python's recursion limit). These walks use
an explicit stack and give the same names, in the same order, with the same
de-duplication of shared modules and parameters.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn


# The attributes every nn.Module has (its parameter, buffer, submodule and hook dicts): never a user's own
# list, dict or tensor (capture/unregistered.py and capture/loose_tensors.py search the others).
MODULE_INTERNALS = frozenset(vars(nn.Module()))


def optimizer_param_ids(optimizers: Iterable[Any]) -> Set[int]:
    """``id`` of every tensor in a param group of ``optimizers`` (any object with ``param_groups``)."""
    return {id(p) for optimizer in optimizers
            for group in getattr(optimizer, "param_groups", ()) if isinstance(group, dict)
            for p in group.get("params", ())}


def named_modules(root: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``root.named_modules()``, as a list: pre-order, each module once (under its first path)."""
    out: List[Tuple[str, nn.Module]] = []
    seen = set()
    stack = [("", root)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        out.append((path, module))
        # module._modules is what named_children() walks (None entries skipped), without its generator.
        prefix = f"{path}." if path else ""
        children = [(prefix + name, child) for name, child in module._modules.items() if child is not None]
        stack.extend(reversed(children))  # the first child is walked first
    return out


def named_parameters(root: nn.Module, modules: Optional[List[Tuple[str, nn.Module]]] = None
                     ) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """``root.named_parameters()``: each parameter once, under its first path (``modules``: a walk already made)."""
    seen = set()
    for path, module in named_modules(root) if modules is None else modules:
        # module._parameters is what named_parameters(recurse=False) walks, minus a generator
        # stack and a set of tensors per module (a third of entering a watch on 1,000 modules).
        for name, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield (f"{path}.{name}" if path else name), p
