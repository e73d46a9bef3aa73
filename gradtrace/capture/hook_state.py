"""Leave nothing behind: put the tensors' hook containers back as ``watch`` found them.

Removing a hook through its ``RemovableHandle`` empties the container but does
not give it back: ``Tensor.register_hook`` turned ``_backward_hooks`` from
None into a dict, and for as long as that dict exists (even empty) the
engine calls into Python for the tensor on every later backward (about
2 us per parameter per backward, measured on 2,000 leaves). Setting the
attribute back to None drops the C++ pre-hook with it.

Only containers that were None before the watch and are empty after it are
reset: a hook the user registered during the watch keeps its container, its
order and its place. Module hook dicts need nothing here: they are never
None, and handle removal leaves exactly the keys they held.

One thing cannot be undone from Python: assigning None to
``_post_accumulate_grad_hooks`` clears the attribute but leaves the C++
post-accumulate hook in place (torch 2.13 can replace it, never remove it),
still holding the old, empty dict, so AccumulateGrad keeps calling into
Python for it (about 1 us per parameter per backward). That is why ``watch``
puts post-accumulate hooks only on tensor-subclass parameters (FSDP2's
DTensor), where tensor hooks do not fire.
"""
from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections import OrderedDict
from typing import AbstractSet, Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["ModuleHook", "LeftBehind", "HookBatch", "ParamHooks", "HookSnapshot", "is_plain", "keep_last",
           "restore"]

# The containers ``Tensor.register_hook`` / ``register_post_accumulate_grad_hook`` create.
_CONTAINERS = ("_backward_hooks", "_post_accumulate_grad_hooks")


def _none_containers(tensor: torch.Tensor) -> List[str]:
    return [name for name in _CONTAINERS if getattr(tensor, name) is None]


def is_plain(tensor: torch.Tensor) -> bool:
    """A plain tensor or parameter, not a subclass (DTensor): its hooks can go straight into its containers."""
    return type(tensor) in (torch.Tensor, nn.Parameter)


class ModuleHook(functools.partial):
    """A gradtrace hook in a module's hook dicts: it works on the module it was put on, nowhere else.

    ``copy.deepcopy(model)`` inside a watch (a reference or EMA model) copies the
    module's hook dicts, and ``torch.save(model)`` / ``pickle`` pickle them. A
    copy gets a :class:`LeftBehind` instead of the hook: picklable, holding
    nothing of the trace, and gone from the copy the first time the copy runs.
    (A ``functools.partial``: called from C, it adds no Python frame per call.)
    """

    __slots__ = ()

    def __reduce__(self):
        return LeftBehind, ()

    def __copy__(self) -> "LeftBehind":
        return LeftBehind()

    def __deepcopy__(self, memo) -> "LeftBehind":
        return LeftBehind()


class LeftBehind:
    """What a copied or unpickled module holds where gradtrace's hook was: it does nothing, and on its
    first call takes itself out of the module's hook dicts (so the copy's forward is fast again)."""

    __slots__ = ("__weakref__",)

    def __call__(self, module: nn.Module, *rest: Any) -> None:
        if sys.exc_info()[0] is not None:
            return  # called while a forward raises: torch walks the live dict, which must not change now
        dicts = [d for name, d in vars(module).items() if name.startswith("_forward") and isinstance(d, dict)]
        mine = [key for d in dicts for key, value in list(d.items()) if value is self]
        for d in dicts:  # the hook dicts and their with_kwargs / always_called companions
            for key in mine:
                d.pop(key, None)


