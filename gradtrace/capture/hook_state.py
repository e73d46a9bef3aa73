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

import weakref
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

import torch

# The containers ``Tensor.register_hook`` / ``register_post_accumulate_grad_hook`` create.
_CONTAINERS = ("_backward_hooks", "_post_accumulate_grad_hooks")


class HookSnapshot:
    """Which containers were None before gradtrace registered anything, per tensor."""

    def __init__(self) -> None:
        # id -> (weak ref, names of the containers that were None). Weak: a tensor
        # registered with trace.tensor in every step of a long watch must not be
        # kept alive by this; a tensor that died took its containers with it.
        self._none: Dict[int, Tuple[weakref.ref, List[str]]] = {}

    def note(self, tensor: torch.Tensor) -> None:
        """Record ``tensor``'s containers before the first gradtrace hook goes on it."""
        key = id(tensor)
        entry = self._none.get(key)
        if entry is not None and entry[0]() is tensor:
            return
        names = [name for name in _CONTAINERS if getattr(tensor, name) is None]
        self._none[key] = (weakref.ref(tensor, self._forget(key)), names)

    def _forget(self, key: int) -> Callable[[weakref.ref], None]:
        def forget(ref: weakref.ref) -> None:
            entry = self._none.get(key)
            if entry is not None and entry[0] is ref:  # not a newer tensor that reused the id
                del self._none[key]
        return forget

    def tensors(self) -> Iterator[Tuple[torch.Tensor, List[str]]]:
        for ref, names in list(self._none.values()):
            tensor = ref()
            if tensor is not None:
                yield tensor, names


def keep_last(tensor: torch.Tensor, hook_id: int) -> bool:
    """Make gradtrace's tensor hook (``hook_id``) the last one to run on ``tensor``; was it already?

    Tensor hooks run in the order of their container. A hook the user registers
    after ``watch`` runs after gradtrace's and may change the gradient that
    ``torch.autograd.grad`` hands back: moved last, gradtrace sees that value.
    Called between engine runs, never while the engine walks the container.
    """
    hooks = getattr(tensor, "_backward_hooks")
    if hooks is None or len(hooks) < 2 or next(reversed(hooks)) == hook_id or hook_id not in hooks:
        return True
    # Re-inserted, not move_to_end(): the engine walks the dict's own storage, which only a
    # re-insertion reorders (the OrderedDict's linked list is not what C++ iterates).
    hooks[hook_id] = hooks.pop(hook_id)
    return False


def snapshot(params: Iterable[torch.Tensor]) -> HookSnapshot:
    """Call before registering hooks on ``params``; add later tensors with ``note``."""
    state = HookSnapshot()
    for p in params:
        state.note(p)
    return state


def restore(state: HookSnapshot) -> None:
    """After every gradtrace handle is removed: reset emptied containers that were None to None."""
    for tensor, names in state.tensors():
        for name in names:
            container = getattr(tensor, name)
            # Non-empty: the user registered a hook during the watch; it stays.
            if container is not None and not container:
                setattr(tensor, name, None)
    state._none.clear()
