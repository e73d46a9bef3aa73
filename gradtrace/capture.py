"""Capture: parameter and tensor hooks, engine runs, passes.

Hooks only record. A hook never changes a gradient, never copies to the host,
and in a ``.backward()`` run never keeps a reference to the incoming gradient
(that would make AccumulateGrad copy it instead of stealing it): the pass's
gradient is read from ``.grad`` when the pass ends.

Vocabulary:
  * engine run: one ``backward`` or ``autograd.grad`` call; it ends when the
    engine drains its callbacks (``queue_callback``), no torch patching needed.
  * nested run: an engine run started inside another one's backward (reentrant
    checkpointing recomputes its segment and calls ``torch.autograd.backward``).
    It belongs to the outer run's pass and does not count as a run.
  * pass: every run inside ``trace.pass_(name)``, or one unlabelled run.
"""
from __future__ import annotations

import itertools
import sys
import threading
from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import stats
from .records import GradRecord, PassTrace, TensorGradFacts

_queue_callback = torch.autograd.Variable._execution_engine.queue_callback
_current_task = getattr(torch._C, "_current_graph_task_id", None)
_current_node = getattr(torch._C, "_current_autograd_node", None)
_will_execute = getattr(torch._C, "_will_engine_execute_node", None)

# The frame every custom autograd Function's backward runs under; an engine run
# that starts while it is on the stack was started from inside another run.
_FUNCTION_PY = torch.autograd.function.__file__


def run_accumulates_grad() -> bool:
    """Inside a parameter hook: does this engine run write ``.grad``?

    ``_will_engine_execute_node`` on the AccumulateGrad node answers True in
    ``.backward()`` and raises for a leaf in ``autograd.grad`` (verified on
    torch 2.13), which is the one fact we need. Asked once per run.
    """
    if _will_execute is None or _current_node is None:
        return True
    node = _current_node()
    if node is None:
        return True
    try:
        return bool(_will_execute(node))
    except RuntimeError:
        return False


def started_inside_another_run() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "apply" and code.co_filename == _FUNCTION_PY:
            return True
        frame = frame.f_back
    return False


class Run:
    """One engine run as the hooks see it."""

    __slots__ = ("task", "accumulates", "nested", "pass_state", "hits", "start", "captured", "tensor_grads")

    def __init__(self, task: int, accumulates: Optional[bool], nested: bool, pass_state: "PassState"):
        self.task = task
        self.accumulates = accumulates
        self.nested = nested
        self.pass_state = pass_state
        # The pass's own logs, appended to in hook order: a nested run's hits
        # interleave with its outer run's exactly as the engine delivered them.
        self.hits: List[int] = pass_state.hits
        self.start = len(pass_state.hits)
        self.captured: List[Tuple[int, torch.Tensor]] = []  # autograd.grad: the gradients handed back
        self.tensor_grads: List[Tuple[str, torch.Tensor]] = []


class PassState:
    """Device-side accumulators of one pass, until it ends."""

    def __init__(self, name: str, auto: bool, keep_grads: bool):
        self.name = name
        self.auto = auto
        self.keep_grads = keep_grads
        self.runs = 0
        self.kinds: List[str] = []
        self.hits: List[int] = []  # parameter indices, in the order the hooks fired (backward order)
        self.written: List[int] = []  # post-accumulate hooks: .grad written
        self.backward_params: set = set()
        self.capture_sums: Dict[int, torch.Tensor] = {}
        # .grad as it was when the pass first reached a parameter, where it was
        # not None: the pass's own gradient is .grad minus this.
        self.bases: Dict[int, torch.Tensor] = {}
        self.tensor_grads: Dict[str, List[torch.Tensor]] = {}
        self.expected: Optional[set] = None
        self.expected_partial = False
        self.closed = False

    def note_kind(self, kind: str) -> None:
        if kind not in self.kinds:
            self.kinds.append(kind)


class StandIn:
    """Nested runs (consecutive graph-task ids) seen before any hook of their outer run."""

    __slots__ = ("state", "first", "last", "claimed")

    def __init__(self, state: "PassState", task: int):
        self.state = state
        self.first = task
        self.last = task
        self.claimed = False  # the outer run fired a hook later and joined