class HookSnapshot:
    """Which containers were None before gradtrace registered anything, per tensor."""

    def __init__(self) -> None:
        # id -> (weak ref, names of the containers that were None). Weak: a tensor
        # registered with trace.tensor in every step of a long watch must not be
        # kept alive by this; a tensor that died took its containers with it.
        self._none: Dict[int, Tuple[weakref.ref, List[str]]] = {}
        # The watched parameters themselves: held strongly (the watch holds them anyway), with no
        # weak reference and callback per parameter.
        self._held: List[Tuple[torch.Tensor, List[str]]] = []

    def hold(self, tensors: Iterable[torch.Tensor]) -> None:
        """``note`` for tensors that outlive the watch (its parameters); each given once."""
        held = self._held
        for tensor in tensors:
            names = _none_containers(tensor)
            if names:
                held.append((tensor, names))

    def note(self, tensor: torch.Tensor) -> None:
        """Record ``tensor``'s containers before the first gradtrace hook goes on it."""
        key = id(tensor)
        entry = self._none.get(key)
        if entry is not None and entry[0]() is tensor:
            return
        self._none[key] = (weakref.ref(tensor, self._forget(key)), _none_containers(tensor))

    def _forget(self, key: int) -> Callable[[weakref.ref], None]:
        def forget(ref: weakref.ref) -> None:
            entry = self._none.get(key)
            if entry is not None and entry[0] is ref:  # not a newer tensor that reused the id
                del self._none[key]
        return forget

    def tensors(self) -> Iterator[Tuple[torch.Tensor, List[str]]]:
        yield from self._held
        for ref, names in list(self._none.values()):
            tensor = ref()
            if tensor is not None:
                yield tensor, names


class HookBatch:
    """Many hooks put straight into their containers, removed together.

    ``Tensor.register_hook`` and ``Module.register_forward_hook`` each build a
    ``RemovableHandle`` (a weak reference and an id) and, for a tensor, handle
    ``__torch_function__`` first: about 4 us per hook on a 2-core CPU, most of
    what entering a watch cost. For plain tensors and parameters, and for
    modules, this does what those methods do to the containers themselves, with
    ids taken from ``RemovableHandle``'s own counter so they never collide with
    a user's. Tensor subclasses (DTensor) go through ``register_hook`` as they are.
    """

    def __init__(self) -> None:
        self._entries: List[Tuple[Any, ...]] = []  # (container, id, ...) or (handle,)

    @staticmethod
    def _new_id() -> int:
        hook_id = RemovableHandle.next_id
        RemovableHandle.next_id += 1
        return hook_id

    def tensor_hook(self, tensor: torch.Tensor, hook: Callable) -> int:
        """``tensor.register_hook(hook)``; the hook's id."""
        if not is_plain(tensor) or not tensor.requires_grad:
            handle = tensor.register_hook(_unserializable(hook))  # its checks and errors, and __torch_function__
            self._entries.append((handle,))
            return handle.id
        hooks = tensor._backward_hooks
        if hooks is None:
            # What register_hook does: assigning the dict installs the engine's pre-hook on a leaf.
            hooks = tensor._backward_hooks = OrderedDict()
            if tensor.grad_fn is not None:
                tensor.grad_fn._register_hook_dict(tensor)
        hook_id = self._new_id()
        hooks[hook_id] = _unserializable(hook)
        self._entries.append((hooks, hook_id))
        return hook_id

    def forward_hook(self, module: nn.Module, hook: Callable, always_call: bool = False) -> None:
        """``module.register_forward_hook(hook, with_kwargs=True, always_call=always_call)``."""
        hook_id = self._new_id()
        module._forward_hooks[hook_id] = ModuleHook(hook)
        module._forward_hooks_with_kwargs[hook_id] = True
        extra = [module._forward_hooks_with_kwargs]
        if always_call:
            module._forward_hooks_always_called[hook_id] = True
            extra.append(module._forward_hooks_always_called)
        self._entries.append((module._forward_hooks, hook_id, *extra))

    def forward_pre_hook(self, module: nn.Module, hook: Callable) -> None:
        """``module.register_forward_pre_hook(hook, with_kwargs=True)``."""
        hook_id = self._new_id()
        module._forward_pre_hooks[hook_id] = ModuleHook(hook)  # a copy of the module gets a LeftBehind
        module._forward_pre_hooks_with_kwargs[hook_id] = True
        self._entries.append((module._forward_pre_hooks, hook_id, module._forward_pre_hooks_with_kwargs))

    def forward_wrapper(self, module: nn.Module, wrapper: Callable) -> bool:
        """``module.forward = wrapper`` (an instance attribute, on top of any there); False if refused."""
        previous = module.__dict__.get("forward", _ABSENT)
        try:
            module.__dict__["forward"] = wrapper
        except (TypeError, AttributeError):  # a module whose __dict__ is not writable (TorchScript)
            return False
        self._entries.append((_WRAPPED, module, wrapper, previous))
        return True

    def remove(self) -> None:
        """Idempotent, like ``RemovableHandle.remove``: every hook out of every container it went into."""
        for entry in reversed(self._entries):
            if len(entry) == 1:
                entry[0].remove()
                continue
            if entry[0] is _WRAPPED:
                _unwrap(*entry[1:])
                continue
            hook_id = entry[1]
            entry[0].pop(hook_id, None)
            for extra in entry[2:]:
                extra.pop(hook_id, None)
        self._entries.clear()


