"""Analysis that is not redone: what one ``verdicts()`` call reuses from the one before.

A training loop judges its trace every step, over up to ``max_passes`` kept
passes, and all but one of them are passes it judged the step before. A
finished pass does not change (its records are replaced as a whole, never
edited: ``PassTrace.records``), so whatever was computed from a pass object and
from the other inputs its key names is the same when asked again. ``Memo``
keeps such results on the trace, keyed by the objects they were computed from:
passes and cuts by identity (a pass dropped by ``max_passes`` and a new one of
the same name are different keys), a pass's coverage by its frozenset, sets of
parameters by value (made canonical first, so later keys compare by identity).

Entries live as long as they are used: a ``verdicts()`` call keeps the entries
it read or made and forgets the rest when it ends. A dropped pass, or a context
that changed (a parameter reached for the first time, a new cut, a replaced
parameter), takes its entries with it, and the memory held is one call's
working set. The verdicts are the ones a computation from scratch gives: every
input of a cached result is in its key (tests/test_analysis_scaling.py checks
that over random sequences of passes, drops and edits).
"""
from __future__ import annotations

import collections
import contextlib
import threading
from typing import Any, Callable, Dict, FrozenSet, Hashable, Iterable, Iterator, Tuple

from ..records import Verdict

_MISSING = object()


class Ident:
    """A key part that compares by identity (records are unhashable dataclasses); it holds the object, so
    the object's id cannot be reused by another while the key exists."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Ident) and other.obj is self.obj

    def __repr__(self) -> str:
        return f"Ident({type(self.obj).__name__} at {id(self.obj):#x})"


class Memo:
    """Results of the analysis keyed by everything they were computed from; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._kept: Dict[Hashable, Any] = {}  # what the previous call used
        self._used: Dict[Hashable, Any] = {}  # what this call read or made
        self._depth = 0
        # How many results of each kind were computed rather than reused (tests count work with it).
        self.computed: collections.Counter = collections.Counter()

    def get(self, key: Tuple, compute: Callable[..., Any], *args: Any) -> Any:
        """The value cached under ``key`` (its first item names the kind), else ``compute(*args)``.

        Whatever ``compute`` reads must be in ``key``: the arguments are passed, not closed over, so a
        caller in a loop cannot compute with a later iteration's values."""
        used = self._used
        value = used.get(key, _MISSING)
        if value is _MISSING:
            value = self._kept.pop(key, _MISSING)
            if value is _MISSING:
                self.computed[key[0]] += 1
                value = compute(*args)
            used[key] = value
        return value

    def canonical(self, value: FrozenSet) -> FrozenSet:
        """An equal frozenset kept from before, when there is one: keys built on it then compare by identity."""
        return self.get(("canonical", value), _same, value)

    @contextlib.contextmanager
    def call(self) -> Iterator["Memo"]:
        """One ``verdicts()`` call: the entries it used are kept for the next, the others dropped."""
        with self._lock:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._kept, self._used = self._used, {}

    def __reduce__(self):
        return Memo, ()  # a copied or pickled trace starts with an empty memo (its passes are new objects)

    def __len__(self) -> int:
        return len(self._kept) + len(self._used)


_MEMO_ATTRIBUTE = "_analysis_memo"


def memo_of(trace: Any) -> Memo:
    """The memo kept on ``trace`` (made on first use; a fresh one each time where it cannot be kept)."""
    memo = getattr(trace, _MEMO_ATTRIBUTE, None)
    if isinstance(memo, Memo):
        return memo
    memo = Memo()
    try:
        setattr(trace, _MEMO_ATTRIBUTE, memo)
    except AttributeError:  # an object with __slots__ (a test's stand-in): nothing is reused
        pass
    return memo


def covered_union(memo: Memo, passes: Iterable[Any], channel: Hashable = "all") -> FrozenSet[str]:
    """Every parameter any of ``passes`` reached (their coverages are immutable frozensets: the key).

    ``channel`` names the run of passes it is asked for call after call (all of them, one optimizer's):
    its union is updated by the passes that came and went since (``_Union``), not rebuilt.
    """
    coverages = tuple(p.covered for p in passes)
    return memo.get(("union", coverages), _updated_union, memo, channel, coverages)


def _updated_union(memo: Memo, channel: Hashable, coverages: Tuple[FrozenSet[str], ...]) -> FrozenSet[str]:
    return memo.get(("union_state", channel), _Union).update(coverages, memo)


def _same(value: Any) -> Any:
    return value


class _Union:
    """A union of coverages kept up to date as passes come (one a step) and go (``max_passes``).

    Each parameter counts the distinct coverages holding it; the union is rebuilt only when a count
    crosses zero, so a run whose every parameter was reached long ago costs what its new pass holds.
    """

    def __init__(self) -> None:
        self.held: Dict[int, FrozenSet[str]] = {}  # by id: held, so no other object takes that id
        self.counts: Dict[str, int] = {}
        self.value: FrozenSet[str] = frozenset()

    def update(self, coverages: Tuple[FrozenSet[str], ...], memo: Memo) -> FrozenSet[str]:
        now = {id(c): c for c in coverages}
        counts, changed = self.counts, False
        for key, coverage in self.held.items():
            if key not in now:
                for name in coverage:
                    left = counts[name] - 1
                    if left:
                        counts[name] = left
                    else:
                        del counts[name]
                        changed = True
        for key, coverage in now.items():
            if key not in self.held:
                for name in coverage:
                    before = counts.get(name, 0)
                    counts[name] = before + 1
                    changed = changed or not before
        self.held = now
        if changed:
            self.value = memo.canonical(frozenset(counts))
        return self.value


def copied(v: Verdict) -> Verdict:
    """A verdict kept in the memo, as a new object: its evidence (and the lists and dicts in it) can be changed
    without changing the kept one. The kept kinds' evidence holds names and numbers one level down, no deeper."""
    evidence = {key: value.copy() if isinstance(value, (list, dict, set)) else value
                for key, value in v.evidence.items()}
    return Verdict(v.code, v.severity, v.message, evidence)
