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

import itertools
import weakref
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..records import IgnoredFreeze, LooseTensor
from .modules import MODULE_INTERNALS, optimizer_param_ids

MAX_ITEMS = 64  # items of one list/tuple/dict attribute looked at (a cache of thousands is not a parameter list)
MAX_FOUND = 64  # tensors kept: a model that holds many is named by its first ones
MAX_NAME = 300  # characters of a name (a 3,000-deep model's paths, a dict key's repr): clipped in the middle
MAX_COMPARED = 256  # value comparisons with same-shaped parameters, to tell a copy (an anchor) apart

_Found = Tuple[str, str, Optional[str], str, "weakref.ref[torch.Tensor]", Optional[str]]
# (owner, attribute, container, name, tensor, the registered parameter it is a copy of)


def find(walk: List[Tuple[str, nn.Module]], params: List[torch.Tensor], names: List[str],
         optimizers: Callable[[], List[Any]]) -> "LooseTensors":
    """Every loose tensor of the walked modules (``walk``: ``capture.modules.named_modules``). Never raises:
    an attribute that cannot be read as a plain value is skipped."""
    registered = {id(p) for p in params}
    for _, module in walk:  # frozen parameters too: a frozen one is registered, not loose
        registered.update(id(p) for p in module._parameters.values() if p is not None)
    found: List[_Found] = []
    switches: List[Tuple[str, "weakref.ref[nn.Module]"]] = []
    copies = _Copies(params, names)
    for path, module in walk:
        for attribute, value in list(vars(module).items()):
            if attribute in MODULE_INTERNALS:
                continue
            if attribute == "requires_grad" and value is False:
                switches.append((path, weakref.ref(module)))
                continue
            try:
                candidates = list(_tensors_in(value))
            except Exception:  # a container of the user's that refuses to be read: not a parameter list
                continue
            for container, index, tensor in candidates:
                if id(tensor) in registered or len(found) >= MAX_FOUND:
                    continue
                registered.add(id(tensor))  # held twice: named once
                owner_prefix = f"{path}." if path else ""
                name = _clip(f"{owner_prefix}{attribute}{index}")
                found.append((_clip(path), _clip(attribute), container, name, weakref.ref(tensor),
                              copies.of(tensor)))
    return LooseTensors(found, optimizers, switches)


def _clip(text: str) -> str:
    if len(text) <= MAX_NAME:
        return text
    half = MAX_NAME // 2 - 2
    return f"{text[:half]}...{text[-half:]}"


def _tensors_in(value: Any) -> Iterator[Tuple[Optional[str], str, torch.Tensor]]:
    """(container type or None, index text, tensor) for each loose candidate in an attribute's value."""
    if isinstance(value, torch.Tensor):
        if _trainable_leaf(value):
            yield None, "", value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(itertools.islice(value, MAX_ITEMS)):
            if isinstance(item, torch.Tensor) and _trainable_leaf(item):
                yield type(value).__name__, f"[{i}]", item
    elif isinstance(value, dict):
        for key, item in itertools.islice(value.items(), MAX_ITEMS):
            if isinstance(item, torch.Tensor) and _trainable_leaf(item):
                yield "dict", f"[{_clip(repr(key))}]", item


def _trainable_leaf(t: torch.Tensor) -> bool:
    # A non-leaf requiring grad is a cached activation (an output kept for logging), not a would-be parameter;
    # a nested tensor is data.
    return t.requires_grad and t.is_leaf and not t.is_nested


class _Copies:
    """Which registered parameter a loose tensor is a copy of (same shape, dtype, device and values): a
    frozen anchor (L2-SP, EWC, a reference copy) is not a parameter meant to train."""

    def __init__(self, params: List[torch.Tensor], names: List[str]):
        self.params, self.names = params, names
        self.compared = 0

    def of(self, t: torch.Tensor) -> Optional[str]:
        for p, name in zip(self.params, self.names, strict=False):
            if self.compared >= MAX_COMPARED:
                return None
            if p.shape == t.shape and p.dtype == t.dtype and p.device == t.device and p.layout == t.layout:
                self.compared += 1
                try:
                    with torch.no_grad():
                        if torch.equal(p, t):
                            return name
                except Exception:  # a tensor subclass that cannot be compared: not a copy we can tell
                    return None
        return None


def _shape(t: torch.Tensor) -> List[int]:
    try:
        return [int(d) for d in t.shape]
    except Exception:  # symbolic sizes
        return []


class LooseTensors:
    def __init__(self, found: List[_Found], optimizers: Callable[[], List[Any]],
                 switches: Optional[List[Tuple[str, "weakref.ref[nn.Module]"]]] = None):
        self.found = found
        self.optimizers = optimizers
        self.switches = switches or []  # (path, module) given a plain attribute requires_grad = False

    def ignored_freezes(self) -> List[IgnoredFreeze]:
        """Modules set ``requires_grad = False`` as an attribute whose parameters still require grad and got
        gradients (a module keeping its own flag for torch.set_grad_enabled gets none: not named)."""
        out = []
        for path, ref in self.switches:
            module = ref()
            if module is None:
                continue
            trainable = [p for p in module.parameters() if p.requires_grad]
            if trainable and any(p.grad is not None for p in trainable):
                out.append(IgnoredFreeze(module=_clip(path), module_type=type(module).__name__,
                                         trainable=len(trainable), got_grad=True))
        return out

    def records(self) -> List[LooseTensor]:
        """One record per loose tensor still alive."""
        if not self.found:
            return []
        in_groups = optimizer_param_ids(self.optimizers())
        out = []
        for owner, attribute, container, name, ref, copy_of in self.found:
            t = ref()
            if t is None:
                continue
            out.append(LooseTensor(name=name, owner=owner, attribute=attribute, container=container,
                                   shape=_shape(t), is_parameter=isinstance(t, nn.Parameter),
                                   got_grad=t.grad is not None, copy_of=copy_of,
                                   in_optimizer=(id(t) in in_groups) if in_groups else None))
        return out
