"""Capture: parameters reachable under several names (tied weights).

``lm_head.weight`` and ``transformer.wte.weight`` are often one tensor: ``named_parameters()``
gives it once, under its first name, and freezing it through either name freezes both. At watch
entry the module walk already made (each module once) is read again without de-duplicating
parameters, and a module shared under a second name is walked again under that name; every
tensor met under two or more names is kept with the tensor, so its record says whether it
requires grad when the trace is judged.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..records import TiedParams
from .modules import named_modules


def tied_parameters(root: nn.Module, walk: Optional[List[Tuple[str, nn.Module]]] = None
                    ) -> List[Tuple[torch.Tensor, List[str]]]:
    """``(tensor, names)`` for every parameter tensor reachable under 2+ names, in module order."""
    walk = named_modules(root) if walk is None else walk
    first = {id(m): path for path, m in walk}
    names: Dict[int, List[Tuple[str, str]]] = {}  # (module path, parameter name): joined only for tied ones
    tensors: Dict[int, torch.Tensor] = {}

    def add(path: str, module: nn.Module) -> None:
        for name, p in module._parameters.items():
            if p is not None:
                names.setdefault(id(p), []).append((path, name))
                tensors[id(p)] = p

    # Which (parent, attribute) edges lead to each module: one for a module the tree holds once. (No path
    # strings per edge: a 3,000-deep model's paths are thousands of characters long.)
    edges: Dict[int, List[Tuple[str, str]]] = {}
    for path, module in walk:
        add(path, module)
        for name, child in module._modules.items():
            if child is not None:
                edges.setdefault(id(child), []).append((path, name))
    modules_by_id = {id(m): m for _, m in walk}
    for key, held_by in edges.items():
        if len(held_by) < 2:
            continue
        for parent, name in held_by:  # every second path of a shared module, after every first path
            path = f"{parent}.{name}" if parent else name
            if path != first[key]:
                for sub, m in named_modules(modules_by_id[key]):
                    add(path + (f".{sub}" if sub else ""), m)
    tied = []
    for key, found in names.items():
        if len(found) > 1:
            joined = list(dict.fromkeys(f"{path}.{name}" if path else name for path, name in found))
            if len(joined) > 1:
                tied.append((tensors[key], joined))
    return tied


def records(tied: List[Tuple[torch.Tensor, List[str]]]) -> List[TiedParams]:
    """The records, with ``requires_grad`` as it is now."""
    return [TiedParams(names=found, requires_grad=t.requires_grad, shape=list(t.shape)) for t, found in tied]
