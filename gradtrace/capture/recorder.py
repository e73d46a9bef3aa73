"""Capture: parameter and tensor hooks, and what they hand to the trace when a pass ends.

Hooks only record. A hook never changes a gradient, never copies to the host,
and in a ``.backward()`` run never keeps a reference to the incoming gradient
(that would make AccumulateGrad copy it instead of stealing it): the pass's
gradient is read from ``.grad`` when the pass ends.

The pieces: ``runs`` says which engine run a hook fired in and closes it;
``passes`` decides which pass a run belongs to; the ``Recorder`` here owns
the hook callbacks and turns a finished pass into a ``PendingPass`` whose
statistics stay on the device until the trace is read (one host transfer).
"""
from __future__ import annotations

import array
import itertools
import operator
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .._torch_compat import is_batched_grad
from ..records import PassColumns, PassTrace, TensorGradFacts
from . import hook_state, stats
from .passes import PassAssigner, PassState
from .runs import Run, at_run_end, current_task, run_accumulates_grad, started_inside_another_run


class Recorder:
    """Owns every hook callback and the run bookkeeping of one live trace."""

    def __init__(self, names: List[str], params: List[torch.Tensor], keep_grads: bool,
                 on_pass_ready: Callable[[PassState, "PendingPass"], None],
                 backward_scope: Callable[[], str] = lambda: "local"):
        self.names = names
        self.backward_scope = backward_scope  # PassTrace.scope of a .backward() run, asked as it ends
        self.params = params
        self.keep_grads = keep_grads
        self.on_pass_ready = on_pass_ready
        self.passes = PassAssigner(keep_grads, self.finish_pass)
        self.open_runs: Dict[int, Run] = {}
        self.lock = threading.Lock()
        self.kept: Dict[str, Dict[str, torch.Tensor]] = {}  # keep_grads: each pass's gradients, by name
        self.enabled = True
        self.written_log: List[torch.Tensor] = []
        self.layouts: Dict[tuple, list] = {}  # stats.grad_stats's grouping, per order of parameters
        self.index_of: Dict[int, int] = {id(p): i for i, p in enumerate(params)}
        self.optimizer_stepped = False
        self.hook_ids: List[int] = []  # each parameter's gradtrace tensor hook, by index (RemovableHandle.id)

    @property
    def active(self) -> Optional[PassState]:
        return self.passes.active

    # ---- hooks ---------------------------------------------------------
    def param_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        param = self.params[index]
        open_runs = self.open_runs

        def on_grad(grad: torch.Tensor) -> None:
            run = open_runs.get(current_task())
            if run is None:
                run = self.open_run(current_task(), on_accelerator=grad.device.type != "cpu")
                if run is None:
                    return
            if run.accumulates is None:  # opened by a registered tensor's hook
                self.settle_kind(run, run_accumulates_grad())
            run.pass_state.hits.append(index)
            if not run.accumulates:
                if is_batched_grad(grad):
                    run.pass_state.unseen_handbacks.add(index)
                else:
                    run.captured.append((index, grad))
            elif param.grad is not None:
                self.note_existing_grad(run.pass_state, index, param.grad)

        return on_grad

    def post_accumulate_hook(self) -> Callable[[torch.Tensor], None]:
        """The hook for every parameter: ``list.append``, a builtin, so no Python frame per call.

        It logs which parameters had ``.grad`` written; the log is drained when
        the run (or the pass) ends. FSDP2 calls these hooks on sharded grads
        without the tensor hook having fired: the union of both is what was reached.
        """
        return self.written_log.append

    def sharded_written_hook(self) -> Callable[[torch.Tensor], None]:
        """The hook for sharded (DTensor) parameters: FSDP2 writes their ``.grad`` in its post-backward
        without any tensor hook firing, so the write itself must open the run (else ``runs`` stays 0
        and an unlabelled pass never ends)."""
        log = self.written_log

        def on_written(param: torch.Tensor) -> None:
            log.append(param)
            task = current_task()
            if task >= 0 and task not in self.open_runs:
                self.open_run(task, written=True)

        return on_written

    def drain_written(self, state: PassState) -> List[int]:
        """Move the post-accumulate log into ``state``; the indices written since the last drain."""
        log = self.written_log
        if not log:
            return []
        index_of = self.index_of
        indices = [index_of[id(p)] for p in log if id(p) in index_of]
        log.clear()
        state.written.extend(indices)
        state.backward_params.update(indices)
        state.note_kind("backward")
        return indices

    def flat_hook(self, indices: List[int]) -> Callable[[torch.Tensor], None]:
        """The hook on an FSDP1 flat parameter: backward reaches the flat parameter, never the originals
        the user named (``indices``), whose ``.grad`` FSDP1 sets in its post-backward; read at run end."""

        def on_flat_grad(grad: torch.Tensor) -> None:
            task = current_task()
            run = self.open_runs.get(task) or self.open_run(task, written=True)
            if run is None:
                return
            state = run.pass_state
            state.written.extend(indices)
            state.backward_params.update(indices)

        return on_flat_grad

    def tensor_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def on_tensor_grad(grad: torch.Tensor) -> None:
            run = self.open_runs.get(current_task())
            if run is None:
                # Whether this run writes .grad is only known at a parameter (a leaf).
                run = self.open_run(current_task(), from_tensor=True, on_accelerator=grad.device.type != "cpu")
                if run is None:
                    return
            run.tensor_grads.append((name, _tensor_grad_stats(grad)))

        return on_tensor_grad

    # ---- runs ------------------------------------------------------------
    def open_run(self, task: int, from_tensor: bool = False, on_accelerator: bool = False,
                 written: bool = False) -> Optional[Run]:
        if not self.enabled:
            return None
        with self.lock:
            run = self.open_runs.get(task)
            if run is not None:
                return run
            accumulates = True if written else None if from_tensor else run_accumulates_grad()
            # A write from FSDP2's post-backward runs under its autograd Function's backward,
            # which would look nested; a post-accumulate hook only fires in a top-level .backward().
            nested = False if written else started_inside_another_run()
            run = Run(task, nested, self.passes.assign(task, nested, accumulates, self.open_runs.values(),
                                                       on_accelerator))
            if accumulates is not None:
                self.settle_kind(run, accumulates)
            self.open_runs[task] = run
        at_run_end(lambda: self.close_run(run, in_engine=True))
        return run

    @staticmethod
    def settle_kind(run: Run, accumulates: bool) -> None:
        run.accumulates = accumulates
        run.pass_state.note_kind("backward" if accumulates else "grad")

    def close_run(self, run: Run, in_engine: bool = False) -> None:
        with self.lock:
            self.open_runs.pop(run.task, None)
        state = run.pass_state
        reached = state.hits[run.start:]  # an outer run's slice includes its nested runs': harmless
        if run.accumulates:
            state.backward_params.update(reached)
            state.scope = self.backward_scope()  # asked now: DDP's no_sync() is still in effect
        written = self.drain_written(state)
        finished_now = state.auto and not run.nested and state is not self.passes.orphan
        if (run.accumulates or written) and not finished_now:
            indices = list(dict.fromkeys(itertools.chain(reached, written)))
            all_backward = bool(run.accumulates)  # then every index is in backward_params
            if in_engine and state.read_at == "run_end":
                # Read .grad only after every other end-of-run callback of this run: DDP queues its
                # finalize_backward (which writes the averaged gradient) after ours, when its last
                # bucket is ready; a callback queued from a callback runs after all of them.
                at_run_end(lambda: self.note_run_end(state, indices, all_backward))
            else:
                self.note_run_end(state, indices, all_backward)
        for index, grad in run.captured:
            if not hook_state.keep_last(self.params[index], self.hook_ids[index]):
                # A hook registered after ours ran after it and may have changed the gradient handed
                # back: this run's figure is unknown; from the next run on, ours runs last.
                state.unseen_handbacks.add(index)
                continue
            previous = state.capture_sums.get(index)
            # Never add in place: the first gradient is the caller's own tensor.
            state.capture_sums[index] = grad if previous is None else previous + grad
        for name, facts in run.tensor_grads:
            state.tensor_grads.setdefault(name, []).append(facts)
        if finished_now:
            if in_engine:
                # .grad is final only after every other end-of-run callback of this run (DDP's
                # finalize_backward, queued when its last bucket was ready, after ours; FSDP's
                # post-backward): a callback queued from a callback runs after all of them.
                at_run_end(lambda: self.finish_pass(state))
            else:
                self.finish_pass(state)

    def note_run_end(self, state: PassState, indices: List[int], all_backward: bool = False) -> None:
        """What ``.grad`` holds as this run leaves it, for parameters the run reached.

        Read now for ``read_at="run_end"``; otherwise keep the tensor and its version, so
        a ``.grad`` set to None before the pass ends is still read as the run left it, and
        one zeroed or changed in place afterwards is known to have been.
        """
        params = self.params
        if not all_backward:
            indices = [i for i in indices if i in state.backward_params]
        if state.read_at == "run_end":
            grads = [params[i].grad for i in indices]
            kept = [(i, g) for i, g in zip(indices, grads) if g is not None]
            if kept:
                totals = [_gain(g, state.bases.get(i)) for i, g in kept]
                state.run_stats.append(([i for i, _ in kept], DeviceStats(stats.grad_stats(totals), len(totals))))
            return
        refs = state.run_end_grads
        grads = list(map(_GRAD, map(params.__getitem__, indices)))  # C-level loops: this runs per parameter
        try:
            refs.update(zip(indices, zip(grads, map(_VERSION, grads))))
        except AttributeError:  # a .grad that is None: kept out
            refs.update((i, (g, g._version)) for i, g in zip(indices, grads) if g is not None)

    def close_open_runs(self) -> None:
        """At exit: runs cut short by an exception still land in their pass."""
        for run in list(self.open_runs.values()):
            self.close_run(run)

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
    def begin_pass(self, name: str, step_start: bool = False, read_at: str = "pass_end") -> PassState:
        # The first pass after an optimizer step (seen through watch(optimizer=...)) starts a step.
        state = PassState(name, auto=False, keep_grads=self.keep_grads,
                          step_start=step_start or self.optimizer_stepped, read_at=read_at)
        self.optimizer_stepped = False
        self.passes.active = state
        return state

    def on_optimizer_step(self, *args, **kwargs) -> None:
        self.optimizer_stepped = True

    def end_pass(self, state: PassState) -> None:
        labels = self.passes.labels
        for thread in [t for t, label in labels.items() if label is state]:  # at exit, maybe another thread's
            del labels[thread]
        self.drain_written(state)  # writes no tensor hook announced (FSDP2) land in the labelled pass
        self.finish_pass(state)

    def finish_pass(self, state: PassState) -> None:
        """Compute the pass's statistics on the device; hand them over for one host transfer."""
        if state.closed:
            return
        state.closed = True
        self.on_pass_ready(state, PendingPass.build(self, state))

    def flush_orphan(self) -> None:
        self.passes.flush_orphan()


