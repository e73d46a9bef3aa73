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
    names: Dict[int, List[str]] = {}
    tensors: Dict[int, torch.Tensor] = {}

    def add(path: str, module: nn.Module) -> None:
        prefix = f"{path}." if path else ""
        for name, p in module._parameters.items():
            if p is not None:
                names.setdefault(id(p), []).append(prefix + name)
                tensors[id(p)] = p

    shared = []  # (a module's second path, the module): walked after every first path, as named_parameters does
    for path, module in walk:
        add(path, module)
        prefix = f"{path}." if path else ""
        shared.extend((prefix + name, child) for name, child in module._modules.items()
                      if child is not None and first.get(id(child)) != prefix + name)
    for path, child in shared:
        for sub, m in named_modules(child):
            add(path + (f".{sub}" if sub else ""), m)
    return [(tensors[key], list(dict.fromkeys(found))) for key, found in names.items() if len(set(found)) > 1]


def records(tied: List[Tuple[torch.Tensor, List[str]]]) -> List[TiedParams]:
    """The records, with ``requires_grad`` as it is now."""
    return [TiedParams(names=found, requires_grad=t.requires_grad, shape=list(t.shape)) for t, found in tied]
