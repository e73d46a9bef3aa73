"""Passes: which pass each engine run belongs to, and a pass's device-side accumulators.

A pass is every run inside ``trace.pass_(name)`` (any number of
microbatches), or one unlabelled run. Nested runs (reentrant checkpointing)
belong to their outer run's pass and are not counted as runs. The hooks of a
nested run can fire before any hook of its outer run, so the assignment is a
small state machine, written out in ``PassAssigner``.
"""
from __future__ import annotations

import itertools
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

# When a pass's figures are read: when the pass ends (default), or at the end of every engine
# run that reached a parameter (the latest wins), which survives a zero_grad() or a clipping
# done before the pass closes, at the price of reading the gradients once per run.
READ_AT = ("pass_end", "run_end")


class PassState:
    """Device-side accumulators of one pass, until it ends."""

    def __init__(self, name: str, auto: bool, keep_grads: bool, step_start: bool = False,
                 read_at: str = "pass_end"):
        self.name = name
        self.auto = auto
        self.keep_grads = keep_grads
        self.step_start = step_start
        self.read_at = read_at
        self.accumulate = False  # the pass adds to gradients earlier passes left on purpose: never stale
        self.runs = 0
        self.kinds: List[str] = []
        self.hits: List[int] = []  # parameter indices, in the order the hooks fired (backward order)
        self.written: List[int] = []  # post-accumulate hooks: .grad written
        self.backward_params: set = set()
        self.capture_sums: Dict[int, torch.Tensor] = {}
        # autograd.grad runs whose handed-back gradient gradtrace could not see: vmapped ones
        # (is_grads_batched=True), or one a later-registered hook may have changed. Figures unknown.
        self.unseen_handbacks: set = set()
        # .grad as it was when the pass first reached a parameter, where it was
        # not None: the pass's own gradient is .grad minus this.
        self.bases: Dict[int, torch.Tensor] = {}
        self.tensor_grads: Dict[str, List[torch.Tensor]] = {}
        # read_at="pass_end": the .grad each run left (and its version), so a .grad cleared
        # later is still read as the run left it, and one zeroed in place is known to be.
        self.run_end_grads: Dict[int, Tuple[torch.Tensor, int]] = {}
        # read_at="run_end": statistics taken at each run's end, (indices, device stats).
        self.run_stats: List[Tuple[List[int], Any]] = []
        self.expected: Optional[set] = None
        self.expected_partial = False
        self.failed: Optional[str] = None
        self.scope = "local"  # PassTrace.scope: set by every .backward() run as it ends
        self.closed = False

    def note_kind(self, kind: str) -> None:
        if kind not in self.kinds:
            self.kinds.append(kind)


class StandIn:
    """Nested runs (consecutive graph-task ids) seen before any hook of their outer run."""

    __slots__ = ("state", "first", "last", "claimed")

    def __init__(self, state: PassState, task: int):
        self.state = state
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

    def __init__(self, keep_grads: bool, finish: Callable[[PassState], None]):
        self.keep_grads = keep_grads
        self.finish = finish
        # The open label of each thread: a label opened in one thread never captures runs of another.
        self.labels: Dict[int, PassState] = {}
        self.orphan: Optional[PassState] = None  # opened by a nested run whose outer run is unseen
        self.standin: Optional[StandIn] = None
        self.taken_names: Callable[[str], bool] = lambda name: False
        self._counter = itertools.count(1)

    @property
    def active(self) -> Optional[PassState]:
        """The label the calling thread holds open, if any."""
        return self.labels.get(threading.get_ident())

    @active.setter
    def active(self, state: Optional[PassState]) -> None:
        if state is None:
            self.labels.pop(threading.get_ident(), None)
        else:
            self.labels[threading.get_ident()] = state

    def label_for_run(self, on_accelerator: bool) -> Optional[PassState]:
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
               on_accelerator: bool = False) -> PassState:
        label = self.label_for_run(on_accelerator)
        if nested:
            return self._nested(task, accumulates, open_runs, label)
        return self._top_level(task, accumulates, label)

    def _nested(self, task: int, accumulates: Optional[bool], open_runs: Iterable,
                label: Optional[PassState]) -> PassState:
        outer = [r for r in open_runs if not r.nested and r.task < task]
        if outer:  # row 1
            return outer[-1].pass_state
        group = self.standin
        if group is not None and task == group.last + 1 and not group.state.closed:  # row 2
            group.last = task
            return group.state
        if label is not None:  # row 3
            state = self._count(label)
        else:  # row 4: finished only later (after zero_grad, typically), so read at each run's end
            state = self.orphan = self._new_auto(accumulates)
            state.read_at = "run_end"
        self.standin = StandIn(state, task)
        return state

    def _top_level(self, task: int, accumulates: Optional[bool], label: Optional[PassState]) -> PassState:
        group = self.standin
        if group is not None and not group.claimed and task < group.first and not group.state.closed:  # row 5
            group.claimed = True
            if self.orphan is group.state:
                self.orphan = None
            return group.state
        if label is not None:  # row 6
            return self._count(label)
        return self._new_auto(accumulates)  # row 7

    @staticmethod
    def _count(state: PassState) -> PassState:
        state.runs += 1
        return state

    def _new_auto(self, accumulates: Optional[bool]) -> PassState:
        self.flush_orphan()
        return self._count(PassState(self.auto_name(accumulates), auto=True, keep_grads=self.keep_grads))

    def auto_name(self, accumulates: Optional[bool]) -> str:
        """Runs outside any pass_ are passes of their own: backward-1, grad-2, ... (run-3: only tensors reached).

        A name the user already gave a labelled pass is skipped, never reused.
        """
        kind = {True: "backward", False: "grad", None: "run"}[accumulates]
        while True:
            name = f"{kind}-{next(self._counter)}"
            if not self.taken_names(name):
                return name

    def flush_orphan(self) -> None:
        if self.orphan is not None:
            state, self.orphan = self.orphan, None
            self.finish(state)
