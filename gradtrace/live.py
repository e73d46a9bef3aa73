"""The live trace: ``gradtrace.watch`` registers the hooks and yields a ``LiveTrace``.

A ``LiveTrace`` is a ``Trace`` (it answers every read a loaded one does) that
also records: ``pass_``, ``tensor``, ``scalar``. Its recording state — the
recorder and its hooks, the cut log, kept gradients, the ``max_passes`` bound
— lives in one ``Recording`` on it. Statistics stay on the device until the
trace is read; reading moves them to the host, which changes nothing a user
can see.
"""
from __future__ import annotations

import collections
import contextlib
import numbers
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from . import _torch_compat, analysis, render
from .capture import hook_state, inner, loose_tensors, modules, stats, tied, values, wrappers
from .capture.cuts import CutLog, ModuleCutDetector
from .capture.failures import FailureContext
from .capture.forward_values import ForwardValues
from .capture.unregistered import UnregisteredModules
from .capture.identity import ParamIdentity
from .capture.optim import OptimizerObserver
from .capture.passes import Pass, Watched
from .capture.reach import reachable_params
from .capture.reading import READ_AT
from .capture.recorder import Recorder
from .capture.zero_values import ZeroValued
from .errors import GradtraceError
from .gc_pause import gc_paused
from .records import TENSOR_ROLES, VALUE_FIELDS, ScalarRecord, TensorPassFacts, TensorRecord, merge_row_facts
from .trace import Trace

CUT_MODES = ("modules", "ops", "off")

# Finished passes whose statistics wait on the device before one batch moves them to the host.
PENDING_BATCH = 64

# Parameters watched by an open watch, by id: a second watch on the same
# parameters would double-count every gradient. This is the one piece of
# state shared between traces; entries live exactly as long as their watch.
_WATCHED: Dict[int, str] = {}
# Checking for a clash and claiming the parameters is one step: two threads entering watch(m) on
# one model at once must not both succeed.
_WATCHED_LOCK = threading.Lock()


@dataclass
class PendingValues:
    """One ``trace.tensor`` call's value statistics (``VALUE_FIELDS``) and row facts, still on the device.

    ``pass_name`` is the pass the call belongs to: the one open when it was made, or else the next
    pass to end (an unlabelled backward's tensors are registered before its run begins); None until
    that pass ends.
    """

    tensor: str
    vector: torch.Tensor
    pass_name: Optional[str]
    rows: Optional[Tuple[Tuple[str, ...], torch.Tensor]] = None

    def to_host(self) -> Tuple[Dict[str, float], Optional[Dict[str, float]]]:
        values = dict(zip(VALUE_FIELDS, self.vector.tolist(), strict=False))
        rows = dict(zip(self.rows[0], self.rows[1].tolist(), strict=False)) if self.rows is not None else None
        return values, rows


@dataclass
class Recording:
    """Everything a live trace needs while it records; dropped by nothing, closed at exit."""

    recorder: Recorder
    cut_log: CutLog
    names_by_id: Dict[int, str]
    max_passes: Optional[int]
    identity: Optional[ParamIdentity]  # are the watched parameters still the tensors hooked?
    pending: Dict[str, Pass] = field(default_factory=dict)  # finished, not yet read (insertion order)
    finished: Deque[str] = field(default_factory=collections.deque)  # finished passes, oldest first
    pending_values: List[PendingValues] = field(default_factory=list)
    # Calls read to the host whose pass has not ended yet: (tensor, values, rows), assigned when it does.
    unassigned: List[Tuple[str, Dict[str, float], Optional[Dict[str, float]]]] = field(default_factory=list)
    # The forwards each finished pass differentiated (CutLog.take_window), until its record is built.
    forwards: Dict[str, tuple] = field(default_factory=dict)
    tensor_handles: List[Any] = field(default_factory=list)
    output_handles: List[Any] = field(default_factory=list)  # run-start hooks on the model's outputs
    reached_for: set = field(default_factory=set)  # (tensor, pass) pairs whose graph was walked
    cut_mark: int = 0  # cut-log events seen when the last tensor was registered
    origins: Any = None  # cuts="ops": the NonfiniteOrigins that locate where a NaN/Inf gradient is born
    # forward_values.ForwardValues: module outputs checked for NaN/Inf on the device; each finished pass's
    # checks wait in ``windows`` until the pass is read.
    forward_values: Any = None
    windows: Dict[str, Any] = field(default_factory=dict)
    unregistered: Any = None  # unregistered.UnregisteredModules: modules run in the forward outside the tree
    loose: Any = None  # loose_tensors.LooseTensors: tensors requiring grad held by modules, not registered
    tied: List[Tuple[torch.Tensor, List[str]]] = field(default_factory=list)  # tensors under several names
    failures: Any = None  # failures.FailureContext: names the culprit of a failed pass
    failure_causes: Dict[str, Any] = field(default_factory=dict)  # pass -> its FailureCause, until it is read
    last_failure: Any = None  # (the exception's identity, its FailureCause): a labelled pass's error reaching the exit
    open: bool = True
    # Which hook containers were None before gradtrace touched them, so exit can give them back.
    hooks_before: hook_state.HookSnapshot = field(default_factory=hook_state.HookSnapshot)
    kept: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)  # keep_grads: each pass's, by name
    cuts_mode: str = "off"  # watch's cuts=: "off" records no forwards
    optim: Any = None  # the OptimizerObserver: torch.optim's global step hooks
    last_forwards: Optional[tuple] = None  # the newest pass's forward lists, shared with equal later ones


