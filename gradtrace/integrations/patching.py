"""Wrapping methods of one object (a trainer instance), and giving them back.

``attach(trainer)`` wraps a few of the trainer's methods as *instance*
attributes: the class (transformers', TRL's, the user's subclass) is never
touched, so other trainers in the process are unaffected, and a subclass's
override is what gets wrapped. ``restore()`` puts back exactly what was there:
the instance attribute that existed before, or none. A wrapper that someone
else wrapped again after us is left in place (removing it would drop theirs);
it passes straight through once ``active`` is False.
"""
from __future__ import annotations

from typing import Any, Callable, List, Tuple

__all__ = ["InstancePatches"]

_MISSING = object()


class InstancePatches:
    """Instance-attribute wrappers on one object, undone together."""

    def __init__(self, target: Any):
        self.target = target
        self.active = True
        self._undo: List[Tuple[str, Any, Callable]] = []  # (name, what the instance held before, our wrapper)

    def wrap(self, name: str, make: Callable[[Callable], Callable]) -> None:
        """Replace ``target.<name>`` (a bound method, or an earlier instance attribute) by ``make(original)``."""
        original = getattr(self.target, name)
        before = vars(self.target).get(name, _MISSING)
        wrapper = make(original)
        setattr(self.target, name, wrapper)
        self._undo.append((name, before, wrapper))

    def restore(self) -> None:
        """Give every wrapped attribute back; idempotent."""
        self.active = False
        own = vars(self.target)
        for name, before, wrapper in reversed(self._undo):
            if own.get(name) is not wrapper:
                continue  # wrapped again by someone else since: theirs stays, ours passes through
            if before is _MISSING:
                delattr(self.target, name)
            else:
                setattr(self.target, name, before)
        self._undo.clear()
