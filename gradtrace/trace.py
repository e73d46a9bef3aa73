"""The Trace: what ``gradtrace.watch`` yields, and what ``gradtrace.load`` returns.

A live trace owns the hooks (through its Recorder and CutLog) and keeps device
statistics until someone looks; a loaded trace holds only plain records. Both
answer ``passes``, ``diff``, ``verdicts`` and ``report`` the same way.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from . import stats
from .capture import PassState, PendingPass, Recorder
from .cuts import CutLog, ModuleCutDetector
from .errors import GradtraceError
from .reach import reachable_params
from .records import Cut, PassTrace, ScalarRecord, TensorRecord, ValueStats, Verdict

CUT_MODES = ("modules", "ops", "off")

# Parameters watched by a live trace right now, by id: a second watch on the
# same parameters would double-count every gradient. Entries live exactly as
# long as the watch that made them.
_WATCHED: Dict[int, str] = {}


class Trace:
    """Gradients recorded while ``watch`` was open: passes, tensors, scalars, cuts."""

    def __init__(self, params: Iterable[str], param_shapes: Optional[Dict[str, List[int]]] = None,
                 meta: Optional[Dict[str, Any]] = None):
        self.params: Tuple[str, ...] = tuple(params)
        self.param_shapes: Dict[str, List[int]] = dict(param_shapes or {})
        self.meta: Dict[str, Any] = dict(meta or {})
        self._passes: Dict[str, Optional[PassTrace]] = {}
        self._pending: List[Tuple[str, PendingPass]] = []
        self._tensors: Dict[str, TensorRecord] = {}
        self._tensor_pending: List[Tuple[str, torch.Tensor]] = []
        self._tensor_seen: Dict[str, int] = {}
        self.scalars: Dict[str, ScalarRecord] = {}
        self._cut_list: List[Cut] = []
        self.inner_products: List[Dict[str, Any]] = []
        self.rank_coverage: Optional[Dict[str, Dict[int, List[str]]]] = None  # filled by gather()
        self._recorder: Optional[Recorder] = None
        self._cut_log: Optional[CutLog] = None
        self._names_by_id: Dict[int, str] = {}
        self._cut_mark = 0
        self._reached_for: set = set()
        self._live = False
        self._open = False

    # ---- reading -----------------------------------------------------------
    @property
    def passes(self) -> Dict[str, PassTrace]:
        """Ordered ``{name: PassTrace}``; reading it moves pending statistics to the host."""
        self._flush()
        return {name: p for name, p in self._passes.items() if p is not None}

    @property
    def tensors(self) -> Dict[str, TensorRecord]:
        self._flush()
        return self._tensors

    @property
    def cuts(self) -> List[Cut]:
        return self._cut_log.cuts if self._cut_log is not None else self._cut_list

    def _flush(self) -> None:
        if self._recorder is not None and not self._open:
            self._recorder.flush_orphan()
        pending, self._pending = self._pending, []
        for name, item in pending:
            record, tensor_facts = item.materialize(self.params)
            self._passes[name] = record
            for tensor_name, facts in tensor_facts.items():
                self._tensor_record(tensor_name).grads[name] = facts
        values, self._tensor_pending = self._tensor_pending, []
        for name, vector in values:
            _merge_values(self._tensors[name].values, vector.tolist())

    def _tensor_record(self, name: str) -> TensorRecord:
        record = self._tensors.get(name)
        if record is None:
            record = self._tensors[name] = TensorRecord(name=name)
        return record

    # ---- recording -----------------------------------------------------------
    @contextlib.contextmanager
    def pass_(self, name: str) -> Iterator[None]:
        """Label every engine run inside as pass ``name`` (any number of microbatches)."""
        self._require_live("pass_")
        if not isinstance(name, str) or not name:
            raise GradtraceError(f"pass names are non-empty strings, got {name!r}")
        active = self._recorder.active
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
        self._passes[name] = None  # reserve the name and its place in the order
        state = self._recorder.begin_pass(name)
        self._cut_mark = self._cut_log.events if self._cut_log else 0
        try:
            yield  # the PassTrace is ready once the block exits: read trace.passes[name]
        finally:
            self._recorder.end_pass(state)

    def tensor(self, name: str, t: torch.Tensor, expect_grad: Optional[bool] = None) -> torch.Tensor:
        """Record forward facts of ``t`` now and, if it requires grad, what backward brings it."""
        self._require_live("tensor")
        if not isinstance(name, str) or not name:
            raise GradtraceError(f"tensor names are non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise GradtraceError(f"trace.tensor({name!r}, ...) takes a torch.Tensor, got {type(t).__name__}")
        if expect_grad not in (None, True, False):
            raise GradtraceError(f"expect_grad is None, True or False, got {expect_grad!r}")
        record = self._tensor_record(name)
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
        active = self._recorder.active
        if active is not None and active.name not in record.passes:
            record.passes.append(active.name)
        if self._cut_log is not None:
            for index in self._cut_log.since(self._cut_mark):
                if index not in record.cuts:
                    record.cuts.append(index)
            self._cut_mark = self._cut_log.events
        self._tensor_pending.append((name, stats.value_stats(t)))
        if t.requires_grad:
            self._hook_tensor(name, t, active)
        return t

    def _hook_tensor(self, name: str, t: torch.Tensor, active: Optional[PassState]) -> None:
        self._tensor_handles.append(t.register_hook(self._recorder.tensor_hook(name)))
        key = (name, active.name if active is not None else None)
        if key in self._reached_for:
            return  # microbatches share the graph's shape: walk it once per pass
        self._reached_for.add(key)
        found, partial = reachable_params(t, self._names_by_id)
        record = self._tensors[name]
        record.reachable = sorted(set(record.reachable or ()) | found)
        record.reach_partial = record.reach_partial or partial
        record.trainable_upstream = bool(record.reachable)
        if active is not None:
            active.expected = (active.expected or set()) | found
            active.expected_partial = active.expected_partial or partial

    def scalar(self, name: str, value: Any) -> float:
        """Record a float at full precision (``deltaH1``); flags values that print as 0.000000."""
        if not self._live:
            self._require_live("scalar")  # a loaded trace is read-only
        if not isinstance(name, str) or not name:
            raise GradtraceError(f"scalar names are non-empty strings, got {name!r}")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise GradtraceError(f"trace.scalar({name!r}, ...) takes one number, got a tensor of shape "
                                     f"{tuple(value.shape)}")
            value = value.detach().reshape(()).to(torch.float64).item()
        if not isinstance(value, numbers.Real):
            raise GradtraceError(f"trace.scalar({name!r}, ...) takes a real number, got {type(value).__name__}")
        value = float(value)
        active = self._recorder.active if self._recorder is not None else None
        record = self.scalars.get(name)
        if record is None:
            record = self.scalars[name] = ScalarRecord(name=name, value=value)
        record.value = value
        record.pass_name = active.name if active is not None else None
        record.history.append(value)
        return value

    # ---- analysis ------------------------------------------------------------
    def diff(self, a: str, b: str, precondition: Any = None):
        """What pass ``a`` reached that ``b`` did not, and how their magnitudes compare."""
        from . import analysis, inner

        passes = self.passes
        for name in (a, b):
            if name not in passes:
                raise GradtraceError(f"no pass named {name!r}; this trace has {_names(passes)}")
        result = analysis.diff(passes[a], passes[b])
        kept = self._recorder.kept if self._recorder is not None else {}
        if a in kept and b in kept:
            summary = inner.inner_products(a, b, kept[a], kept[b], precondition, self._names_by_param())
            result.inner = summary
            self.inner_products = [s for s in self.inner_products
                                   if (s["a"], s["b"], s["preconditioned"]) != (a, b, summary["preconditioned"])]
            self.inner_products.append(summary)
        elif precondition is not None:
            raise GradtraceError(f"diff({a!r}, {b!r}, precondition=...) needs both passes' gradients: "
                                 "open the trace with gradtrace.watch(model, keep_grads=True)")
        else:  # a loaded trace: the plain inner product, if the live one computed it
            result.inner = next((s for s in self.inner_products
                                 if s["a"] == a and s["b"] == b and not s["preconditioned"]), None)
        return result

    def verdicts(self) -> List[Verdict]:
        from . import analysis
        return analysis.verdicts(self)

    def report(self) -> str:
        from . import render
        return render.report(self)

    def save(self, path) -> None:
        from . import storage
        storage.save(self, path)

    def gather(self) -> "Trace":
        from . import distributed
        return distributed.gather(self)

    def _names_by_param(self) -> Dict[str, torch.Tensor]:
        return {name: p for name, p in zip(self._recorder.names, self._recorder.params)}

    def _require_live(self, what: str) -> None:
        if not self._live:
            raise GradtraceError(f"trace.{what}() records, but this trace was loaded from a file (read-only)")
        if not self._open:
            raise GradtraceError(f"trace.{what}() was called after `watch` exited; call it inside the "
                                 "`with gradtrace.watch(...)` block")

    def __repr__(self) -> str:
        return (f"<gradtrace.Trace {len(self.params)} params, passes={list(self._passes)}, "
                f"tensors={list(self._tensors)}, cuts={len(self.cuts)}>")


def _names(passes) -> str:
    return ", ".join(repr(n) for n in passes) if passes else "no passes yet"


def _merge_values(into: ValueStats, row: List[float]) -> None:
    n, total, sumsq, lo, hi, zeros, nonfinite, rows, const_rows = row
    finite_n = n - nonfinite
    old_n = into.numel - into.nonfinite
    old_sum = into.mean * old_n
    old_sumsq = (into.std ** 2 + into.mean ** 2) * old_n
    new_n = old_n + finite_n
    if finite_n > 0:
        into.min = lo if old_n == 0 else min(into.min, lo)
        into.max = hi if old_n == 0 else max(into.max, hi)
    if new_n > 0:
        mean = (old_sum + total) / new_n
        var = max((old_sumsq + sumsq) / new_n - mean * mean, 0.0)
        into.mean, into.std = mean, math.sqrt(var)
    into.numel += int(n)
    into.zeros += int(zeros)
    into.nonfinite += int(nonfinite)
    into.rows += int(rows)
    into.constant_rows += int(const_rows)


# ---- watch -------------------------------------------------------------------
def _resolve_target(target) -> Tuple[List[Tuple[str, torch.Tensor]], Optional[nn.Module]]:
    if isinstance(target, nn.Module):
        named = [(n, p) for n, p in target.named_parameters() if p.requires_grad]
        root = target
        what = f"the {type(target).__name__} passed to watch()"
    elif isinstance(target, torch.Tensor) or isinstance(target, (str, bytes)) or not isinstance(target, Iterable):
        raise GradtraceError(
            f"watch() takes an nn.Module or an iterable of (name, parameter) pairs such as "
            f"model.named_parameters(); got {type(target).__name__}")
    else:
        named = []
        for item in target:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], torch.Tensor)):
                raise GradtraceError(
                    f"watch() takes (name, parameter) pairs like model.named_parameters() gives; got {item!r:.80}")
            named.append(item)
        names = [n for n, _ in named]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise GradtraceError(f"parameter names must be unique; repeated: {', '.join(duplicates)}")
        named = [(n, p) for n, p in named if p.requires_grad]
        root = None
        what = "the parameters passed to watch()"
    if not named:
        raise GradtraceError(f"{what} has no trainable parameter (none with requires_grad=True): "
                             "nothing can receive a gradient. Unfreeze what you want traced.")
    return named, root


@contextlib.contextmanager
def watch(target, *, cuts: str = "modules", keep_grads: bool = False,
          max_passes: Optional[int] = None) -> Iterator[Trace]:
    """Hook every trainable parameter of ``target`` for the duration of the block.

    ``target`` is an ``nn.Module`` or an iterable of ``(name, param)``.
    ``cuts``: "modules" (forward hooks on every module, cheap), "ops"
    (a TorchFunctionMode that also sees individual ops), or "off".
    ``keep_grads``: keep each pass's gradient so ``diff`` reports dot
    products and cosines (one copy of the gradients per pass).
    ``max_passes``: keep only the newest N passes (and their kept gradients),
    for a watch left open over a long training loop; the number dropped is
    in ``trace.meta["dropped_passes"]``. None keeps every pass.
    Every hook is removed on exit, whether or not the block raised.
    """
    if cuts not in CUT_MODES:
        raise GradtraceError(f"cuts={cuts!r} is not one of {', '.join(CUT_MODES)}")
    if max_passes is not None and (not isinstance(max_passes, int) or isinstance(max_passes, bool)
                                   or max_passes < 1):
        raise GradtraceError(f"max_passes is a positive int or None, got {max_passes!r}")
    named, root = _resolve_target(target)
    if cuts != "off" and root is None:
        cuts = "off"  # module hooks need the module; parameters alone give coverage only
    clashes = [n for n, p in named if id(p) in _WATCHED]
    if clashes:
        raise GradtraceError(
            f"{len(clashes)} of these parameters ({', '.join(clashes[:3])}{', ...' if len(clashes) > 3 else ''}) "
            "are already watched by another gradtrace.watch that is still open. Close it first, "
            "or watch a different set of parameters.")
    names = [n for n, _ in named]
    params = [p for _, p in named]
    trace = Trace(names, {n: list(p.shape) for n, p in named},
                  meta={"torch": torch.__version__, "cuts": cuts, "keep_grads": keep_grads,
                        "model": type(root).__name__ if root is not None else None,
                        "max_passes": max_passes, "dropped_passes": 0})
    trace._live = True
    trace._names_by_id = {id(p): n for n, p in named}
    trace._tensor_handles = []
    recorder = Recorder(names, params, keep_grads, on_pass_ready=lambda state, pending: _pass_ready(trace, state, pending))
    trace._recorder = recorder
    trace._cut_log = CutLog(lambda: recorder.active.name if recorder.active is not None else None)

    handles: List[Any] = []  # every RemovableHandle; one callback removes them all
    with contextlib.ExitStack() as stack:
        for p in params:
            _WATCHED[id(p)] = "watch"
        stack.callback(_unwatch, params)
        stack.callback(_close_recording, trace)
        stack.callback(_remove_all, handles)
        written = recorder.post_accumulate_hook()
        for index, p in enumerate(params):
            handles.append(p.register_hook(recorder.param_hook(index)))
            handles.append(p.register_post_accumulate_grad_hook(written))
        if cuts in ("modules", "ops"):
            ModuleCutDetector(root, trace._cut_log).attach(handles.append)
        if cuts == "ops":
            from .opcuts import OpCutMode
            stack.enter_context(OpCutMode(root, trace._cut_log, trace._names_by_id).attach(handles.append))
        trace._open = True
        yield trace


def _remove_all(handles: List[Any]) -> None:
    # Removal is idempotent (RemovableHandle), so a handle removed twice is harmless.
    for handle in reversed(handles):
        handle.remove()
    handles.clear()


def _pass_ready(trace: Trace, state: PassState, pending: PendingPass) -> None:
    if state.auto:
        trace._passes[state.name] = None
    trace._pending.append((state.name, pending))
    limit = trace.meta.get("max_passes")
    if limit is not None:
        _drop_oldest(trace, limit)


def _drop_oldest(trace: Trace, limit: int) -> None:
    """Forget the oldest finished passes beyond ``limit`` (an open pass is never dropped)."""
    finished = [name for name, p in trace._passes.items()
                if p is not None or any(n == name for n, _ in trace._pending)]
    for name in finished[:max(0, len(finished) - limit)]:
        trace._passes.pop(name, None)
        trace._pending = [(n, item) for n, item in trace._pending if n != name]
        trace._recorder.kept.pop(name, None)
        for record in trace._tensors.values():
            record.grads.pop(name, None)
        trace.meta["dropped_passes"] += 1


def _close_recording(trace: Trace) -> None:
    """On exit: no hook records any more; runs cut short by an exception still land in their pass."""
    recorder = trace._recorder
    trace._open = False
    recorder.enabled = False
    for run in list(recorder.open_runs.values()):
        recorder.close_run(run)
    if recorder.active is not None:
        recorder.end_pass(recorder.active)
    recorder.flush_orphan()
    for handle in trace._tensor_handles:
        handle.remove()
    trace._tensor_handles = []


def _unwatch(params: List[torch.Tensor]) -> None:
    for p in params:
        _WATCHED.pop(id(p), None)
