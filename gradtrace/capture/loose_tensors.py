"""Capture: tensors that require grad, held by the watched model's modules, that are not parameters.

``self.scale = torch.ones(4, requires_grad=True)`` or ``self.weights = [nn.Parameter(...), ...]``
look like parameters and take part in the forward, and backward even gives them a ``.grad``; but
``nn.Module`` registered neither (only an ``nn.Parameter`` assigned as an attribute, or held in
``nn.ParameterList`` / ``nn.ParameterDict``, is). So they are in no ``model.parameters()``, no
optimizer built from it and no state dict: they never train, and gradtrace, which watches the
model's parameters, would never see them.

Found at watch entry by one look at each module's instance attributes (the module walk ``watch``
already made; a plain list, tuple or dict one level deep, its first ``MAX_ITEMS`` items): leaf
tensors that require grad and are none of the model's parameters. Kept by weak reference; the
records (did it get a gradient, is it in an optimizer the watch saw) are made when the trace is
judged, saved or closed.

The same look finds a module given a plain attribute ``requires_grad = False``
(``model.encoder.requires_grad = False``): ``nn.Module`` has no such switch, so nothing is frozen
(``requires_grad_(False)`` is the method). Named when the trace is judged, if its parameters still
require grad.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..records import IgnoredFreeze, LooseTensor

MAX_ITEMS = 64  # items of one list/tuple/dict attribute looked at (a cache of thousands is not a parameter list)
MAX_FOUND = 64  # tensors kept: a model that holds many is named by its first ones

# The attributes every nn.Module has (its parameter, buffer, submodule and hook dicts): never a user's tensor.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))

_Found = Tuple[str, str, Optional[str], str, "weakref.ref[torch.Tensor]"]  # owner, attribute, container, name, ref


def find(walk: List[Tuple[str, nn.Module]], params: List[torch.Tensor],
         optimizers: Callable[[], List[Any]]) -> "LooseTensors":
    """Every loose tensor of the walked modules (``walk``: ``capture.modules.named_modules``)."""
    registered = {id(p) for p in params}
    for _, module in walk:  # frozen parameters too: a frozen one is registered, not loose
        registered.update(id(p) for p in module._parameters.values() if p is not None)
    found: List[_Found] = []
    switches: List[Tuple[str, "weakref.ref[nn.Module]"]] = []
    for path, module in walk:
        for attribute, value in vars(module).items():
            if attribute in _MODULE_INTERNALS:
                continue
            if attribute == "requires_grad" and value is False:
                switches.append((path, weakref.ref(module)))
                continue
            for container, index, tensor in _tensors_in(value):
                if id(tensor) in registered or len(found) >= MAX_FOUND:
                    continue
                registered.add(id(tensor))  # held twice: named once
                owner_prefix = f"{path}." if path else ""
                found.append((path, attribute, container, f"{owner_prefix}{attribute}{index}", weakref.ref(tensor)))
    return LooseTensors(found, optimizers, switches)


def _tensors_in(value: Any) -> Iterator[Tuple[Optional[str], str, torch.Tensor]]:
    """(container type or None, index text, tensor) for each loose candidate in an attribute's value."""
    if isinstance(value, torch.Tensor):
        if _trainable_leaf(value):
            yield None, "", value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value[:MAX_ITEMS]):
            if isinstance(item, torch.Tensor) and _trainable_leaf(item):
                yield type(value).__name__, f"[{i}]", item
    elif isinstance(value, dict):
        for i, (key, item) in enumerate(value.items()):
            if i >= MAX_ITEMS:
                break
            if isinstance(item, torch.Tensor) and _trainable_leaf(item):
                yield "dict", f"[{key!r}]", item


def _trainable_leaf(t: torch.Tensor) -> bool:
    # A non-leaf requiring grad is a cached activation (an output kept for logging), not a would-be parameter.
    return t.requires_grad and t.is_leaf


class LooseTensors:
    def __init__(self, found: List[_Found], optimizers: Callable[[], List[Any]],
                 switches: Optional[List[Tuple[str, "weakref.ref[nn.Module]"]]] = None):
        self.found = found
        self.optimizers = optimizers
        self.switches = switches or []  # (path, module) given a plain attribute requires_grad = False

    def ignored_freezes(self) -> List[IgnoredFreeze]:
        """Modules set ``requires_grad = False`` as an attribute whose parameters still require grad."""
        out = []
        for path, ref in self.switches:
            module = ref()
            if module is None:
                continue
            params = list(module.parameters())
            trainable = sum(p.requires_grad for p in params)
            if trainable:
                out.append(IgnoredFreeze(module=path, module_type=type(module).__name__, trainable=trainable,
                                         got_grad=any(p.grad is not None for p in params if p.requires_grad)))
        return out

    def records(self) -> List[LooseTensor]:
        """One record per loose tensor still alive."""
        if not self.found:
            return []
        in_groups = {id(p) for optimizer in self.optimizers()
                     for group in getattr(optimizer, "param_groups", ()) if isinstance(group, dict)
                     for p in group.get("params", ())}
        out = []
        for owner, attribute, container, name, ref in self.found:
            t = ref()
            if t is None:
                continue
            out.append(LooseTensor(name=name, owner=owner, attribute=attribute, container=container,
                                   shape=list(t.shape), is_parameter=isinstance(t, nn.Parameter),
                                   got_grad=t.grad is not None,
                                   in_optimizer=(id(t) in in_groups) if in_groups else None))
        return out