def _unserializable(hook: Callable) -> Callable:
    """Mark a tensor hook as torch's ``unserializable_hook`` does: pickling a watched parameter
    (``torch.save(model)`` inside a watch) then leaves it out without a warning per parameter."""
    try:
        hook.__torch_unserializable__ = True  # type: ignore[attr-defined]
    except AttributeError:  # a bound method or builtin: torch warns that it is not saved, which is true
        pass
    return hook


class ParamHooks:
    """gradtrace's tensor hook on each watched parameter, put in and taken out while the watch is open.

    In, the hook sees every run that reaches the parameter (``.backward()`` and
    ``autograd.grad``) at the price of a Python call per parameter per run. Out, a
    ``.backward()`` run calls nothing per parameter (``capture/hookless.py`` reads it).
    Each parameter's hook is counted in (``arm``) and out (``disarm``): it stays while
    anyone holds it. A container emptied by ``disarm`` that was None when the watch
    began is set back to None: an empty dict still makes the engine call into Python
    for the parameter. Called between engine runs or from a run's own start or end,
    never while the engine walks a parameter's container (a hook of that parameter).

    Setting a container to None destroys the engine's C++ pre-hook for that tensor:
    a backward in another thread that is about to call it then reads freed memory
    (torch 2.6 raised ``vector::_M_range_check``). So a model run in two threads is
    ``HooklessRuns.pin``-ned (hooks in for good: no container is reset until exit),
    and ``arm`` / ``disarm`` hold a lock, so that pinning from another thread waits
    for a disarm in progress instead of interleaving with it.
    """

    def __init__(self, params: List[torch.Tensor], hooks: List[Callable]):
        self.params = params
        self.hooks = [_unserializable(hook) for hook in hooks]  # torch.save(model) inside the watch works
        self.ids: List[Optional[int]] = [None] * len(params)  # the RemovableHandle id while in
        self.holds = [0] * len(params)
        self._handles: Dict[int, RemovableHandle] = {}  # subclass parameters: through register_hook
        self._was_none = [p._backward_hooks is None for p in params]
        self.plain = list(map(is_plain, params))
        # One lock per call, not per parameter: a whole arm or disarm happens before another starts.
        # Reentrant: HooklessRuns holds it around a change of mode and the arm or disarm it makes.
        self.lock = threading.RLock()

    def arm(self, indices: Iterable[int]) -> List[int]:
        """Hold each parameter's hook in; the indices whose hook went in now."""
        added = []
        holds, ids = self.holds, self.ids
        with self.lock:
            for i in indices:
                holds[i] += 1
                if ids[i] is None:
                    ids[i] = self._put(i)
                    if ids[i] is not None:
                        added.append(i)
        return added

    def disarm(self, indices: Iterable[int]) -> None:
        """Let go of each parameter's hook; out where nobody holds it any more."""
        holds = self.holds
        with self.lock:
            for i in indices:
                if holds[i] > 0:
                    holds[i] -= 1
                if holds[i] == 0 and self.ids[i] is not None:
                    self._take(i)

    def remove(self) -> None:
        """Every hook out (at exit), whoever held it."""
        with self.lock:
            for i, hook_id in enumerate(self.ids):
                self.holds[i] = 0
                if hook_id is not None:
                    self._take(i)

    def users(self, also_ours: AbstractSet[int] = frozenset()) -> List[int]:
        """Parameters holding a tensor hook that is not gradtrace's (``register_hook`` of the user's, before
        or during the watch): what it returns is the gradient, so it can zero or mask it. ``also_ours``:
        ids of gradtrace's other tensor hooks (a parameter registered with ``trace.tensor``)."""
        with self.lock:
            return [i for i, (p, ours) in enumerate(zip(self.params, self.ids, strict=False))
                    if p._backward_hooks and any(key != ours and key not in also_ours for key in p._backward_hooks)]

    def _put(self, i: int) -> Optional[int]:
        """Put parameter ``i``'s hook in; its id (None: a subclass parameter frozen since watch began,
        which ``register_hook`` refuses; it gets its hook when next armed)."""
        tensor = self.params[i]
        if not self.plain[i]:
            try:
                handle = tensor.register_hook(self.hooks[i])
            except RuntimeError:
                return None
            self._handles[i] = handle
            return handle.id
        # A plain tensor's container takes the hook even while it does not require grad (frozen during
        # the watch, e.g. peft's disable_adapter()): it fires again once it does.
        hooks = tensor._backward_hooks
        if hooks is None:  # what register_hook does: assigning the dict installs the engine's pre-hook
            hooks = tensor._backward_hooks = OrderedDict()
            if tensor.grad_fn is not None:
                tensor.grad_fn._register_hook_dict(tensor)
        hook_id = HookBatch._new_id()
        hooks[hook_id] = self.hooks[i]
        return hook_id

    def _take(self, i: int) -> None:
        hook_id, self.ids[i] = self.ids[i], None
        handle = self._handles.pop(i, None)
        if handle is not None:
            handle.remove()
            return
        tensor = self.params[i]
        hooks = tensor._backward_hooks
        if hooks is None:
            return
        hooks.pop(hook_id, None)
        if not hooks and self._was_none[i] and tensor.grad_fn is None:  # a leaf: None drops the engine's pre-hook
            tensor._backward_hooks = None