@dataclass
class DeviceStats:
    """``stats.grad_stats``'s result for ``count`` gradients, still on the device."""

    per_device: dict
    count: int

    def to_host(self) -> np.ndarray:
        """The (count, 3) float64 figures in input order: one host transfer per device."""
        return stats.stats_to_host(self.per_device, self.count)


@dataclass
class PendingPass:
    """A finished pass whose statistics still live on the device."""

    state: PassState
    names: List[str]  # every watched parameter, by index
    order: List[int]  # indices of the parameters reached, in backward order
    hits: Counter
    via: Dict[int, str]
    # (indices, statistics) pieces; a later piece overrides an earlier one for the same index
    pieces: List[Tuple[List[int], DeviceStats]]
    bases: DeviceStats  # .grad as the pass found it, for staleness
    stale_candidates: List[int]
    cleared: set  # indices whose figure is unknown: .grad cleared before it could be read
    changed: set  # indices whose .grad was changed in place after their last run: zero means cleared
    tensor_stats: Dict[str, torch.Tensor]
    empty: set  # indices whose local gradient has no element (an empty FSDP shard): never "exactly zero"

    @classmethod
    def build(cls, recorder: Recorder, state: PassState) -> "PendingPass":
        order = list(dict.fromkeys(itertools.chain(state.hits, state.written)))
        hits = Counter(state.hits)
        if state.written:
            for index in set(state.written) - set(hits):
                hits[index] = 1  # written without a tensor-hook delivery (FSDP2)
        pieces = list(state.run_stats)
        if pieces:
            read_before = {i for indices, _ in pieces for i in indices}
            now = [i for i in order if i not in read_before or i in state.capture_sums]
        else:
            now = order
        reading = _pass_gradients(recorder.params, state, now)
        via = reading.via if len(reading.via) == len(order) else {**dict.fromkeys(order, "backward"), **reading.via}
        if state.keep_grads:
            recorder.kept[state.name] = _kept(recorder, state, order, dict(zip(now, reading.totals)))
        if reading.totals:
            pieces.append((now, DeviceStats(stats.grad_stats(reading.totals, recorder.layouts, tuple(now)),
                                            len(reading.totals))))
        stale_candidates = list(state.bases)
        empty = _empty(now, reading.totals)
        bases = DeviceStats(stats.grad_stats([state.bases[i] for i in stale_candidates]) if stale_candidates
                            else {}, len(stale_candidates))
        tensor_stats = {name: torch.stack(parts).to(torch.float64) for name, parts in state.tensor_grads.items()}
        # Release the device accumulators now: only the (n, 3) statistics stay.
        state.capture_sums.clear()
        state.bases.clear()
        state.tensor_grads.clear()
        state.run_end_grads.clear()
        state.run_stats.clear()
        return cls(state, recorder.names, order, hits, via, pieces, bases, stale_candidates,
                   reading.cleared, reading.changed, tensor_stats, empty)

    def figures(self) -> np.ndarray:
        """(norm, max |g|, NaN/Inf count) of every reached parameter, in ``order``; one host transfer."""
        order = self.order
        if len(self.pieces) == 1 and self.pieces[0][0] is order:
            return self.pieces[0][1].to_host()
        rows: Dict[int, np.ndarray] = {}
        for indices, device_stats in self.pieces:
            rows.update(zip(indices, device_stats.to_host()))
        none = np.zeros(3)
        return np.array([rows.get(i, none) for i in order], dtype=np.float64).reshape(len(order), 3)

    def materialize(self, params: Tuple[str, ...]) -> Tuple[PassTrace, Dict[str, TensorGradFacts]]:
        """The one host transfer of a pass."""
        grid = self.figures()
        state = self.state
        names, hits, via, order = self.names, self.hits, self.via, self.order
        stale = set()
        if state.step_start:  # accumulating into .grad is legitimate anywhere else
            base_rows = self.bases.to_host()
            stale = {i for i, row in zip(self.stale_candidates, base_rows) if row[1] != 0.0 or row[2] != 0.0}
        max_abs, bad = grid[:, 1], grid[:, 2]
        unknown = _members(order, self.cleared) | (_members(order, self.changed) & (max_abs == 0.0) & (bad == 0))
        zero = (max_abs == 0.0) & (bad == 0) & ~unknown & ~_members(order, self.empty)
        columns = PassColumns(
            name=[names[i] for i in order], hits=[hits[i] for i in order], norm=_doubles(grid[:, 0]),
            max_abs=_doubles(max_abs), zero=zero.tolist(), nonfinite=bad.astype(np.int64).tolist(),
            via=[via[i] for i in order], order=range(len(order)),
            stale=[i in stale for i in order] if stale else [False] * len(order), cleared=unknown.tolist())
        trace = PassTrace.from_columns(columns, name=state.name, params=params, runs=state.runs,
                                       kinds=list(state.kinds), auto=state.auto, kept_grads=state.keep_grads,
                                       step_start=state.step_start, failed=state.failed,
                                       scope=state.scope if "backward" in state.kinds else "local")
        if state.expected is not None:
            trace.expected = sorted(state.expected)
            trace.expected_partial = state.expected_partial
        return trace, self._tensor_facts()

    def _tensor_facts(self) -> Dict[str, TensorGradFacts]:
        tensors: Dict[str, TensorGradFacts] = {}
        for name, rows in self.tensor_stats.items():
            rows = rows.tolist()
            tensors[name] = TensorGradFacts(
                hits=len(rows), norm=sum(r[0] for r in rows) ** 0.5,
                max_abs=max(r[1] for r in rows), nonfinite=int(sum(r[2] for r in rows)))
        return tensors


