"""Capture: modules that run inside the watched model's forward without being its submodules.

Layers kept in a plain Python list or dict (``self.layers = [nn.Linear(...), ...]``) run in
the forward like any other, but ``nn.Module`` never registered them: their parameters are in
no ``model.parameters()``, no optimizer built from it, no state dict, and ``.to()`` /
``.train()`` never reach them. Gradtrace's own hooks are on registered modules only, so it
needs torch's global module hook to see them: registered when the watched model's forward
begins and removed when it ends (``always_call``: even when it raises), so other models'
forwards (a reference model, generation outside the model) never pay for it.

Sampled (issue 23): the global hook sends every module call down ``Module.__call__``'s slow
path (about 4.6 us a call on a 2-core CPU), and a model's structure rarely changes between
steps. So it is registered only in the first ``FIRST_FORWARDS`` grad-enabled watched forwards
and then in one out of every ``SAMPLE_EVERY``; a layer kept in a plain list runs in every
forward, so it is seen in the first; a module made fresh on every forward is seen in the
sampled ones. ``calls`` in the records counts the calls seen in sampled forwards.

The hook only counts calls of modules it does not know. Everything else (which attribute holds
the module, its parameters) is looked up once, at its first call; the records are made when
the trace is judged, saved or closed.
"""
from __future__ import annotations

import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from ..records import UnregisteredModule
from .frames import innermost_module
from .hook_state import ModuleHook
from .modules import MODULE_INTERNALS, optimizer_param_ids

_dynamo_compiling = torch.compiler.is_dynamo_compiling

is_grad_enabled = torch.is_grad_enabled

# Sightings kept, and module attributes searched for a holder: a forward that makes new modules on every
# call (a bug of its own) must not make the watch grow or slow down without bound.
MAX_SIGHTINGS = 64
# The global hook is on in the first this many grad-enabled watched forwards, then in one out of SAMPLE_EVERY.
FIRST_FORWARDS = 3
SAMPLE_EVERY = 64


@dataclass
class _Sighting:
    module: "weakref.ref[nn.Module]"
    module_type: str
    called_in: Optional[str]
    outside: List["weakref.ref[torch.Tensor]"]  # its parameters that are not the watched model's
    trainable: int
    holder: Optional[Tuple[str, str, str, str]] = None  # (owner, attribute, container, display name)
    submodules: Set[int] = field(default_factory=set)
    calls: int = 0
    with_grad: bool = False