_ABSENT = object()  # no instance-level forward before gradtrace's wrapper
_WRAPPED = object()  # marks a forward-wrapper entry of a HookBatch


def _unwrap(module: nn.Module, wrapper: Callable, previous: Any) -> None:
    """The module's ``forward`` as the watch found it, unless it was replaced since (then it stays)."""
    if module.__dict__.get("forward") is not wrapper:
        return
    if previous is _ABSENT:
        del module.__dict__["forward"]
    else:
        module.__dict__["forward"] = previous


def keep_last(tensor: torch.Tensor, hook_id: int) -> bool:
    """Make gradtrace's tensor hook (``hook_id``) the last one to run on ``tensor``; was it already?

    Tensor hooks run in the order of their container. A hook the user registers
    after ``watch`` runs after gradtrace's and may change the gradient that
    ``torch.autograd.grad`` hands back: moved last, gradtrace sees that value.
    Called between engine runs, never while the engine walks the container.
    """
    hooks = tensor._backward_hooks
    if hooks is None or len(hooks) < 2 or next(reversed(hooks)) == hook_id or hook_id not in hooks:
        return True
    # Re-inserted, not move_to_end(): the engine walks the dict's own storage, which only a
    # re-insertion reorders (the OrderedDict's linked list is not what C++ iterates).
    hooks[hook_id] = hooks.pop(hook_id)
    return False


def restore(state: HookSnapshot) -> None:
    """After every gradtrace handle is removed: reset emptied containers that were None to None."""
    for tensor, names in state.tensors():
        for name in names:
            container = getattr(tensor, name)
            # Non-empty: the user registered a hook during the watch; it stays.
            if container is not None and not container:
                setattr(tensor, name, None)
    state._none.clear()
    state._held.clear()