def _members(order: List[int], indices: set) -> np.ndarray:
    """A bool mask over ``order``: which of its parameters are in ``indices`` (usually none)."""
    mask = np.zeros(len(order), dtype=bool)
    if indices:
        mask[[k for k, i in enumerate(order) if i in indices]] = True
    return mask


def _doubles(values: np.ndarray) -> array.array:
    """A float column as 8 bytes a value (a list of floats holds 32): a long-open watch keeps many."""
    column = array.array("d")
    column.frombytes(np.ascontiguousarray(values, dtype=np.float64).tobytes())
    return column


def _kept(recorder: Recorder, state: PassState, order: List[int], now: Dict[int, torch.Tensor]):
    """keep_grads: a copy of each reached parameter's gradient in the pass (read now, or as .grad is)."""
    kept = {}
    for i in order:
        grad = now.get(i)
        if grad is None:
            grad = recorder.params[i].grad
        if grad is not None:
            kept[recorder.names[i]] = grad.detach().clone()
    return kept


@dataclass
class Reading:
    """The pass-end reading of some parameters' gradients."""

    totals: List[torch.Tensor]
    via: Dict[int, str]
    cleared: set
    changed: set


def _pass_gradients(params: List[torch.Tensor], state: PassState, order: List[int]) -> Reading:
    """Every given parameter's gradient in the pass, and how it arrived ("backward", "grad", "both")."""
    refs = state.run_end_grads
    if not state.bases and not state.capture_sums and not state.unseen_handbacks:  # the common case: zeroed grads, .backward() only
        totals = list(map(_GRAD, map(params.__getitem__, order)))
        if not any(map(operator.is_, totals, itertools.repeat(None))) and _all_as_left(params, refs):
            return Reading(totals, dict.fromkeys(order, "backward"), set(), set())
    reading = Reading([], {}, set(), set())
    for index in order:
        total, reading.via[index] = _pass_gradient(params[index], state, index, reading)
        reading.totals.append(total)
    return reading


