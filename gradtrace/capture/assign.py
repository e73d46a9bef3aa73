"""Which pass each engine run belongs to.

A pass is every run inside ``trace.pass_(name)`` (any number of
microbatches), or one unlabelled run. Nested runs (reentrant checkpointing)
belong to their outer run's pass and are not counted as runs. The hooks of a
nested run can fire before any hook of its outer run, so the assignment is a
small state machine, written out in ``PassAssigner``.
"""
from __future__ import annotations

import itertools
import threading
from typing import Dict, Iterable, Optional

from .passes import Pass, Watched


class StandIn:
    """Nested runs (consecutive graph-task ids) seen before any hook of their outer run."""

    __slots__ = ("pass_", "first", "last", "claimed")

    def __init__(self, pass_: Pass, task: int):
        self.pass_ = pass_
        self.first = task
        self.last = task
        self.claimed = False  # the outer run fired a hook later and joined


class PassAssigner:
    """Decides the pass of every new engine run.

    The engine numbers graph tasks in the order runs start, so an outer run
    has a smaller task id than the nested runs it starts, and the nested runs
    of one outer run that are seen before it have consecutive ids.

    ==  =========  =====================================================  ===============================  =======
    #   new run    what has been seen                                     pass it joins                    counted
    ==  =========  =====================================================  ===============================  =======
    1   nested     an open top-level run with a smaller task id           that run's pass                  no
    2   nested     none; the current stand-in's last task id is one less  the stand-in's pass              no
    3   nested     none, no stand-in; a label is open                     the labelled pass (now also a    yes
                                                                          stand-in for the outer run)
    4   nested     none, no stand-in, no label                            a new automatic pass, held as    yes
                                                                          the orphan (a stand-in too)
    5   top-level  an unclaimed stand-in whose first task id is larger    the stand-in's pass; the orphan  no
                   (the outer run of nested runs seen first)              is now owned by this run
    6   top-level  a label is open                                        the labelled pass                yes
    7   top-level  no label                                               a new automatic pass, finished   yes
                                                                          when the run ends
    ==  =========  =====================================================  ===============================  =======

    An orphan is finished when the next automatic pass begins, when the trace
    is read after ``watch`` exits, or at exit. Each row has a test
    (``tests/test_pass_assignment.py``).
    """

    def __init__(self, watched: Watched):
        self.watched = watched
        # The open label of each thread: a label opened in one thread never captures runs of another.
        self.labels: Dict[int, Pass] = {}
        self.orphan: Optional[Pass] = None  # opened by a nested run whose outer run is unseen
        self.standin: Optional[StandIn] = None
        self._counter = itertools.count(1)

    @property
    def active(self) -> Optional[Pass]:
        """The label the calling thread holds open, if any."""
        return self.labels.get(threading.get_ident())

    @active.setter
    def active(self, pass_: Optional[Pass]) -> None:
        if pass_ is None:
            self.labels.pop(threading.get_ident(), None)
        else:
            self.labels[threading.get_ident()] = pass_

    def release(self, pass_: Pass) -> None:
        """``pass_``'s label is closed, in whichever thread holds it (at exit, maybe another's)."""
        for thread in [t for t, label in self.labels.items() if label is pass_]:
            del self.labels[thread]

    def label_for_run(self, on_accelerator: bool) -> Optional[Pass]:
        """The label a new run belongs to: its thread's.

        A CPU backward runs its hooks on the thread that called it. An
        accelerator's backward runs them on the engine's device threads, where
        the calling thread is unknown: there a single open label is taken as its
        (the usual single-threaded loop), and with labels open in several
        threads the run stays unlabelled rather than joining the wrong one.
        """
        own = self.labels.get(threading.get_ident())
        if own is not None or not on_accelerator:
            return own
        return next(iter(self.labels.values())) if len(self.labels) == 1 else None

    def assign(self, task: int, nested: bool, accumulates: Optional[bool], open_runs: Iterable,
               on_accelerator: bool = False) -> Pass:
        label = self.label_for_run(on_accelerator)
        if nested:
            return self._nested(task, accumulates, open_runs, label)
        return self._top_level(task, accumulates, label)

    def _nested(self, task: int, accumulates: Optional[bool], open_runs: Iterable, label: Optional[Pass]) -> Pass:
        outer = [r for r in open_runs if not r.nested and r.task < task]
        if outer:  # row 1
            return outer[-1].pass_
        group = self.standin
        if group is not None and task == group.last + 1 and not group.pass_.closed:  # row 2
            group.last = task
            return group.pass_
        if label is not None:  # row 3
            pass_ = label.count_run()
        else:  # row 4: finished only later (after zero_grad, typically), so read at each run's end
            pass_ = self.orphan = self._new_auto(accumulates, read_at="run_end")
        self.standin = StandIn(pass_, task)
        return pass_

    def _top_level(self, task: int, accumulates: Optional[bool], label: Optional[Pass]) -> Pass:
        group = self.standin
        if group is not None and not group.claimed and task < group.first and not group.pass_.closed:  # row 5
            group.claimed = True
            if self.orphan is group.pass_:
                self.orphan = None
            return group.pass_
        if label is not None:  # row 6
            return label.count_run()
        return self._new_auto(accumulates)  # row 7

    def _new_auto(self, accumulates: Optional[bool], read_at: str = "pass_end") -> Pass:
        self.flush_orphan()
        return Pass(self.watched, self.auto_name(accumulates), auto=True, read_at=read_at).count_run()

    def auto_name(self, accumulates: Optional[bool]) -> str:
        """Runs outside any pass_ are passes of their own: backward-1, grad-2, ... (run-3: only tensors reached).

        A name the user already gave a labelled pass is skipped, never reused.
        """
        kind = {True: "backward", False: "grad", None: "run"}[accumulates]
        while True:
            name = f"{kind}-{next(self._counter)}"
            if not self.watched.events.name_taken(name):
                return name

    def flush_orphan(self) -> None:
        if self.orphan is not None:
            orphan, self.orphan = self.orphan, None
            orphan.finish()