class Recorder:
    """Owns every hook callback and the run/pass bookkeeping of one Trace."""

    def __init__(self, names: List[str], params: List[torch.Tensor], keep_grads: bool,
                 on_pass_ready: Callable[["PassState", "PendingPass"], None]):
        self.names = names
        self.params = params
        self.keep_grads = keep_grads
        self.on_pass_ready = on_pass_ready
        self.active: Optional[PassState] = None  # the labelled pass, if any
        self.open_runs: Dict[int, Run] = {}
        self.orphan: Optional[PassState] = None  # a pass opened by a nested run whose outer run is unseen
        self.standin: Optional[StandIn] = None  # nested runs whose outer run had fired no hook
        self.auto_counter = itertools.count(1)
        self.lock = threading.Lock()
        self.kept: Dict[str, Dict[str, torch.Tensor]] = {}
        self.enabled = True
        self.written_log: List[torch.Tensor] = []
        self.layouts: Dict[tuple, list] = {}  # stats.grad_stats's grouping, per order of parameters
        self.index_of: Dict[int, int] = {id(p): i for i, p in enumerate(params)}

    # ---- hooks ---------------------------------------------------------
    def param_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        param = self.params[index]
        open_runs = self.open_runs
        task_id = _current_task if _current_task is not None else (lambda: -1)

        def on_grad(grad: torch.Tensor) -> None:
            run = open_runs.get(task_id())
            if run is None:
                run = self.open_run(task_id())
                if run is None:
                    return
            if run.accumulates is None:  # opened by a registered tensor's hook
                self.settle_kind(run, run_accumulates_grad())
            run.hits.append(index)
            if not run.accumulates:
                run.captured.append((index, grad))
            elif param.grad is not None:
                self.note_existing_grad(run.pass_state, index, param.grad)

        return on_grad

    def post_accumulate_hook(self) -> Callable[[torch.Tensor], None]:
        """The hook for tensor-subclass parameters: ``list.append``, a builtin, so no Python frame per call.

        It logs which parameters had ``.grad`` written; the log is drained when
        the run (or the pass) ends. FSDP2 calls these hooks on sharded grads
        without the tensor hook having fired: the union of both is what was reached.
        """
        return self.written_log.append

    def drain_written(self, state: "PassState") -> None:
        log = self.written_log
        if not log:
            return
        index_of = self.index_of
        indices = [index_of[id(p)] for p in log if id(p) in index_of]
        log.clear()
        state.written.extend(indices)
        state.backward_params.update(indices)
        state.note_kind("backward")

    def tensor_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        task_id = _current_task if _current_task is not None else (lambda: -1)

        def on_tensor_grad(grad: torch.Tensor) -> None:
            run = self.open_runs.get(task_id())
            if run is None:
                # Whether this run writes .grad is only known at a parameter (a leaf).
                run = self.open_run(task_id(), accumulates=None, from_tensor=True)
                if run is None:
                    return
            run.tensor_grads.append((name, _tensor_grad_stats(grad)))

        return on_tensor_grad

    # ---- runs ------------------------------------------------------------
    def open_run(self, task: int, accumulates: Optional[bool] = None, from_tensor: bool = False) -> Optional[Run]:
        if not self.enabled:
            return None
        with self.lock:
            run = self.open_runs.get(task)
            if run is not None:
                return run
            if accumulates is None and not from_tensor:
                accumulates = run_accumulates_grad()
            nested = started_inside_another_run()
            pass_state = self._pass_for_new_run(task, nested, accumulates)
            run = Run(task, None, nested, pass_state)
            if accumulates is not None:
                self.settle_kind(run, accumulates)
            self.open_runs[task] = run
        _queue_callback(lambda: self.close_run(run))
        return run

    @staticmethod
    def settle_kind(run: Run, accumulates: bool) -> None:
        run.accumulates = accumulates
        run.pass_state.note_kind("backward" if accumulates else "grad")

    def _pass_for_new_run(self, task: int, nested: bool, accumulates: Optional[bool]) -> PassState:
        if nested:
            outer = [r for r in self.open_runs.values() if not r.nested and r.task < task]
            if outer:
                return outer[-1].pass_state
            # No hook of the outer run has fired (yet). The engine numbers graph
            # tasks in order, so nested runs with consecutive ids belong to one
            # outer run: the first of them stands in for it, the others join it.
            group = self.standin
            if group is not None and task == group.last + 1 and not group.state.closed:
                group.last = task
                return group.state
            if self.active is not None:
                state = self.active
                state.runs += 1
            else:
                self.flush_orphan()
                state = PassState(self._auto_name(accumulates), auto=True, keep_grads=self.keep_grads)
                state.runs = 1
                self.orphan = state
            self.standin = StandIn(state, task)
            return state
        group = self.standin
        if group is not None and not group.claimed and task < group.first and not group.state.closed:
            # The outer run of nested runs seen first (it started before them): already counted.
            group.claimed = True
            if self.orphan is group.state:
                self.orphan = None
            return group.state
        if self.active is not None:
            self.active.runs += 1
            return self.active
        self.flush_orphan()
        state = PassState(self._auto_name(accumulates), auto=True, keep_grads=self.keep_grads)
        state.runs = 1
        return state

    def _auto_name(self, accumulates: Optional[bool]) -> str:
        """Runs outside any pass_ are passes of their own: backward-1, grad-2, ... (run-3: only tensors reached)."""
        kind = {True: "backward", False: "grad", None: "run"}[accumulates]
        return f"{kind}-{next(self.auto_counter)}"

    def close_run(self, run: Run) -> None:
        with self.lock:
            self.open_runs.pop(run.task, None)
        state = run.pass_state
        if run.accumulates:
            # Nested runs only ever accumulate, so the slice may include theirs: harmless.
            state.backward_params.update(state.hits[run.start:])
        self.drain_written(state)
        for index, grad in run.captured:
            previous = state.capture_sums.get(index)
            # Never add in place: the first gradient is the caller's own tensor.
            state.capture_sums[index] = grad if previous is None else previous + grad
        for name, facts in run.tensor_grads:
            state.tensor_grads.setdefault(name, []).append(facts)
        if state.auto and not run.nested and state is not self.orphan:
            self.finish_pass(state)

    # ---- .grad that was there before the pass ----------------------------
    def note_existing_grad(self, state: PassState, index: int, grad: torch.Tensor) -> None:
        """Called before AccumulateGrad adds to a non-None ``.grad``.

        The first time in a pass, keep a copy: the pass's gradient is what
        ``.grad`` gains, and a nonzero copy means the grads were not zeroed.
        """
        # Earlier runs of this pass put the gradient there themselves. An
        # unlabelled run is its own pass: accumulating microbatches without a
        # label is legitimate, and a copy per parameter per run would be the
        # price, so it reports .grad as the run left it.
        if state.auto or index in state.bases or index in state.backward_params:
            return
        state.bases[index] = grad.detach().clone()

    # ---- passes ----------------------------------------------------------
    def begin_pass(self, name: str) -> PassState:
        state = PassState(name, auto=False, keep_grads=self.keep_grads)
        self.active = state
        return state

    def end_pass(self, state: PassState) -> None:
        self.active = None
        self.drain_written(state)  # writes no tensor hook announced (FSDP2) land in the labelled pass
        self.finish_pass(state)

    def finish_pass(self, state: PassState) -> None:
        """Compute the pass's statistics on the device; hand them over for one host transfer."""
        if state.closed:
            return
        state.closed = True
        self.on_pass_ready(state, PendingPass.build(self, state))

    def flush_orphan(self) -> None:
        if self.orphan is not None:
            state, self.orphan = self.orphan, None
            self.finish_pass(state)