_GRAD = operator.attrgetter("grad")
_VERSION = operator.attrgetter("_version")
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)


def _all_as_left(params: List[torch.Tensor], refs: Dict[int, Tuple[torch.Tensor, int]]) -> bool:
    """Is every ``.grad`` in ``refs`` still the tensor its last run left, unchanged since? (C-level loops.)"""
    if not refs:
        return True
    kept = list(map(_FIRST, refs.values()))
    return (all(map(operator.is_, map(_GRAD, map(params.__getitem__, refs)), kept))
            and all(map(operator.eq, map(_VERSION, kept), map(_SECOND, refs.values()))))


def _gain(grad: torch.Tensor, base: Optional[torch.Tensor]) -> torch.Tensor:
    return grad if base is None else grad - base


def _pass_gradient(param: torch.Tensor, state: PassState, index: int, reading: Reading) -> Tuple[torch.Tensor, str]:
    """What the pass gave this parameter: .grad's gain plus the gradients handed back."""
    if index in state.unseen_handbacks and index not in state.backward_params:
        return _unknown(param, index, reading), "grad"
    parts = []
    how = []
    if index in state.backward_params:
        grad = _backward_grad(param, state, index, reading)
        parts.append(_gain(grad, state.bases.get(index)))
        how.append("backward")
    captured = state.capture_sums.get(index)
    if captured is not None:
        parts.append(captured)
        how.append("grad")
    if not parts:
        return torch.zeros_like(param), "backward"
    total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return total, "both" if len(how) == 2 else how[0]