class UnregisteredModules:
    """Sees module calls inside the watched forward that are not the watched model's submodules."""

    def __init__(self, root: nn.Module, walk: List[Tuple[str, nn.Module]],
                 optimizers: Optional[Callable[[], List[Any]]] = None):
        self.root = root
        self.optimizers = optimizers  # the optimizers seen stepping (and the one watch was given), when asked
        self.walk = walk
        self.names: Dict[int, str] = {id(m): name for name, m in walk}
        self.model_params: Set[int] = {id(p) for _, m in walk for p in m._parameters.values() if p is not None}
        self.seen: Dict[int, _Sighting] = {}
        self.gone: List[_Sighting] = []  # sightings of modules that died (made on the fly) before their id came back
        self.lock = threading.Lock()
        self.depth: Dict[int, int] = {}  # thread id -> watched forwards open in it
        self.handle = None  # the global hook's handle while a watched forward runs
        self.forwards = 0  # grad-enabled watched forwards begun (the outermost in their thread)

    def attach(self, register: Callable[[Any], None], root_site=None) -> None:
        """Hooks on the root that put the global hook on around its forward; ``register`` keeps their handles.
        With ``root_site`` (the cut detector's ``ModuleSite`` of the root, seen through a forward wrapper:
        capture/module_calls.py) its wrapper calls them instead, and the model's call keeps its fast path."""
        register(self)  # removal (as a handle): a forward still running at exit takes the global hook with it
        if root_site is not None:
            root_site.around = (self._begin, self._end)
            return
        # ModuleHook: copy.deepcopy(model), pickle and torch.save inside the watch give the copy an inert
        # LeftBehind, which takes itself out (a closure was kept by the copy, and could not be pickled).
        register(self.root.register_forward_pre_hook(ModuleHook(self._begin)))
        register(self.root.register_forward_hook(ModuleHook(self._end), always_call=True))

    def remove(self) -> None:
        with self.lock:
            self.depth.clear()
            if self.handle is not None:
                self.handle.remove()
                self.handle = None

    def _begin(self, module, args) -> None:
        if module is not self.root or _dynamo_compiling():
            # (a copy of the watched model carried a hook: its forward is not watched; torch.compile tracing:
            # nothing to register at trace time, and the thread lookup would break the graph)
            return
        thread = threading.get_ident()
        if not is_grad_enabled() and thread not in self.depth:
            return  # generation, evaluation: nothing there trains, and a token loop must not pay for the hook
        with self.lock:
            depth = self.depth.get(thread, 0)
            self.depth[thread] = depth + 1
            if depth == 0:
                self.forwards += 1
                if self.handle is None and self.sampled(self.forwards):
                    self.handle = register_module_forward_hook(self._on_call)

    @staticmethod
    def sampled(forward: int) -> bool:
        """Is the global hook on in the ``forward``-th grad-enabled watched forward (from 1)?"""
        return forward <= FIRST_FORWARDS or forward % SAMPLE_EVERY == 0

    def _end(self, module, args, output) -> None:
        if module is not self.root or _dynamo_compiling():
            return
        thread = threading.get_ident()
        if thread not in self.depth:
            return
        with self.lock:
            depth = self.depth.get(thread, 0) - 1
            if depth > 0:
                self.depth[thread] = depth
            else:
                self.depth.pop(thread, None)
            if not self.depth and self.handle is not None:
                self.handle.remove()
                self.handle = None

    def _on_call(self, module, args, output) -> None:
        """The global forward hook: every module call in the process while a watched forward runs."""
        key = id(module)
        if key in self.names:
            return
        if threading.get_ident() not in self.depth:
            return  # another thread's module, not the watched forward's
        sighting = self.seen.get(key)
        if sighting is None or sighting.module() is not module:
            outside = [p for p in module.parameters() if id(p) not in self.model_params]
            if not outside or len(self.seen) + len(self.gone) >= MAX_SIGHTINGS:
                return  # nothing of it is lost (a loss module made on the fly, a shared layer); or too many
            if sighting is not None:  # a module that died, whose id a new one took: kept as it was
                self.gone.append(sighting)
            sighting = self.seen[key] = self._first_sight(module, outside, sys._getframe(1))
        sighting.calls += 1
        if sighting.trainable and is_grad_enabled():
            sighting.with_grad = True

    def _first_sight(self, module: nn.Module, outside: List[torch.Tensor], frame) -> _Sighting:
        return _Sighting(weakref.ref(module), type(module).__name__, self._called_in(frame),
                         [weakref.ref(p) for p in outside], sum(1 for p in outside if p.requires_grad),
                         holder=self._holder(module), submodules={id(m) for m in module.modules() if m is not module})

    def _called_in(self, frame) -> Optional[str]:
        """The innermost watched module whose forward is on the stack."""
        module = innermost_module(frame, self.names)
        return self.names[id(module)] if module is not None else None

    def _holder(self, module: nn.Module) -> Optional[Tuple[str, str, str, str]]:
        """The watched module attribute (a list, tuple or dict, or one inside one) that holds ``module``."""
        for owner, m in self.walk:
            for attribute, value in vars(m).items():
                if attribute in MODULE_INTERNALS:  # nn.Module's own bookkeeping; a user's `_layers` is searched
                    continue
                found = _find_in(value, module)
                if found is not None:
                    container, index = found
                    prefix = f"{owner}." if owner else ""
                    return owner, attribute, container, f"{prefix}{attribute}{index}"
        return None

    # ---- records -----------------------------------------------------------------------
    def records(self) -> List[UnregisteredModule]:
        """One record per outermost unregistered module seen (its unregistered submodules fold into it)."""
        sightings = list(self.seen.values())
        inner: Set[int] = set().union(*(s.submodules for s in sightings)) if sightings else set()
        everything = [(key, s) for key, s in self.seen.items()] + [(None, s) for s in self.gone]
        out = []
        anonymous: Dict[Tuple[str, Optional[str]], int] = {}
        optimizer_params = optimizer_param_ids(self.optimizers() if self.optimizers is not None else ())
        for key, s in everything:
            if key is not None and key in inner:
                continue
            params = [p for p in (ref() for ref in s.outside) if p is not None]
            if s.holder is not None:
                owner, attribute, container, name = s.holder
            else:
                owner = attribute = container = None
                index = anonymous[(s.module_type, s.called_in)] = anonymous.get((s.module_type, s.called_in), -1) + 1
                where = f"module {s.called_in}" if s.called_in else "the root module"
                name = f"<{s.module_type} #{index} made in the forward of {where}>"
            in_optimizer = None
            if optimizer_params and params:
                in_optimizer = all(id(p) in optimizer_params for p in params)
            out.append(UnregisteredModule(
                module=name, module_type=s.module_type, owner=owner, attribute=attribute, container=container,
                called_in=s.called_in, calls=s.calls, params=len(s.outside), trainable=s.trainable,
                with_grad=s.with_grad, got_grad=any(p.grad is not None for p in params), in_optimizer=in_optimizer))
        return out


def _find_in(value: Any, module: nn.Module, depth: int = 0) -> Optional[Tuple[str, str]]:
    """(container type, index text) when ``value`` is a list/tuple/dict holding ``module`` (two levels deep)."""
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if item is module:
                return type(value).__name__, f"[{i}]"
            if depth == 0 and isinstance(item, (list, tuple, dict)):
                found = _find_in(item, module, 1)
                if found is not None:
                    return type(value).__name__, f"[{i}]{found[1]}"
    elif isinstance(value, dict):
        for k, item in value.items():
            if item is module:
                return "dict", f"[{k!r}]"
            if depth == 0 and isinstance(item, (list, tuple, dict)):
                found = _find_in(item, module, 1)
                if found is not None:
                    return "dict", f"[{k!r}]{found[1]}"
    return None
