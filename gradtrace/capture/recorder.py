"""Capture: the hooks, and the engine runs they fire in.

Hooks only record. A hook never changes a gradient, never copies to the host,
and in a ``.backward()`` run never keeps a reference to the incoming gradient
(that would make AccumulateGrad copy it instead of stealing it): the pass's
gradient is read from ``.grad`` when the pass ends.

The pieces: ``runs`` says which engine run a hook fired in and closes it;
``assign`` decides which pass a run belongs to; ``passes.Pass`` holds a pass's
state from its first run to its record. The ``Recorder`` here owns the hook
callbacks and tells the pass of each run what its hooks saw; it never changes
a pass's state itself.
"""
from __future__ import annotations

import itertools
import operator
import threading
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .._torch_compat import is_batched_grad
from . import hook_state
from .assign import PassAssigner
from .hookless import HOOKLESS, LEARNING, ForwardOutputs, HooklessRuns, snapshot
from .reading import RunLeft
from .optim import _sample
from .passes import Pass, Watched
from .runs import Run, at_run_end, current_task, run_accumulates_grad, started_inside_another_run
from . import wrappers
from .wrappers import Wrapper


_GRAD = operator.attrgetter("grad")


class Recorder:
    """Owns every hook callback and the run bookkeeping of one live trace."""

    def __init__(self, watched: Watched, wrapper: Wrapper):
        self.watched = watched
        self.names = watched.names
        self.params = watched.params
        self.wrapper = wrapper  # PassTrace.scope of a .backward() run, asked as it ends
        self.passes = PassAssigner(watched)
        self.open_runs: Dict[int, Run] = {}
        self.lock = threading.Lock()
        self.enabled = True
        self.written_log: List[torch.Tensor] = []
        self.index_of: Dict[int, int] = {id(p): i for i, p in enumerate(watched.params)}
        self.optimizer_stepped = False
        # What the latest .backward() run left in .grad since the last optimizer step, for one parameter
        # it reached: (index, a weak reference to that .grad, its version). The next run sees from it
        # whether zero_grad() ran in between (see ``_check_reset``).
        self.last_written: Optional[Tuple[int, weakref.ref, int]] = None
        self.last_scope: Optional[str] = None  # the scope of the latest .backward() run (a wrapper's sync)
        # Each parameter's gradtrace tensor hook, put in and taken out, and the runs read without
        # them (``capture/hookless.py``): made by ``install``.
        self.param_hooks: Optional[hook_state.ParamHooks] = None
        self.hookless: Optional[HooklessRuns] = None
        self.starts: Dict[int, tuple] = {}  # task -> how a run began at the model's output, hooks in

    def install(self, hookless_possible: bool) -> hook_state.ParamHooks:
        """Every parameter's tensor hook in (the handle that takes them out); with ``hookless_possible``
        (a watched model, plain leaf parameters, no wrapper), ``.backward()`` runs may later be read
        without them."""
        self.param_hooks = hook_state.ParamHooks(self.params, [self.param_hook(i) for i in range(len(self.params))])
        self.hookless = HooklessRuns(self.params, self.param_hooks, possible=hookless_possible)
        self.hookless.start()
        return self.param_hooks

    def forward_outputs(self, handles: list) -> Optional[ForwardOutputs]:
        """The watched model's forward hooks that mark where each run starts (None: hooks always)."""
        if self.hookless is None or not self.hookless.possible:
            return None
        def on_output_grad(grad: torch.Tensor) -> None:  # a function, not a bound method (see pre_hook)
            self.on_output_grad(grad)

        return ForwardOutputs(on_output_grad, self.hookless.relearn, handles, self.hookless.find_nodes,
                              self.hookless.pin)

    @property
    def active(self) -> Optional[Pass]:
        return self.passes.active

    def active_pass_name(self) -> Optional[str]:
        active = self.passes.active
        return active.name if active is not None else None

    # ---- hooks ---------------------------------------------------------
    def param_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        param = self.params[index]
        open_runs = self.open_runs

        def on_grad(grad: Optional[torch.Tensor]) -> None:
            if grad is None:  # an undefined gradient (a backward returned None for it): not reached
                self._undefined_grad(index)
                return
            run = open_runs.get(current_task())
            if run is None:
                run = self.open_run(current_task(), on_accelerator=grad.device.type != "cpu", first="param")
                if run is None:
                    return
            if run.accumulates is None:  # opened by a registered tensor's hook
                self.settle_kind(run, run_accumulates_grad())
            run.pass_.hit(index)
            if not run.accumulates:
                if is_batched_grad(grad):
                    run.pass_.note_unseen_handback(index)
                else:
                    run.captured.append((index, grad))
            elif param.grad is not None:
                run.pass_.note_grad_before(index, param.grad)

        return on_grad

    def _undefined_grad(self, index: int) -> None:
        """The engine reached a parameter with None: the pass remembers it (a backward returned None)."""
        run = self.open_runs.get(current_task())
        if run is None:
            run = self.open_run(current_task(), on_accelerator=self.params[index].device.type != "cpu")
            if run is None:
                return
        run.pass_.note_undefined(index)

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

    def drain_written(self) -> List[int]:
        """The indices written since the last drain (the post-accumulate log, emptied)."""
        log = self.written_log
        if not log:
            return []
        index_of = self.index_of
        indices = [index_of[id(p)] for p in log if id(p) in index_of]
        log.clear()
        return indices

    def flat_hook(self, indices: List[int]) -> Callable[[torch.Tensor], None]:
        """The hook on an FSDP1 flat parameter: backward reaches the flat parameter, never the originals
        the user named (``indices``), whose ``.grad`` FSDP1 sets in its post-backward; read at run end."""

        def on_flat_grad(grad: torch.Tensor) -> None:
            task = current_task()
            run = self.open_runs.get(task) or self.open_run(task, written=True)
            if run is not None:
                run.pass_.note_written(indices)

        return on_flat_grad

    def tensor_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        figures = self.watched.reduction.tensor_figures

        def on_tensor_grad(grad: Optional[torch.Tensor]) -> None:
            if grad is None:  # an undefined gradient: backward brought it nothing
                return
            run = self.open_runs.get(current_task())
            if run is None:
                # Whether this run writes .grad is only known at a parameter (a leaf).
                run = self.open_run(current_task(), from_tensor=True, on_accelerator=grad.device.type != "cpu",
                                    first="tensor")
                if run is None:
                    return
            run.tensor_grads.append((name, figures(grad)))

        return on_tensor_grad

    def on_output_grad(self, grad: torch.Tensor) -> None:
        """Backward reached an output of the watched model's forward: no parameter used in that forward
        has been reached yet. Learn what this run will write (``capture/hookless.py``)."""
        hookless = self.hookless
        if not self.enabled or hookless.nodes is None:  # (no nodes: hooks for good)
            return
        task = current_task()
        run = self.open_runs.get(task)
        if run is not None and (run.root_seen or run.first in ("param", "written")):
            if not run.root_seen and run.accumulates:
                run.pass_.plain = False  # a parameter was reached before the output: not a pattern to learn
            return
        flags = hookless.will_execute()
        accumulates = flags is not None
        if accumulates and not any(flags):
            return  # autograd.grad of tensors other than the watched parameters: nothing of ours
        if hookless.mode != HOOKLESS:  # the hooks see this run; note what it may teach
            if accumulates:
                self._note_start(task, run, hookless.predicted(flags))
            return
        if run is None:
            run = self.open_run(task, on_accelerator=grad.device.type != "cpu", accumulates=accumulates, first="root")
            if run is None:
                return
        elif run.accumulates is None:  # opened by a registered tensor's hook
            self.settle_kind(run, accumulates)
        run.root_seen = True
        if not accumulates:  # autograd.grad: its captured parameters get hooks for this run
            run.armed = hookless.captured()
            hookless.hooks.arm(run.armed)
            return
        if run.nested:  # reentrant checkpointing
            hookless.relearn()
            return
        if self._overlapping(run):  # (open_run pinned already, unless a registered tensor opened the run)
            hookless.pin()
            return
        run.predicted = hookless.predicted(flags)
        run.before = snapshot(hookless.params_of(run.predicted))
        if not hookless.knows(run.predicted):
            hookless.relearn()  # other parameters than the order learned: hooks in before any is reached
            return
        run.hookless = True
        pass_ = run.pass_
        grads = run.before[0]
        if pass_.takes_bases and not all(map(operator.is_, grads, itertools.repeat(None))):
            for index, g in zip(run.predicted, grads, strict=False):
                if g is not None:
                    pass_.note_grad_before(index, g)

    def _note_start(self, task: int, run: Optional[Run], predicted: List[int]) -> None:
        """With hooks in: what a run's start looked like, for the run to teach its order at its end.

        The first parameter hook opens the run (as without this), and takes the note: a run no hook
        ever sees (its parameters swapped out under the watch) is no run, and no pass."""
        start = (predicted, snapshot(self.hookless.params_of(predicted)))
        if run is None:
            if (any(t != task for t in list(self.starts)) or self._overlapping(None)) \
                    and not started_inside_another_run():
                self.hookless.pin()  # another thread's run began and has not ended: hooks in for good
            if len(self.starts) > 8:  # notes of runs no hook saw
                self.starts.clear()
            self.starts[task] = start
        else:  # opened by a registered tensor's hook: a .backward() run
            self.settle_kind(run, True)
            self._take_start(run, start)

    def _overlapping(self, run: Optional[Run]) -> bool:
        """Is another top-level run open? Only runs of two threads overlap (a nested run, reentrant
        checkpointing, runs inside its outer one; a run that raised stays open until the watch exits)."""
        return any(other is not run and not other.nested for other in list(self.open_runs.values()))

    def _take_start(self, run: Run, start) -> None:
        if run.nested or len(self.open_runs) > 1:
            run.pass_.plain = False
            return
        run.root_seen = True
        run.predicted, run.before = start

    # ---- runs ------------------------------------------------------------
    def open_run(self, task: int, from_tensor: bool = False, on_accelerator: bool = False,
                 written: bool = False, accumulates: Optional[bool] = None, first: str = "param") -> Optional[Run]:
        if not self.enabled:
            return None
        with self.lock:
            run = self.open_runs.get(task)
            if run is not None:
                return run
            if accumulates is None:
                accumulates = True if written else None if from_tensor else run_accumulates_grad()
            # A write from FSDP2's post-backward runs under its autograd Function's backward,
            # which would look nested; a post-accumulate hook only fires in a top-level .backward().
            nested = False if written else started_inside_another_run()
            run = Run(task, nested, self.passes.assign(task, nested, accumulates, self.open_runs.values(),
                                                       on_accelerator))
            run.first = "written" if written else first
            pass_ = run.pass_
            if nested:
                pass_.plain = False
            if self.optimizer_stepped and pass_.auto and pass_.runs == 1 and not pass_.hit_count:
                # The first unlabelled run after an optimizer step begins the next step: stale .grad is
                # judged there (a loop that never calls zero_grad()).
                pass_.step_start, self.optimizer_stepped = True, False
            if accumulates is not None:
                self.settle_kind(run, accumulates)
            if not nested and accumulates is not False and self.last_written is not None:
                self._check_reset(pass_)
            self.open_runs[task] = run
            if run.pass_.prior_unsynced is None:  # the pass's first run: before it adds anything
                wrapper = self.wrapper
                run.pass_.prior_unsynced = (self.last_scope == wrappers.LOCAL and wrapper.syncs()
                                            and wrapper.unsynced_left())
            start = self.starts.pop(task, None) if self.starts else None
            if start is not None:  # the model's output was reached first: a run that may teach its order
                self._take_start(run, start)
            overlapping = not nested and self._overlapping(run)
        if overlapping and self.hookless is not None:
            # Two threads' runs at once: .grad cannot tell them apart, and taking a hook out could free
            # the engine's pre-hook the other is about to call: the hooks stay in until the watch ends.
            self.hookless.pin()
        at_run_end(lambda: self.close_run(run, in_engine=True))
        return run

    def _check_reset(self, pass_: Pass) -> None:
        """A run begins: was the gradient the previous run left (no optimizer step since) cleared?

        Set to None is seen at once; changed in place (``zero_grad(set_to_none=False)`` zeroes it, a
        clip scales it) is told apart by a device flag over a sample of it, read with the pass's record.
        A .grad replaced by another tensor was the user's own doing: not a reset.
        """
        index, ref, version = self.last_written
        self.last_written = None
        grad = self.params[index].grad
        if grad is None:
            pass_.note_reset(None)
        elif ref() is grad and grad._version != version:
            with torch.no_grad():
                pass_.note_reset(_sample(grad).count_nonzero() == 0)

    def _remember_written(self, run: Run) -> None:
        """After a .backward() run (and every other end-of-run callback: DDP's reduction writes .grad):
        what it left in .grad for the first parameter it reached."""
        index = run.pass_.hits_from(run.start)
        if index is None:
            return
        grad = self.params[index].grad
        self.last_written = (index, weakref.ref(grad), grad._version) if grad is not None else None

    @staticmethod
    def settle_kind(run: Run, accumulates: bool) -> None:
        run.accumulates = accumulates
        run.pass_.note_kind("backward" if accumulates else "grad")

    def close_run(self, run: Run, in_engine: bool = False) -> None:
        with self.lock:
            self.open_runs.pop(run.task, None)
        pass_ = run.pass_
        finished_now = pass_.auto and not pass_.held and not run.nested and pass_ is not self.passes.orphan
        if run.captured:
            run.captured = [(i, g) for i, g in run.captured if self._saw_last(pass_, i)]
        scope = self.wrapper.backward_scope() if run.accumulates else None  # now: DDP's no_sync()
        if scope is not None and not run.nested:
            self.last_scope = scope
        left = self._run_read(run) if self.hookless is not None and self.hookless.possible else None
        pass_.end_run(run, self.drain_written(), scope=scope, read=not finished_now, left=left,
                      # Under read_at="run_end", read .grad only after every other end-of-run callback of
                      # this run: DDP queues its finalize_backward (which writes the averaged gradient)
                      # after ours; a callback queued from a callback runs after all of them.
                      later=at_run_end if in_engine else None)
        if in_engine and run.accumulates and not run.nested:
            at_run_end(lambda: self._remember_written(run))
        if finished_now:
            if in_engine:
                # .grad is final only after every other end-of-run callback of this run (DDP's
                # finalize_backward, queued when its last bucket was ready, after ours; FSDP's
                # post-backward): a callback queued from a callback runs after all of them.
                at_run_end(pass_.finish)
            else:
                pass_.finish()

    def _run_read(self, run: Run) -> Optional[RunLeft]:
        """At a run's end, for hookless runs and the runs that teach them: which parameters the run
        reached (from ``.grad`` identity and version), reported to its pass in the engine's order;
        and what ``.grad`` now holds, for the pass's reading strategy (None: it reads it itself)."""
        hookless = self.hookless
        if run.armed:
            hookless.hooks.disarm(run.armed)
        if run.predicted is None:
            if hookless.mode == HOOKLESS and run.accumulates is None and not run.root_seen:
                hookless.relearn()  # a run only a registered tensor saw: it went round the model's output
            return None
        after = snapshot(hookless.params_of(run.predicted))
        reached, all_changed = hookless.reached(run.predicted, run.before, after)
        pass_ = run.pass_
        hooked = pass_.hits_since(run.start)
        if run.hookless:
            if hooked:  # the hooks went back in during the run: they reported these themselves
                seen = set(hooked)
                reached = [i for i in reached if i not in seen]
            order, known = hookless.in_order(reached)
            if not (known and all_changed) or hooked:
                hookless.relearn()
            pass_.hits(order)
            # what the run left, in the order it reported (the reading strategy then compares lists)
            return hookless.left(order, run.predicted, after)
        elif hookless.mode == LEARNING and pass_.plain and all_changed and len(hooked) == len(reached) \
                and reached and not self.open_runs and not self.starts and sorted(hooked) == reached:
            hookless.learn(hooked)
        return hookless.left(reached, run.predicted, after)

    def _saw_last(self, pass_: Pass, index: int) -> bool:
        """Did gradtrace's hook see the gradient ``autograd.grad`` hands back for ``index``?"""
        if hook_state.keep_last(self.params[index], self.param_hooks.ids[index]):
            return True
        # A hook registered after ours ran after it and may have changed the gradient handed
        # back: this run's figure is unknown; from the next run on, ours runs last.
        pass_.note_unseen_handback(index)
        return False

    def close_open_runs(self, error: Optional[str] = None) -> None:
        """At exit: runs cut short still land in their pass, which failed (by ``error``, when it is known).

        The engine closes every run that finishes, so a run still open here was cut short by an
        exception inside backward (a hook's, an op's, Ctrl-C), caught somewhere or still on its way out.
        """
        for run in list(self.open_runs.values()):
            run.pass_.fail(error or "a backward was cut short by an exception (caught before watch exited)")
            self.close_run(run)
        self.starts.clear()

    # ---- passes ----------------------------------------------------------
    def begin_pass(self, name: str, step_start: bool = False, read_at: str = "pass_end",
                   accumulate: bool = False) -> Pass:
        # The first pass after an optimizer step (torch.optim's global step hooks) starts a step.
        pass_ = Pass(self.watched, name, step_start=step_start or self.optimizer_stepped, read_at=read_at,
                     accumulate=accumulate)
        self.optimizer_stepped = False
        if self.hookless is not None and self.hookless.possible:  # for the pass end's look at unreported writes
            pass_.grads_at_start = list(map(_GRAD, self.params))
        self.passes.active = pass_
        return pass_

    def begin_held_pass(self) -> Pass:
        """An automatic pass opened (and later ended) by a wrapper around a backward it sees whole."""
        pass_ = Pass(self.watched, self.passes.auto_name(True), auto=True)
        pass_.held = True
        self.passes.active = pass_
        return pass_

    def on_optimizer_step(self, *args, **kwargs) -> None:
        self.optimizer_stepped = True
        self.last_written = None  # clearing .grad after a step is how a step ends

    def end_pass(self, pass_: Pass) -> None:
        self.passes.release(pass_)
        if pass_.failed is not None:  # its block raised: a run of it still open was cut short; what it wrote counts
            for run in [r for r in list(self.open_runs.values()) if r.pass_ is pass_]:
                self.close_run(run)
        written = self.drain_written()  # writes no tensor hook announced (FSDP2) land in the labelled pass
        if written:
            pass_.note_written(written)
        self._unannounced_writes(pass_)
        pass_.finish()

    def _unannounced_writes(self, pass_: Pass) -> None:
        """A ``.grad`` that became a new tensor during the pass although no run reported its parameter:
        written by a backward hookless reading did not see (it never went through the model's output).
        Counted as reached by the pass; the hooks go back in."""
        start, pass_.grads_at_start = pass_.grads_at_start, None
        if start is None or pass_.reached_all() or (self.hookless.mode == LEARNING and not pass_.had_hookless_runs):
            return
        now = list(map(_GRAD, self.params))
        new = list(map(operator.is_not, start, now))
        if not any(new):
            return
        candidates = set(itertools.compress(range(len(now)), new)) - pass_.reached_set()
        unannounced = sorted(i for i in candidates if now[i] is not None)
        if unannounced:
            pass_.note_written(unannounced)
            self.hookless.relearn()

    def flush_orphan(self) -> None:
        self.passes.flush_orphan()