def _backward_grad(param: torch.Tensor, state: PassState, index: int, reading: Reading) -> torch.Tensor:
    """``.grad`` as the pass left it: now, or as its last run left it when it was cleared since."""
    grad = param.grad
    ref = state.run_end_grads.get(index)
    if ref is None:
        if grad is None:  # never written where a run could see it (an optimizer in backward cleared it)
            return _unknown(param, index, reading)
        return grad
    kept, version = ref
    if grad is None or grad is not kept:  # set to None (or replaced) after the run: the run's tensor is intact
        return kept if kept._version == version else _unknown(param, index, reading)
    if grad._version != version:  # changed in place since (a wrapper's reduction, or zero_grad(set_to_none=False))
        reading.changed.add(index)
    return grad


def _unknown(param: torch.Tensor, index: int, reading: Reading) -> torch.Tensor:
    reading.cleared.add(index)
    return torch.zeros_like(param)


def _empty(indices: List[int], grads: List[torch.Tensor]) -> set:
    """Indices whose local gradient has no element: a plain tensor's numel, a DTensor's local shard's."""
    if grads and set(map(type, grads)) == {torch.Tensor}:  # the common case, in C-level loops
        sizes = list(map(torch.Tensor.numel, grads))
        return set() if all(sizes) else {i for i, n in zip(indices, sizes) if not n}
    return {i for i, g in zip(indices, grads) if not (g.numel() if type(g) is torch.Tensor else _local_numel(g))}


def _local_numel(g: torch.Tensor) -> int:
    to_local = getattr(g, "to_local", None)  # a DTensor's numel is the global one
    return (to_local() if callable(to_local) else g).numel()


def _tensor_grad_stats(grad: torch.Tensor) -> torch.Tensor:
    """(sum of squares, max |g|, nonfinite count) of a registered tensor's incoming gradient."""
    g = grad.detach()
    if g.is_complex():  # the modulus: casting to float64 would drop the imaginary part
        g = g.abs()
    if g.numel() == 0:
        return torch.zeros(3, dtype=torch.float64, device=g.device)
    g = g.to(torch.float64)
    return torch.stack([(g * g).sum(), g.abs().max(), (~torch.isfinite(g)).sum().to(torch.float64)])