class LiveTrace(Trace):
    """What ``watch`` yields: a trace that records while the ``with`` block runs.

    It is its passes' event sink (``capture.passes.PassEvents``): ``name_taken`` and
    ``pass_finished`` are how a pass reaches the trace.
    """

    def __init__(self, named: List[Tuple[str, torch.Tensor]], meta: Dict[str, Any], keep_grads: bool,
                 max_passes: Optional[int], wrapper: Optional[wrappers.Wrapper] = None,
                 reduction: stats.Reduction = stats.HOST, identity: Optional[ParamIdentity] = None):
        super().__init__([n for n, _ in named], {n: list(p.shape) for n, p in named}, meta)
        wrapper = wrapper or wrappers.Wrapper(None)
        watched = Watched([n for n, _ in named], [p for _, p in named], keep_grads, reduction, events=self,
                          wrapper=wrapper)
        watched.zero_values = ZeroValued(watched.params)
        recorder = Recorder(watched, wrapper)
        self._recording = Recording(
            recorder=recorder, cut_log=CutLog(recorder.active_pass_name),
            names_by_id={id(p): n for n, p in named}, max_passes=max_passes, identity=identity)

    # ---- reading: move pending statistics to the host first ----------------------
    @property
    def passes(self):
        self._sync()
        return super().passes

    @property
    def tensors(self):
        self._sync()
        return self._tensors

    @property
    def cuts(self):
        return self._recording.cut_log.cuts

    def _sync(self) -> None:
        recording = self._recording
        if not recording.open:
            recording.recorder.flush_orphan()
        pending, recording.pending = recording.pending, {}
        for name, item in pending.items():
            record, tensor_facts = item.to_trace(self.params)
            if recording.origins is not None:  # taken for every pass, so nothing piles up
                origin = recording.origins.take(name)
                record.nonfinite_origin = origin if record.nonfinite else None
            cause = recording.failure_causes.pop(name, None)
            if record.failed:
                record.failure = cause
            window = recording.windows.pop(name, None)
            if window is not None and (record.nonfinite or record.failed):  # a healthy pass's are never read
                record.forward_checked, record.forward_nonfinite = window.read()
            forwards = recording.forwards.pop(name, None)
            if forwards is not None:
                record.forward_modules, record.forward_carried, record.forward_cuts = self._shared(forwards)
            self._passes[name] = record
            for tensor_name, facts in tensor_facts.items():
                self._tensor_record(tensor_name).grads[name] = facts
        pending_values, recording.pending_values = recording.pending_values, []
        for item in pending_values:
            host, rows = item.to_host()
            record = self._tensors[item.tensor]
            record.values.merge(host)
            if rows is not None:
                record.merge_row_facts(rows)
            if item.pass_name is None:
                recording.unassigned.append((item.tensor, host, rows))
            else:
                self._tensor_pass_facts(item.tensor, item.pass_name, host, rows)
        if recording.cuts_mode != "off":
            self.meta.ran_with_grad = recording.cut_log.ran_with_grad
            self.meta.returned_by_model = set(recording.cut_log.returned) or None
            self.meta.compiled = recording.cut_log.compiled or None
        if recording.optim is not None:
            recording.optim.take(self._optimizers)
            for record in self._optimizers.values():  # steps attributed to a pass dropped meanwhile
                for name in [n for n in record.passes if n not in self._passes]:
                    del record.passes[name]

    @property
    def optimizers(self):
        self._sync()
        return self._optimizers

    def _pass_of_step(self) -> Optional[str]:
        """The pass whose gradients an optimizer step takes: the open one, else the newest finished."""
        recording = self._recording
        active = recording.recorder.active
        if active is not None:
            return active.name
        return recording.finished[-1] if recording.finished else None

    def _shared(self, forwards: tuple) -> tuple:
        """The pass's forward lists, the previous pass's own objects when they are equal (a training loop
        runs the same forward every step: thousands of kept passes then share one list each)."""
        recording = self._recording
        previous = recording.last_forwards
        out = tuple(old if old is not None and tuple(old) == new else list(new)
                    for old, new in zip(previous or (None, None, None), forwards, strict=False))
        recording.last_forwards = out
        return (out[0], out[1], out[2] or None)

    def _tensor_pass_facts(self, tensor: str, pass_name: str, values: Dict[str, float],
                           rows: Optional[Dict[str, float]]) -> None:
        if pass_name not in self._passes:
            return  # its pass was dropped (max_passes) before the facts reached the host
        record = self._tensors[tensor]
        if record.by_pass is None:
            record.by_pass = {}
        facts = record.by_pass.setdefault(pass_name, TensorPassFacts())
        facts.calls += 1
        facts.values.merge(values)
        if rows is not None:
            merge_row_facts(facts.row_facts, rows)

    def verdicts(self):
        self._note_replaced()  # judged on what the watch sees now (and at exit), never per pass in a hook
        self._note_modules()
        return super().verdicts()

    def save(self, path) -> None:
        self._note_replaced()
        self._note_modules()
        super().save(path)

    def diff(self, a: str, b: str, precondition: Any = None) -> analysis.Diff:
        """As ``Trace.diff``; with ``keep_grads=True`` also the inner product of the two passes.

        The inner product is kept in ``trace.inner_products`` (one per pair and
        preconditioning, the latest replacing an earlier one), so the report and
        a saved trace include what you diffed.
        """
        passes = self._named_passes(a, b)
        kept = self._recording.kept
        if not (a in kept and b in kept):
            if precondition is not None:
                raise GradtraceError(f"diff({a!r}, {b!r}, precondition=...) needs both passes' gradients: "
                                     "open the trace with gradtrace.watch(model, keep_grads=True)")
            return super().diff(a, b)
        result = render.rendered(analysis.diff(passes[a], passes[b]))
        params = dict(zip(self._recording.recorder.names, self._recording.recorder.params, strict=False))
        summary = inner.inner_products(a, b, kept[a], kept[b], precondition, params)
        result.inner = summary
        self.inner_products = [s for s in self.inner_products
                               if (s.a, s.b, s.preconditioned) != (a, b, summary.preconditioned)]
        self.inner_products.append(summary)
        return result

    # ---- recording -----------------------------------------------------------
    @contextlib.contextmanager
    def pass_(self, name: str, *, step_start: bool = False, read_at: str = "pass_end",
              accumulate: bool = False) -> Iterator[None]:
        """Label every engine run inside as pass ``name`` (any number of microbatches).

        ``step_start=True``: the pass begins an optimizer step, so ``.grad`` should be
        zero when it begins; stale gradients are judged there only (accumulating
        across passes is legitimate). ``read_at="run_end"``: read each parameter's
        figures at the end of every run that reached it (the latest wins) instead of
        when the pass ends, so a ``zero_grad()`` or clipping done before the pass
        closes does not change them (one read of the gradients per run).
        ``accumulate=True``: the pass adds to gradients earlier passes left in ``.grad`` on
        purpose (accumulation across passes), so they are not stale.
        """
        self._require_open("pass_")
        recorder = self._recording.recorder
        _check_pass_options(name, step_start, read_at)
        if not isinstance(accumulate, bool):
            raise GradtraceError(f"accumulate is True or False, got {accumulate!r}")
        active = recorder.active
        if active is not None:
            if active.name == name:
                raise GradtraceError(f"pass {name!r} is already open: a pass label cannot be nested in itself. "
                                     "Open it once around every microbatch instead.")
            raise GradtraceError(f"pass {name!r} opened inside pass {active.name!r}: passes do not nest. "
                                 f"Close {active.name!r} first.")
        if name in self._passes:
            raise GradtraceError(f"pass {name!r} already ended. A pass holds any number of runs: open it once "
                                 f"around the whole microbatch loop, or give this segment another name "
                                 f"(e.g. f'{name}-{{step}}').")
        if len(self._recording.pending) >= PENDING_BATCH:
            # Between passes, on the user's thread (never inside backward): one batch of host
            # transfers for many finished passes keeps device memory and live objects bounded.
            self._sync()
        self._passes[name] = None  # reserve the name and its place in the order
        state = recorder.begin_pass(name, step_start=step_start, read_at=read_at, accumulate=accumulate)
        self._recording.cut_mark = self._recording.cut_log.events
        try:
            yield  # the PassTrace is ready once the block exits: read trace.passes[name]
        except BaseException as e:  # a backward that raised (or Ctrl-C) is a finding; the error propagates as it is
            state.fail(_describe_error(e))
            self._note_failure(name, e)
            raise
        finally:
            recorder.end_pass(state)

    def tensor(self, name: str, t: torch.Tensor, expect_grad: Optional[bool] = None, *,
               role: Optional[str] = None, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Record forward facts of ``t`` now and, if it requires grad, what backward brings it.

        ``role`` ("mask", "attention_mask", "completion_mask", "group") asks for row facts:
        empty rows and selected lengths of a mask (any bool tensor gets them), the padding
        side of an attention mask, a per-row std histogram of a group tensor (advantages).
        ``attention_mask`` pairs a completion mask with its attention mask: selected
        positions on padding, and empty rows where the sequence has tokens, are flagged.
        """
        self._require_open("tensor")
        if not isinstance(name, str) or not name:
            raise GradtraceError(f"tensor names are non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise GradtraceError(f"trace.tensor({name!r}, ...) takes a torch.Tensor, got {type(t).__name__}")
        if t.is_meta:
            raise GradtraceError(f"trace.tensor({name!r}, ...) got a meta tensor: it has a shape but no values "
                                 "to record. Register the tensor the computation really produced.")
        if t.is_nested:
            raise GradtraceError(f"trace.tensor({name!r}, ...) got a nested tensor (rows of different lengths): "
                                 "register a padded tensor (t.to_padded_tensor(0)) and its mask, or each row.")
        if expect_grad not in (None, True, False):
            raise GradtraceError(f"expect_grad is None, True or False, got {expect_grad!r}")
        facts = _row_facts(name, t, role, attention_mask)
        record = self._tensor_record(name)
        _note_forward_facts(record, t, expect_grad)
        recording = self._recording
        active = recording.recorder.active
        if active is not None and active.name not in record.passes:
            record.passes.append(active.name)
        for seq in recording.cut_log.since(recording.cut_mark):
            # A no_grad call of a module that then ran again with grad did not make this tensor
            # (a rollout or a reference forward before the loss's own forward).
            if seq not in record.cuts and not recording.cut_log.ran_with_grad_after(seq):
                record.cuts.append(seq)
        recording.cut_mark = recording.cut_log.events
        recording.pending_values.append(PendingValues(name, values.value_stats(t),
                                                      active.name if active is not None else None, facts))
        if role is not None:
            record.role = role
        if t.requires_grad:
            self._hook_tensor(name, t, active)
        return t

    def _hook_tensor(self, name: str, t: torch.Tensor, active: Optional[Pass]) -> None:
        recording = self._recording
        recording.hooks_before.note(t)
        recording.tensor_handles.append(t.register_hook(recording.recorder.tensor_hook(name)))
        key = (name, active.name if active is not None else None)
        if key in recording.reached_for:
            return  # microbatches share the graph's shape: walk it once per pass
        recording.reached_for.add(key)
        found, partial = reachable_params(t, recording.names_by_id)
        record = self._tensors[name]
        record.reachable = sorted(set(record.reachable or ()) | found)
        record.reach_partial = record.reach_partial or partial
        record.trainable_upstream = bool(record.reachable)
        if active is not None:
            active.expect(found, partial)

    def scalar(self, name: str, value: Any) -> float:
        """Record a float at full precision (``deltaH1``); flags values that print as 0.000000."""
        self._require_open("scalar")
        if not isinstance(name, str) or not name:
            raise GradtraceError(f"scalar names are non-empty strings, got {name!r}")
        value = _real_number(name, value)
        active = self._recording.recorder.active
        record = self.scalars.get(name)
        if record is None:
            record = self.scalars[name] = ScalarRecord(name=name, value=value)
        record.value = value
        record.pass_name = active.name if active is not None else None
        record.history.append(value)
        return value

    def _tensor_record(self, name: str) -> TensorRecord:
        record = self._tensors.get(name)
        if record is None:
            record = self._tensors[name] = TensorRecord(name=name)
        return record

    def _require_open(self, what: str) -> None:
        if not self._recording.open:
            raise GradtraceError(f"trace.{what}() was called after `watch` exited; call it inside the "
                                 "`with gradtrace.watch(...)` block")

    # ---- the passes' events and exit ---------------------------------------------
    def name_taken(self, name: str) -> bool:
        return name in self._passes

    def pass_finished(self, pass_: Pass) -> None:
        if pass_.auto:
            self._passes[pass_.name] = None
        recording = self._recording
        if recording.cuts_mode != "off":
            recording.forwards[pass_.name] = recording.cut_log.take_window()
        recording.pending[pass_.name] = pass_
        recording.finished.append(pass_.name)
        if recording.forward_values is not None:  # the checks since the last pass are this pass's forward
            recording.windows[pass_.name] = recording.forward_values.take()
        for item in recording.pending_values:
            if item.pass_name is None:  # registered before this pass's run began: its tensors
                item.pass_name = pass_.name
        unassigned, recording.unassigned = recording.unassigned, []
        for tensor, host, rows in unassigned:
            self._tensor_pass_facts(tensor, pass_.name, host, rows)
        if pass_.kept is not None:
            recording.kept[pass_.name] = pass_.take_kept()
        if recording.max_passes is not None:
            while len(recording.finished) > recording.max_passes:
                self._drop(recording.finished.popleft())

    def _note_replaced(self) -> None:
        """Parameters replaced or swapped while watched, named in ``meta["replaced_params"]`` (how, by name)."""
        identity = self._recording.identity
        changed = identity.changed() if identity is not None else None
        if changed:
            names = self._recording.recorder.names
            self.meta.replaced_params = {names[i]: how for i, how in sorted(changed.items())}

    def _note_failure(self, pass_name: Optional[str], error: BaseException):
        """The culprit of ``error`` (found while its traceback and the forward's facts are still there)."""
        recording = self._recording
        # Not the exception itself: its traceback holds the frames (and tensors) of a failed step, and a loop
        # that catches it and trains on must not keep them. (The same exception reaching the exit, still
        # alive, has the same identity and text.)
        key = (id(error), id(error.__traceback__), str(error))
        if recording.last_failure is not None and recording.last_failure[0] == key:
            cause = recording.last_failure[1]
        else:
            cause = recording.failures.cause(error) if recording.failures is not None else None
            recording.last_failure = (key, cause)
        if pass_name is not None and cause is not None:
            recording.failure_causes[pass_name] = cause
        return cause

    def _note_modules(self) -> None:
        """Tied parameters (frozen or not, now) and modules that ran outside the module tree, in ``meta``."""
        recording = self._recording
        if recording.tied:
            self.meta.tied_params = tied.records(recording.tied)
        if recording.unregistered is not None:
            self.meta.unregistered_modules = recording.unregistered.records() or None
        if recording.loose is not None:
            self.meta.loose_tensors = recording.loose.records() or None
            self.meta.ignored_freezes = recording.loose.ignored_freezes() or None
        param_hooks = recording.recorder.param_hooks
        if param_hooks is not None and recording.loose is not None:  # (no wrapper adding hooks of its own)
            names = recording.recorder.names
            ours = {handle.id for handle in recording.tensor_handles}
            self.meta.user_hooked = [names[i] for i in param_hooks.users(ours)] or None

    def _drop(self, name: str) -> None:
        """Forget a finished pass and everything it holds: records, kept gradients, tensor facts, cuts."""
        recording = self._recording
        self._passes.pop(name, None)
        recording.pending.pop(name, None)
        recording.kept.pop(name, None)
        recording.windows.pop(name, None)
        recording.failure_causes.pop(name, None)
        recording.forwards.pop(name, None)
        gone = set(recording.cut_log.drop_pass(name))
        for record in self._tensors.values():
            record.grads.pop(name, None)
            if record.by_pass:
                record.by_pass.pop(name, None)
            if gone and record.cuts:
                record.cuts = [seq for seq in record.cuts if seq not in gone]
        for optimizer in self._optimizers.values():
            optimizer.passes.pop(name, None)
        self.meta.dropped_passes += 1

    def _close(self, error: Optional[BaseException] = None) -> None:
        """On exit: no hook records any more; runs cut short by an exception still land in their pass."""
        recording = self._recording
        recording.open = False
        recorder = recording.recorder
        recorder.enabled = False
        cause = self._note_failure(None, error) if error is not None else None  # before the passes end
        for run in recorder.open_runs.values():  # a run the error cut short: the error is its pass's
            if cause is not None:
                recording.failure_causes.setdefault(run.pass_.name, cause)
        recorder.close_open_runs(_describe_error(error) if error is not None else None)
        for label in list(recorder.passes.labels.values()):  # labels still open in any thread
            recorder.end_pass(label)
        recorder.flush_orphan()
        if recording.forward_values is not None:
            recording.forward_values.close()
        for handle in recording.tensor_handles:
            handle.remove()
        recording.tensor_handles.clear()
        self.meta.forward_calls = recording.cut_log.root_calls
        if recording.cuts_mode != "off":
            self.meta.ran_with_grad = recording.cut_log.ran_with_grad
            self.meta.returned_by_model = set(recording.cut_log.returned) or None
            self.meta.compiled = recording.cut_log.compiled or None
        self._note_replaced()
        self._note_modules()
        recording.unregistered = None  # its weak references die with the model; the records stay
        recording.loose = None
        recording.tied = []
        recording.identity = None  # what happens to the model after exit is not the watch's
        named = zip(recorder.names, recorder.params, strict=False)
        self.meta.frozen_while_watched = [n for n, p in named if not p.requires_grad]
        if error is not None:
            self.meta.error = _describe_error(error)
            self.meta.error_cause = cause
        recording.failures = recording.last_failure = None  # the traceback's frames go with them


def _real_number(name: str, value: Any) -> float:
    """``trace.scalar``'s value as a float: a real number, or a one-element real tensor with values."""
    what = f"trace.scalar({name!r}, ...)"
    if isinstance(value, torch.Tensor):
        if value.is_meta or value.is_nested:
            raise GradtraceError(f"{what} got a {'meta' if value.is_meta else 'nested'} tensor, which has no "
                                 "value to read. Pass the number the computation really produced.")
        if value.numel() != 1:
            raise GradtraceError(f"{what} takes one number, got a tensor of shape {tuple(value.shape)}")
        if value.is_complex():
            raise GradtraceError(f"{what} takes a real number, got a complex tensor: record its .real and .imag "
                                 "(or abs()) under two names")
        value = value.detach()
        value = (value.to_dense() if value.layout != torch.strided else value).reshape(()).to(torch.float64).item()
    if isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
        raise GradtraceError(f"{what} takes a real number, got a complex one ({value!r:.60}): record its real and "
                             "imaginary parts (or its modulus) under two names")
    if not isinstance(value, numbers.Real):
        raise GradtraceError(f"{what} takes a real number, got {type(value).__name__}")
    try:
        return float(value)
    except (OverflowError, ValueError, TypeError) as e:
        raise GradtraceError(f"{what}: the {type(value).__name__} does not fit a float ({type(e).__name__}: {e}); "
                             "record it scaled, or its logarithm") from None


def _check_pass_options(name: Any, step_start: Any, read_at: Any) -> None:
    if not isinstance(name, str) or not name:
        raise GradtraceError(f"pass names are non-empty strings, got {name!r}")
    if not isinstance(step_start, bool):
        raise GradtraceError(f"step_start is True or False, got {step_start!r}")
    if read_at not in READ_AT:
        raise GradtraceError(f"read_at={read_at!r} is not one of {', '.join(READ_AT)}")


def _describe_error(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _row_facts(name: str, t, role: Optional[str], attention_mask):
    """``values.row_facts`` after checking the arguments (so a bad role fails before anything is recorded)."""
    if role is not None and role not in TENSOR_ROLES:
        raise GradtraceError(f"trace.tensor({name!r}, ..., role={role!r}): role is one of {', '.join(TENSOR_ROLES)}")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise GradtraceError(f"trace.tensor({name!r}, ..., attention_mask=...) takes a torch.Tensor, got "
                             f"{type(attention_mask).__name__}")
    try:
        return values.row_facts(t, role, attention_mask)
    except ValueError as e:
        raise GradtraceError(f"trace.tensor({name!r}, ..., attention_mask=...): {e}") from None


def _note_forward_facts(record: TensorRecord, t: torch.Tensor, expect_grad: Optional[bool]) -> None:
    first = record.calls == 0
    record.calls += 1
    if first:
        record.shape = list(t.shape)
        record.dtype = str(t.dtype).replace("torch.", "")
        record.device = str(t.device)
        record.is_leaf = t.is_leaf
        record.grad_fn = type(t.grad_fn).__name__ if t.grad_fn is not None else None
        record.requires_grad = t.requires_grad
    else:
        record.requires_grad = record.requires_grad and t.requires_grad
        if record.grad_fn is None and t.grad_fn is not None:
            record.grad_fn = type(t.grad_fn).__name__
    record.requires_grad_calls += int(t.requires_grad)
    record.inference = record.inference or t.is_inference()
    if expect_grad is not None:
        record.expect_grad = expect_grad


# ---- watch -------------------------------------------------------------------
def _resolve_target(target) -> Tuple[List[Tuple[str, torch.Tensor]], Optional[nn.Module], Optional[list]]:
    """(trainable (name, parameter) pairs, the root module or None, the module walk made to find them)."""
    walk = None
    if isinstance(target, nn.Module):
        walk = modules.named_modules(target)
        named = [(n, p) for n, p in modules.named_parameters(target, walk) if p.requires_grad]
        root = target
        what = f"the {type(target).__name__} passed to watch()"
    elif isinstance(target, torch.Tensor) or isinstance(target, (str, bytes)) or not isinstance(target, Iterable):
        raise GradtraceError(
            f"watch() takes an nn.Module or an iterable of (name, parameter) pairs such as "
            f"model.named_parameters(); got {type(target).__name__}")
    else:
        named = _named_pairs(target)
        root = None
        what = "the parameters passed to watch()"
    if not named:
        raise GradtraceError(f"{what} has no trainable parameter (none with requires_grad=True): "
                             "nothing can receive a gradient. Unfreeze what you want traced.")
    return named, root, walk


def _named_pairs(target) -> List[Tuple[str, torch.Tensor]]:
    named = []
    for item in target:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise GradtraceError(
                f"watch() takes (name, parameter) pairs like model.named_parameters() gives; got {item!r:.80}")
        named.append(item)
    seen, duplicates = set(), set()
    for name, _ in named:
        (duplicates if name in seen else seen).add(name)
    if duplicates:
        raise GradtraceError(f"parameter names must be unique; repeated: {', '.join(sorted(duplicates))}")
    return [(n, p) for n, p in named if p.requires_grad]


def _check_options(cuts: str, keep_grads: bool, max_passes: Optional[int], optimizer: Any,
                   statistics: str, updates: Any = True, forward_values: Any = True) -> None:
    if not isinstance(updates, bool):
        raise GradtraceError(f"updates is True or False, got {updates!r}")
    if not isinstance(forward_values, bool):
        raise GradtraceError(f"forward_values is True or False, got {forward_values!r}")
    if not isinstance(statistics, str) or statistics not in stats.REDUCTIONS:
        raise GradtraceError(f"statistics={statistics!r} is not one of {', '.join(stats.REDUCTIONS)}")
    if cuts not in CUT_MODES:
        raise GradtraceError(f"cuts={cuts!r} is not one of {', '.join(CUT_MODES)}")
    if not isinstance(keep_grads, bool):
        raise GradtraceError(f"keep_grads is True or False, got {keep_grads!r}")
    if max_passes is not None and (not isinstance(max_passes, int) or isinstance(max_passes, bool)
                                   or max_passes < 1):
        raise GradtraceError(f"max_passes is a positive int or None, got {max_passes!r}")
    if optimizer is not None and not callable(getattr(optimizer, "register_step_post_hook", None)):
        raise GradtraceError(f"optimizer= takes a torch.optim.Optimizer, got {type(optimizer).__name__}")

# A watch left open over a training loop keeps this many of the newest passes by default:
# memory stays bounded (about 100 bytes per parameter per pass) however long it runs.
DEFAULT_MAX_PASSES = 256


def watch(target, *, cuts: str = "modules", keep_grads: bool = False,
          max_passes: Optional[int] = DEFAULT_MAX_PASSES, optimizer: Any = None,
          statistics: str = "auto", updates: bool = True, forward_values: bool = True) -> "Watch":
    """Hook every trainable parameter of ``target`` for the duration of the block.

    ``target`` is an ``nn.Module`` or an iterable of ``(name, param)``.
    ``cuts``: "modules" (forward hooks on every module, cheap), "ops"
    (a TorchFunctionMode that also sees individual ops), or "off".
    ``keep_grads``: keep each pass's gradient so ``diff`` reports dot
    products and cosines (one copy of the gradients per pass).
    ``max_passes``: keep only the newest N passes (and their kept gradients,
    tensor facts and cuts); the number dropped is in
    ``trace.meta["dropped_passes"]``. None keeps every pass.
    ``optimizer``: accepted for compatibility: every ``torch.optim`` optimizer's steps
    are seen by themselves (global step hooks), and the first pass after a step
    begins an optimizer step, where stale ``.grad`` is judged.
    ``updates``: measure what each optimizer step does to the weights (a sample of
    16 elements per parameter, on the device) for WEIGHTS_UNCHANGED and
    TINY_UPDATES; False skips it.
    ``statistics``: where pass-end figures are reduced: "auto" (numpy for values on
    the CPU, the device for an accelerator's) or "device" (on the device everywhere,
    never reading a value back before the pass's one transfer: an accelerator's
    path, here to test it on a CPU). Both give the same figures.
    ``forward_values``: check every module's output for NaN/Inf on the device (one small
    reduction per module call with grad enabled, read only for a pass whose gradients are
    non-finite), so NONFINITE names where the forward first went non-finite; needs module
    hooks (``cuts`` "modules" or "ops"). False skips it.
    Every hook is removed on exit, whether or not the block raised. A watch is entered once.
    """
    return Watch(_watching(target, cuts, keep_grads, max_passes, optimizer, statistics, updates, forward_values))


class Watch:
    """What ``watch(...)`` returns: a context manager entered once (it yields the ``LiveTrace``)."""

    def __init__(self, manager: contextlib.AbstractContextManager):
        self._manager = manager
        self._entered = False

    def __enter__(self) -> LiveTrace:
        if self._entered:
            raise GradtraceError("this gradtrace.watch(...) was already entered: a watch records one block. "
                                 "Call gradtrace.watch(model) again for a new one.")
        self._entered = True
        return self._manager.__enter__()

    def __exit__(self, *exc_info) -> Optional[bool]:
        return self._manager.__exit__(*exc_info)


@contextlib.contextmanager
def _watching(target, cuts: str, keep_grads: bool, max_passes: Optional[int], optimizer: Any,
              statistics: str, updates: bool = True, forward_values: bool = True) -> Iterator[LiveTrace]:
    _check_options(cuts, keep_grads, max_passes, optimizer, statistics, updates, forward_values)
    _torch_compat.require("capture", "stats", *(("ops",) if cuts == "ops" else ()))
    with gc_paused():  # the walk and the trace's per-parameter tables: thousands of objects
        named, root, module_walk = _resolve_target(target)
        wrapper = wrappers.distributed_wrapper(root, [p for _, p in named])
        if cuts != "off" and root is None:
            cuts = "off"  # module hooks need the module; parameters alone give coverage only
        meta = {"torch": torch.__version__, "cuts": cuts, "keep_grads": keep_grads,
                "model": type(root).__name__ if root is not None else None,
                "max_passes": max_passes, "dropped_passes": 0}
        meta.update(wrapper.meta())
        if wrapper.kind == "FSDP1":
            named = [(wrappers.user_name(n), p) for n, p in named]  # the names the user's model gives
        trace = LiveTrace(named, meta, keep_grads, max_passes, wrapper, stats.reduction_for(statistics),
                          ParamIdentity.of(named, module_walk, wrapper.kind))
    shapes = wrapper.shapes()  # FSDP1 and ZeRO-3 leave a slice or an empty placeholder in place
    if shapes:
        trace.param_shapes.update({n: shapes[id(p)] for n, p in named if id(p) in shapes})
    stack = contextlib.ExitStack()
    try:
        _claim(stack, named)
        with gc_paused():
            _register(stack, trace, [p for _, p in named], root, module_walk, cuts, updates, wrapper,
                      forward_values, optimizer)
        try:
            yield trace
        except BaseException as e:  # the trace keeps what was recorded, and says how the block ended
            trace._close(e)
            raise
    finally:
        with gc_paused():
            stack.close()  # every hook out, whether registering finished or not


def _register(stack: contextlib.ExitStack, trace: LiveTrace, params: List[torch.Tensor],
              root: Optional[nn.Module], module_walk: Optional[list], cuts: str, updates: bool,
              wrapper: wrappers.Wrapper, forward_values: bool = True, optimizer: Any = None) -> None:
    """Every hook, each undone by ``stack`` in reverse order on exit."""
    recording = trace._recording
    recorder = recording.recorder
    handles: List[Any] = []  # every RemovableHandle; one callback removes them all
    recording.hooks_before.hold(params)
    # Registered first, so it runs last: after every handle (and every tensor hook) is removed.
    stack.callback(hook_state.restore, recording.hooks_before)
    stack.callback(_close_once, trace)
    stack.callback(_remove_all, handles)
    written = recorder.post_accumulate_hook()
    sharded_written = recorder.sharded_written_hook()
    batch = hook_state.HookBatch()
    handles.append(batch)
    # Every parameter's tensor hook in; taken out later for .backward() runs where that is safe
    # (capture/hookless.py): a watched model, plain leaf parameters, no wrapper writing .grad late.
    # (cuts="ops": its op mode and NaN/Inf origins follow every op of the backward's graph; the mode steps
    # aside while torch.compile traces, and the hooks see compiled runs without a graph break.)
    handles.append(recorder.install(hookless_possible=root is not None and wrapper.allows_hookless()
                                    and cuts == "modules"))
    outputs = recorder.forward_outputs(recording.output_handles)
    if outputs is not None:
        stack.callback(_remove_all, recording.output_handles)  # (the cut detector counts the model's calls)
    for p in params:
        # Only where tensor hooks do not fire (FSDP2's DTensor): a post-accumulate hook can never
        # be fully removed (see capture/hook_state.py), and on a plain tensor the tensor hook sees all.
        if hook_state.is_plain(p):
            continue
        if wrappers.is_dtensor(p):
            handles.append(p.register_post_accumulate_grad_hook(sharded_written))
        else:
            handles.append(p.register_post_accumulate_grad_hook(written))
    recording.optim = OptimizerObserver(recorder.names, params, recorder.on_optimizer_step, trace._pass_of_step,
                                        measure_updates=updates)
    recording.optim.attach(handles)
    wrapper.attach(recorder, stack, params, recorder.param_hook, recording.hooks_before.note, trace.meta)
    index_of = {id(p): i for i, p in enumerate(params)}
    for flat, members in wrapper.flat_groups:
        indices = [index_of[id(p)] for p, _ in members if id(p) in index_of]
        if indices:
            recording.hooks_before.note(flat)  # given back like the parameters' containers
            handles.append(flat.register_hook(recorder.flat_hook(indices)))
    if cuts in ("modules", "ops"):
        # The watched names are the module paths' own, except under FSDP1 (the user's names, unwrapped).
        trainable = recorder.names if wrapper.kind != "FSDP1" else None
        if forward_values:
            recording.forward_values = ForwardValues()
        detector = ModuleCutDetector(root, recording.cut_log, module_walk, trainable, recording.names_by_id,
                                     outputs, recording.forward_values, hooks_only=cuts == "ops")
        stack.callback(detector.retire)  # after the wrappers come off (callbacks run last-in, first-out)
        detector.attach(batch)
        trace.meta.ran_with_grad = set()  # kept current on every read (CutLog.ran_with_grad)
        recording.unregistered = UnregisteredModules(root, module_walk, _optimizers_seen(recording, optimizer))
        recording.unregistered.attach(handles.append, detector.wrapped_root)
    recording.cuts_mode = cuts
    if root is not None:
        recording.failures = FailureContext(module_walk, recording.cut_log, recording.forward_values)
    if root is not None and wrapper.kind != "FSDP1":  # FSDP1 flattens the parameters it would name
        recording.tied = tied.tied_parameters(root, module_walk)
    if root is not None and module_walk is not None and any(_compiled(m) for _, m in module_walk):
        recording.cut_log.compiled = True  # torch.compile(model) or model.compile(): one compiled backward
    if root is not None and wrapper.kind in (None, "DDP"):  # FSDP / DeepSpeed keep tensor views of their own
        recording.loose = loose_tensors.find(module_walk, params, recording.recorder.names,
                                             _optimizers_seen(recording, optimizer))
    if cuts == "ops":
        from .capture.opcuts import OpCutMode  # the TorchFunctionMode is built only when asked for
        op_mode = OpCutMode(root, recording.cut_log, recording.names_by_id)
        recording.origins = op_mode.origins
        op_mode.origins.forward_values = recording.forward_values
        stack.enter_context(op_mode.attach(handles.append))


def _compiled(module: nn.Module) -> bool:
    """A torch.compile wrapper (``OptimizedModule``). A model compiled in place (``model.compile()``) is seen when
    dynamo traces its forward (``module_calls.compiled_call``)."""
    return type(module).__name__ == "OptimizedModule"


def _optimizers_seen(recording: Recording, given: Any) -> Callable[[], List[Any]]:
    """The optimizers the watch has seen step (torch.optim's global step hooks), and the one it was given."""
    def optimizers() -> List[Any]:
        seen = [o.ref() for o in recording.optim.known.values()] if recording.optim is not None else []
        return [o for o in seen + [given] if o is not None]
    return optimizers


def _close_once(trace: LiveTrace) -> None:
    if trace._recording.open:
        trace._close()


def _remove_all(handles: List[Any]) -> None:
    # Removal is idempotent (RemovableHandle), so a handle removed twice is harmless.
    for handle in reversed(handles):
        handle.remove()
    handles.clear()


def _claim(stack: contextlib.ExitStack, named: List[Tuple[str, torch.Tensor]]) -> None:
    """Mark the parameters watched, released by ``stack``; GradtraceError when an open watch holds any."""
    with _WATCHED_LOCK:
        clashes = [n for n, p in named if id(p) in _WATCHED]
        if not clashes:
            for _, p in named:
                _WATCHED[id(p)] = "watch"
    if clashes:
        raise GradtraceError(
            f"{len(clashes)} of these parameters ({', '.join(clashes[:3])}{', ...' if len(clashes) > 3 else ''}) "
            "are already watched by another gradtrace.watch that is still open. Close it first, "
            "or watch a different set of parameters.")
    stack.callback(_unwatch, [p for _, p in named])


def _unwatch(params: List[torch.Tensor]) -> None:
    with _WATCHED_LOCK:
        for p in params:
            _WATCHED.pop(id(p), None)
