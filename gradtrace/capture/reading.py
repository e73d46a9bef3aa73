"""How a pass reads what its ``.backward()`` runs left in ``.grad``: a strategy, one per pass.

A ``.backward()`` run's gradient lands in ``.grad``, where anything may change it
before the pass ends: a wrapper's reduction (DDP divides in place), clipping,
``zero_grad()``, an optimizer step. Hooks never hold the incoming gradient (that
would make AccumulateGrad copy it instead of stealing it), so a pass reads
``.grad`` itself. When, is this strategy:

* ``ReadAtPassEnd`` (the default): each run's end notes the tensor it left in
  ``.grad`` and its version, and the pass reads ``.grad`` when it ends: after
  every post-backward step of a wrapper. A ``.grad`` set to None since is read as
  the run left it; one changed in place since is marked ``changed``, so an
  all-zero value there means cleared, never "exactly zero".
* ``ReadAtRunEnd``: figures are taken at the end of every run that reached a
  parameter (the latest wins): they survive a ``zero_grad()`` or clipping done
  before the pass closes, at the price of one reduction per run.

The pass calls a strategy at two moments only: ``run_ended`` (the engine has
finished a run; hooks said which parameters it reached) and, when the pass
ends, ``pieces`` / ``unread`` / ``backward_grad``. A strategy that learns the
reached parameters itself (issue 23: compare ``.grad`` identity and ``_version``
at run end, with no Python hook per parameter in ``.backward()`` runs) fits the
same two moments. ``autograd.grad``'s handed-back gradients are the pass's own
business (``passes.Pass``), not a strategy's.
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Protocol, Tuple

import torch

from .stats import Figures

READ_AT = ("pass_end", "run_end")

_GRAD = operator.attrgetter("grad")
_VERSION = operator.attrgetter("_version")
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)

class RunLeft:
    """What a run left in ``.grad``, read at its end (hookless reading): the parameters, their tensors
    and versions, aligned lists."""

    __slots__ = ("indices", "grads", "versions")

    def __init__(self, indices: List[int], grads: List[torch.Tensor], versions: List[int]):
        self.indices, self.grads, self.versions = indices, grads, versions


# What ``backward_grad`` says about the tensor it returns.
AS_LEFT, CHANGED, CLEARED = "as_left", "changed", "cleared"


class PassView(Protocol):
    """What a strategy may use of its pass: read the parameters, reduce gradients, and (a strategy
    that finds the reached parameters itself) report a parameter reached."""

    params: List[torch.Tensor]

    def gain(self, index: int, grad: torch.Tensor) -> torch.Tensor: ...

    def figures(self, grads: List[torch.Tensor], key: Optional[tuple] = None) -> Figures: ...

    def hit(self, index: int) -> None: ...


class GradReading(Protocol):
    # Does ``run_ended`` read gradient values (then it must wait for a wrapper's end-of-run
    # work, such as DDP's all-reduce), or only note which tensor each run left?
    reads_values: bool

    def run_ended(self, pass_: PassView, indices: List[int], left: Optional[RunLeft] = None) -> None:
        """A run that wrote ``.grad`` ended; ``indices``: the parameters it reached (backward order);
        ``left``: ``.grad`` and its version already read for some of them (hookless reading)."""

    def pieces(self) -> List[Tuple[List[int], Figures]]:
        """Figures already taken (indices, figures), oldest first; a later piece overrides an earlier one."""

    def backward_grad(self, param: torch.Tensor, index: int) -> Tuple[Optional[torch.Tensor], str]:
        """``.grad`` as the pass left it, and AS_LEFT, CHANGED (in place since its last run) or CLEARED (unknown)."""

    def all_as_left(self, params: List[torch.Tensor], order: List[int], grads: List[torch.Tensor]) -> bool:
        """Is every ``.grad`` a run left still that tensor, unchanged? (The pass end's fast path; ``grads``:
        ``.grad`` of the parameters ``order`` names, now.)"""

    def release(self) -> None:
        """Drop every tensor held: the pass has ended."""


class ReadAtPassEnd:
    """Read ``.grad`` when the pass ends; remember what each run left, to tell cleared from zero."""

    __slots__ = ("left", "last")
    reads_values = False

    def __init__(self) -> None:
        # index -> (the .grad tensor its last run left, that tensor's version then)
        self.left: Dict[int, Tuple[torch.Tensor, int]] = {}
        # The latest run's RunLeft when it holds every entry of ``left`` (one run, or runs reaching the
        # same parameters: a loop's microbatches): the pass end compares lists, not a dict.
        self.last: Optional[RunLeft] = None

    def run_ended(self, pass_: PassView, indices: List[int], left: Optional[RunLeft] = None) -> None:
        if left is not None:
            self.left.update(zip(left.indices, zip(left.grads, left.versions, strict=False), strict=False))
            self.last = left if len(self.left) == len(left.indices) else None
            if len(left.indices) == len(indices):
                return
            done = set(left.indices)
            indices = [i for i in indices if i not in done]
        else:
            self.last = None
        grads = list(map(_GRAD, map(pass_.params.__getitem__, indices)))  # C-level loops: this runs per parameter
        try:
            self.left.update(zip(indices, zip(grads, map(_VERSION, grads), strict=False), strict=False))
        except AttributeError:  # a .grad that is None: kept out
            self.left.update((i, (g, g._version)) for i, g in zip(indices, grads, strict=False) if g is not None)
        if indices:
            self.last = None

    def pieces(self) -> List[Tuple[List[int], Figures]]:
        return []

    def backward_grad(self, param: torch.Tensor, index: int) -> Tuple[Optional[torch.Tensor], str]:
        grad = param.grad
        ref = self.left.get(index)
        if ref is None:
            # never written where a run could see it (an optimizer in backward cleared it)
            return (grad, AS_LEFT) if grad is not None else (None, CLEARED)
        kept, version = ref
        if grad is None or grad is not kept:  # set to None (or replaced) after the run: the run's tensor is intact
            return (kept, AS_LEFT) if kept._version == version else (None, CLEARED)
        if grad._version != version:  # changed in place since (a wrapper's reduction, or zero_grad(set_to_none=False))
            return grad, CHANGED
        return grad, AS_LEFT

    def all_as_left(self, params: List[torch.Tensor], order: List[int], grads: List[torch.Tensor]) -> bool:
        left = self.left
        if not left:
            return True
        last = self.last
        if last is not None and last.indices == order:  # the common case: three C-level loops
            return all(map(operator.is_, grads, last.grads)) and list(map(_VERSION, grads)) == last.versions
        kept = list(map(_FIRST, left.values()))
        return (all(map(operator.is_, map(_GRAD, map(params.__getitem__, left)), kept))
                and all(map(operator.eq, map(_VERSION, kept), map(_SECOND, left.values()))))

    def release(self) -> None:
        self.left.clear()
        self.last = None


class ReadAtRunEnd:
    """Take figures at the end of every run that reached a parameter; the pass end reads only the rest."""

    __slots__ = ("taken",)
    reads_values = True

    def __init__(self) -> None:
        self.taken: List[Tuple[List[int], Figures]] = []

    def run_ended(self, pass_: PassView, indices: List[int], left: Optional[RunLeft] = None) -> None:
        params = pass_.params
        read = dict(zip(left.indices, left.grads, strict=False)) if left is not None else {}
        grads = (read[i] if i in read else params[i].grad for i in indices)
        kept = [(i, g) for i, g in zip(indices, grads, strict=False) if g is not None]
        if kept:
            self.taken.append(([i for i, _ in kept], pass_.figures([pass_.gain(i, g) for i, g in kept])))

    def pieces(self) -> List[Tuple[List[int], Figures]]:
        return self.taken

    def backward_grad(self, param: torch.Tensor, index: int) -> Tuple[Optional[torch.Tensor], str]:
        grad = param.grad
        return (grad, AS_LEFT) if grad is not None else (None, CLEARED)

    def all_as_left(self, params: List[torch.Tensor], order: List[int], grads: List[torch.Tensor]) -> bool:
        return True

    def release(self) -> None:
        self.taken = []


def reading_for(read_at: str) -> GradReading:
    return ReadAtRunEnd() if read_at == "run_end" else ReadAtPassEnd()