class PendingPass:
    """A finished pass whose statistics still live on the device."""

    def __init__(self, state: PassState, names: List[str], order: List[int], hits: Counter,
                 via: Dict[int, str], device_stats, base_stats, stale_candidates: List[int],
                 tensor_stats: Dict[str, torch.Tensor]):
        self.state = state
        self.names = names
        self.order = order
        self.hits = hits
        self.via = via
        self.device_stats = device_stats
        self.base_stats = base_stats
        self.stale_candidates = stale_candidates
        self.tensor_stats = tensor_stats

    @classmethod
    def build(cls, recorder: Recorder, state: PassState) -> "PendingPass":
        order = list(dict.fromkeys(itertools.chain(state.hits, state.written)))
        hits = Counter(state.hits)
        for index in set(state.written) - set(hits):
            hits[index] = 1  # written without a tensor-hook delivery (FSDP2)

        params = recorder.params
        totals: List[torch.Tensor] = []
        if not state.bases and not state.capture_sums:  # the common case: .backward() into zeroed grads
            totals = [params[i].grad for i in order]
            via: Dict[int, str] = dict.fromkeys(order, "backward")
        if not totals or any(g is None for g in totals):
            totals, via = [], {}
            for index in order:
                total, via[index] = _pass_gradient(params[index], state, index)
                totals.append(total)
        if state.keep_grads:
            recorder.kept[state.name] = {recorder.names[i]: t.detach().clone() for i, t in zip(order, totals)}
        stale_candidates = list(state.bases)
        device_stats = stats.grad_stats(totals, recorder.layouts, tuple(order)) if totals else {}
        base_stats = stats.grad_stats([state.bases[i] for i in stale_candidates]) if stale_candidates else {}
        tensor_stats = {name: torch.stack(parts).to(torch.float64) for name, parts in state.tensor_grads.items()}
        # Release the device accumulators now: only the (n, 3) statistics stay.
        state.capture_sums.clear()
        state.bases.clear()
        state.tensor_grads.clear()
        return cls(state, recorder.names, order, hits, via, (device_stats, len(totals)),
                   (base_stats, len(stale_candidates)), stale_candidates, tensor_stats)

    def materialize(self, params: Tuple[str, ...]) -> Tuple[PassTrace, Dict[str, TensorGradFacts]]:
        """The one host transfer of a pass."""
        grad_rows = stats.stats_to_host(*self.device_stats) if self.order else []
        base_rows = stats.stats_to_host(*self.base_stats) if self.stale_candidates else []
        stale = {i for i, row in zip(self.stale_candidates, base_rows) if row[1] != 0.0 or row[2] != 0.0}
        state = self.state
        trace = PassTrace(name=state.name, params=params, runs=state.runs, kinds=list(state.kinds),
                          auto=state.auto, kept_grads=state.keep_grads)
        names, hits, via, order = self.names, self.hits, self.via, self.order
        norms = [row[0] for row in grad_rows]
        max_abs = [row[1] for row in grad_rows]
        nonfinite = [int(row[2]) for row in grad_rows]
        # Columns in GradRecord's field order; records are built when first read.
        trace._columns = (
            [names[i] for i in order], [hits[i] for i in order], norms, max_abs,
            [m == 0.0 and n == 0 for m, n in zip(max_abs, nonfinite)], nonfinite,
            [via[i] for i in order], list(range(len(order))), [i in stale for i in order])
        if state.expected is not None:
            trace.expected = sorted(state.expected)
            trace.expected_partial = state.expected_partial
        tensors: Dict[str, TensorGradFacts] = {}
        for name, rows in self.tensor_stats.items():
            rows = rows.tolist()
            tensors[name] = TensorGradFacts(
                hits=len(rows), norm=sum(r[0] for r in rows) ** 0.5,
                max_abs=max(r[1] for r in rows), nonfinite=int(sum(r[2] for r in rows)))
        return trace, tensors


def _pass_gradient(param: torch.Tensor, state: PassState, index: int) -> Tuple[torch.Tensor, str]:
    """What the pass gave this parameter: .grad's gain plus the gradients handed back."""
    parts = []
    how = []
    if index in state.backward_params:
        grad = param.grad
        if grad is None:  # cleared during the pass: nothing left to measure
            grad = torch.zeros_like(param)
        base = state.bases.get(index)
        parts.append(grad if base is None else grad - base)
        how.append("backward")
    captured = state.capture_sums.get(index)
    if captured is not None:
        parts.append(captured)
        how.append("grad")
    if not parts:
        return torch.zeros_like(param), "backward"
    total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return total, "both" if len(how) == 2 else how[0]


def _tensor_grad_stats(grad: torch.Tensor) -> torch.Tensor:
    """(sum of squares, max |g|, nonfinite count) of a registered tensor's incoming gradient."""
    g = grad.detach()
    if g.numel() == 0:
        return torch.zeros(3, dtype=torch.float64, device=g.device)
    g = g.to(torch.float64)
    return torch.stack([(g * g).sum(), g.abs().max(), (~torch.isfinite(g)).sum().to(torch.float64)])
