"""A pass, from its first engine run to its ``PassTrace``: the one object that changes a pass's state.

A pass is every run inside ``trace.pass_(name)`` (any number of microbatches),
or one unlabelled run. Its life, in ``Phase`` order:

1. ``OPEN``: runs join it (``count_run``); the hooks tell it what they saw
   (``hit``, ``note_grad_before``, ``note_written``, ``note_unseen_handback``,
   ``note_undefined``) and
   each run's end hands it the run (``end_run``).
2. ``FINISHED`` (``finish``): every gradient is read and reduced on the device,
   its accumulators are released, and the watch's event sink hears of it.
3. ``ON_HOST`` (``to_trace``): one host transfer; exactly zero, cleared
   (unknown) and empty are told apart; a ``PassTrace`` comes out.

How ``.backward()`` gradients are read is the pass's ``GradReading`` strategy
(``reading.py``); how figures are reduced is the watch's ``Reduction``
(``stats.py``); which pass a run joins is ``PassAssigner``'s (``assign.py``).
"""
from __future__ import annotations

import array
import enum
import itertools
import math
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Set, Tuple

import numpy as np
import torch

from ..records import PassColumns, PassTrace, TensorGradFacts
from . import wrappers
from .reading import AS_LEFT, CHANGED, GradReading, reading_for
from .stats import Figures, Reduction
from .zero_values import ZeroValued, to_host


class PassEvents(Protocol):
    """What the watch's trace hears from its passes (``LiveTrace`` implements it)."""

    def name_taken(self, name: str) -> bool:
        """Is ``name`` held by a labelled pass already? (Automatic names skip it.)"""

    def pass_finished(self, pass_: "Pass") -> None:
        """``pass_`` has its figures on the device; ``pass_.to_trace`` will bring them to the host."""


@dataclass
class Watched:
    """What every pass of one watch shares: the parameters, the reduction, the sink."""

    names: List[str]
    params: List[torch.Tensor]
    keep_grads: bool
    reduction: Reduction
    events: PassEvents
    # Reduction.figures's grouping, cached per order of parameters: passes of a loop repeat it.
    layouts: Dict[tuple, list] = field(default_factory=dict)
    # Parameters that may be all zero (a zero-initialised adapter factor): probed as each pass begins.
    zero_values: Optional[ZeroValued] = None
    wrapper: Optional["wrappers.Wrapper"] = None  # a distributed wrapper: how .grad is read, what a sync hides


class Phase(enum.Enum):
    OPEN = "open"
    FINISHED = "finished on the device"
    ON_HOST = "on the host"


@dataclass
class Handback:
    """An ``autograd.grad`` parameter's handed-back gradients in this pass."""

    total: torch.Tensor  # the first run's tensor is the caller's own: never changed here
    version: int  # ``total._version`` when it was handed back
    runs: int = 1  # with 2+, ``total`` is a sum this pass made
    edited: bool = False  # the caller changed its tensor in place before the next run added to it

    def edited_since(self) -> bool:
        return self.edited or (self.runs == 1 and self.total._version != self.version)


class Pass:
    """One pass: its accumulators while it is open, its device figures once finished, then its record."""

    def __init__(self, watched: Watched, name: str, *, auto: bool = False, step_start: bool = False,
                 read_at: str = "pass_end", accumulate: bool = False):
        self.watched = watched
        self.params = watched.params
        self.name = name
        self.auto = auto
        self.step_start = step_start
        self.accumulate = accumulate  # adds to gradients earlier passes left, on purpose: never stale
        self.phase = Phase.OPEN
        self.runs = 0
        self.kinds: List[str] = []
        self.failed: Optional[str] = None
        self.scope = "local"  # PassTrace.scope: set by every .backward() run as it ends
        self._scopes: List[str] = []  # every .backward() run's scope, in order
        # Set as the pass's first run starts: did a run without sync leave gradients waiting for the next
        # synced backward (DDP/FSDP no_sync)? Then a synced pass averages them with its own.
        self.prior_unsynced: Optional[bool] = None
        # Finished by whoever opened it (a DeepSpeed engine.backward() call), not when its run ends.
        self.held = False
        # Parameters whose figures a wrapper's reading cannot give, and why (the first reason given).
        self._unknown: Set[int] = set()
        self.unknown_because: Optional[str] = None
        self._empty_taken: Set[int] = set()  # figures a reading took from empty shards
        self.expected: Optional[Set[str]] = None  # parameters reachable from tensors registered in the pass
        self.expected_partial = False
        wrapper = watched.wrapper
        self._reading: GradReading = wrapper.reading_for(read_at) if wrapper is not None else reading_for(read_at)
        bind = getattr(self._reading, "bind", None)  # a strategy that reads on a wrapper's word needs its pass
        if bind is not None:
            bind(self)
        self._hits: List[int] = []  # parameter indices, in the order the hooks fired (backward order)
        # The parameter hook's one call: a builtin, so no Python frame per parameter.
        self.hit = self._hits.append
        self._written: List[int] = []  # .grad written without a tensor hook (post-accumulate, flat params)
        self._backward: Set[int] = set()  # reached by a .backward() run
        # .grad as it was when the pass first reached a parameter, where it was not None:
        # the pass's own gradient is .grad minus this.
        self._bases: Dict[int, torch.Tensor] = {}
        self._handbacks: Dict[int, Handback] = {}
        # Handed-back gradients taken at the end of the run that handed them back, while they are
        # the caller's own tensors: what the pass reports when no later run adds to them.
        self._handback_pieces: List[Tuple[List[int], Figures]] = []
        # autograd.grad runs whose handed-back gradient gradtrace could not see: vmapped ones
        # (is_grads_batched=True), or one a later-registered hook may have changed. Figures unknown.
        self._unseen: Set[int] = set()
        # Parameters the engine reached with an undefined gradient (their hook got None): a backward on
        # the way returned None for them. Names in the record, judged only where they stayed unreached.
        self._undefined: Set[int] = set()
        self._tensor_rows: Dict[str, List[torch.Tensor]] = {}  # registered tensors: (3,) figures per delivery
        self._device: Optional[_DeviceFigures] = None
        self.kept: Optional[Dict[str, torch.Tensor]] = None  # keep_grads: the pass's gradients, by name
        # Hookless reading (capture/hookless.py): may a run of this pass teach the engine's order (no
        # nested run, no parameter reached before the model's output)? .grad of every parameter when the
        # labelled pass began; did a run of it go without parameter hooks?
        self.plain = True
        self.grads_at_start: Optional[List[Optional[torch.Tensor]]] = None
        self.had_hookless_runs = False
        # The values the pass's forward used, of parameters that may be all zero (read only if a
        # gradient of the pass is exactly zero: see zero_values.py).
        zero_values = watched.zero_values
        self._zero_probe = zero_values.probe() if zero_values is not None else None
        self.resets: List[Optional[torch.Tensor]] = []  # see note_reset

    def __repr__(self) -> str:
        return f"<Pass {self.name!r} {self.phase.value}, {self.runs} runs>"

    # ---- while open --------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.phase is not Phase.OPEN

    @property
    def hit_count(self) -> int:
        return len(self._hits)

    def hits_from(self, start: int) -> Optional[int]:
        """The first parameter reached at or after position ``start`` of the hit log (None: none)."""
        hits = self._hits
        return hits[start] if len(hits) > start else None

    def count_run(self) -> "Pass":
        self.runs += 1
        return self

    def hits(self, indices: List[int]) -> None:
        """A hookless run reached these parameters (in the engine's order)."""
        self._hits.extend(indices)
        self.had_hookless_runs = True

    def hits_since(self, start: int) -> List[int]:
        return self._hits[start:]

    def reached_set(self) -> Set[int]:
        return set(self._hits).union(self._written)

    def reached_all(self) -> bool:
        """Did runs of the pass report every watched parameter reached?"""
        return len(self._backward) == len(self.params)

    def note_kind(self, kind: str) -> None:
        if kind not in self.kinds:
            self.kinds.append(kind)

    def note_written(self, indices: List[int]) -> None:
        """``.grad`` of these parameters was written (post-accumulate hooks, FSDP flat parameters)."""
        self._written.extend(indices)
        self._backward.update(indices)
        self.note_kind("backward")

    def note_unseen_handback(self, index: int) -> None:
        self._unseen.add(index)

    def note_undefined(self, index: int) -> None:
        """The engine reached this parameter with no gradient (None): not a hit."""
        self._undefined.add(index)

    def note_grad_before(self, index: int, grad: torch.Tensor) -> None:
        """Called before AccumulateGrad adds to a non-None ``.grad``.

        The first time in a pass, keep a copy: the pass's gradient is what
        ``.grad`` gains, and a nonzero copy means the grads were not zeroed.
        """
        # Earlier runs of this pass put the gradient there themselves. An
        # unlabelled run is its own pass: accumulating microbatches without a
        # label is legitimate, and a copy per parameter per run would be the
        # price, so it reports .grad as the run left it -- except the first run
        # after an optimizer step, where stale .grad is judged.
        if not self.takes_bases or index in self._bases or index in self._backward:
            return
        self._bases[index] = grad.detach().clone()

    @property
    def takes_bases(self) -> bool:
        """Does the pass copy a non-None ``.grad`` before its first accumulation (``note_grad_before``)?"""
        return not ((self.auto and not self.step_start) or self.accumulate)

    def expect(self, found: Set[str], partial: bool) -> None:
        """Parameters a registered tensor's graph reaches: the pass is expected to cover them."""
        self.expected = (self.expected or set()) | found
        self.expected_partial = self.expected_partial or partial

    def fail(self, description: str) -> None:
        """The pass's block (or a backward in it) raised: a finding, kept in the record (the first one).

        Allowed until the record is built: a run cut short may be closed after its pass finished."""
        if self.failed is None and self.phase is not Phase.ON_HOST:
            self.failed = description

    def end_run(self, run, written: List[int], scope: Optional[str], read: bool,
                left=None,
                later: Optional[Callable[[Callable[[], None]], None]] = None) -> None:
        """A run of this pass ended (``run``: a ``runs.Run``; its hooks' findings are in it).

        ``written``: parameters whose ``.grad`` was written without a tensor hook;
        ``scope``: what a ``.backward()`` run's figures are (None for other runs);
        ``read``: let the reading strategy note what the run left (not for a pass that
        is finishing right now anyway); ``left``: ``.grad`` and its version as the run
        left them, already read (hookless reading), for some of the parameters.
        ``later``: queues a callback after the run's other end-of-run callbacks; a
        run-end reading waits for them (DDP's ``finalize_backward`` writes the averaged
        gradient there, so what was read before is not used). A run cut short that is
        closed after its pass finished (at exit) adds nothing.
        """
        if self.phase is not Phase.OPEN:
            return
        reached = self._hits[run.start:]  # an outer run's slice includes its nested runs': harmless
        if run.accumulates:
            self._backward.update(reached)
            self.scope = scope
            self._scopes.append(scope)
        if written:
            self.note_written(written)
        if read and (run.accumulates or written):
            indices = list(dict.fromkeys(itertools.chain(reached, written)))
            if not run.accumulates:
                indices = [i for i in indices if i in self._backward]
            if later is not None and self._reading.reads_values:
                later(lambda: self._reading.run_ended(self, indices))
            else:
                self._reading.run_ended(self, indices, left)
        if run.captured:
            self._add_handbacks(run.captured)
        for name, row in run.tensor_grads:
            self._tensor_rows.setdefault(name, []).append(row)

    def _add_handbacks(self, captured: List[Tuple[int, torch.Tensor]]) -> None:
        """Gradients ``autograd.grad`` is about to hand back: summed per parameter, never changed in place."""
        handbacks = self._handbacks
        first: List[int] = []
        firsts: List[torch.Tensor] = []
        for index, grad in captured:
            if grad.requires_grad:  # create_graph=True: the figures never join the graph
                grad = grad.detach()
            previous = handbacks.get(index)
            if previous is None:
                if self.watched.keep_grads:  # a copy is kept anyway: take it now, before the caller can edit it
                    grad = grad.clone()
                handbacks[index] = Handback(grad, grad._version)
                first.append(index)
                firsts.append(grad)
            else:
                previous.edited = previous.edited_since()
                previous.total = previous.total + grad
                previous.runs += 1
        if first:
            # Taken now, while the caller cannot have changed them yet (the engine has not returned):
            # an in-place edit later (``_foreach_mul_``, an optimizer step after ``p.grad = g``) is not the pass's.
            self._handback_pieces.append((first, self.figures(firsts, ("grad",) + tuple(first))))

    def note_reset(self, zeroed: Optional[torch.Tensor]) -> None:
        """A run of this pass began after the gradient an earlier run left (no optimizer step since) was
        cleared: set to None (``zeroed`` None), or changed in place, where ``zeroed`` is a device flag that
        says whether it was zeroed (read with the pass's record)."""
        self.resets.append(zeroed)

    def _resets_to_host(self) -> Optional[int]:
        resets, self.resets = self.resets, []
        flags = [f for f in resets if f is not None]
        definite = len(resets) - len(flags)
        return (definite + (int(sum(to_host(flags))) if flags else 0)) or None

    def read_now(self) -> None:
        """A wrapper says its reduction of the pass's gradients is over: a strategy that reads then, reads."""
        take = getattr(self._reading, "take", None)
        if take is not None:
            take()

    # ---- the reading strategy's view -------------------------------------------------
    @property
    def backward_indices(self) -> Set[int]:
        return self._backward

    def set_empty(self, indices: List[int]) -> None:
        """The reading's latest word: these parameters' local shard has no element (never "exactly zero")."""
        self._empty_taken = set(indices)

    def set_unknown(self, indices: List[int], reason: Optional[str]) -> None:
        """The reading's latest word: these parameters' figures cannot be read in this pass, for ``reason``."""
        self._unknown = set(indices)
        self.unknown_because = reason if indices else None

    def gain(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        """What ``.grad`` gained in this pass (``grad`` minus its value when the pass first reached it)."""
        base = self._bases.get(index)
        if grad.requires_grad:
            grad = grad.detach()
        return grad if base is None else grad - base

    def figures(self, grads: List[torch.Tensor], key: Optional[tuple] = None) -> Figures:
        return self.watched.reduction.figures(grads, self.watched.layouts, key)

    # ---- finished: on the device -------------------------------------------------------
    def finish(self) -> None:
        """Read and reduce every gradient of the pass on the device; release the accumulators; tell the sink."""
        if self.phase is not Phase.OPEN:
            return
        self.phase = Phase.FINISHED
        order = list(dict.fromkeys(itertools.chain(self._hits, self._written)))
        if len(order) == len(self._hits):  # the common case: every parameter reached once (one run)
            hits: Dict[int, int] = _ONCE
        else:
            hits = Counter(self._hits)
            for index in set(self._written) - set(hits):
                hits[index] = 1  # written without a tensor-hook delivery (FSDP2)
        pieces, now = self._pieces(order)
        reading = self._read(now)
        via = reading.via if len(reading.via) == len(order) else {**self._via_before(order), **reading.via}
        if self.watched.keep_grads:
            self.kept = self._kept(order, dict(zip(now, reading.totals, strict=False)))
        if reading.totals:
            pieces.append((now, self.figures(reading.totals, tuple(now))))
        stale_candidates = list(self._bases)
        self._device = _DeviceFigures(
            order=order, hits=hits, via=via, pieces=pieces,
            bases=self.figures([self._bases[i] for i in stale_candidates]) if stale_candidates else None,
            stale_candidates=stale_candidates, cleared=reading.cleared, changed=reading.changed,
            empty=_empty(now, reading.totals) | self._empty_taken,
            tensor_rows={name: torch.stack(rows) for name, rows in self._tensor_rows.items()})
        self._release()
        self.watched.events.pass_finished(self)

    def _pieces(self, order: List[int]) -> Tuple[List[Tuple[List[int], Figures]], List[int]]:
        """Figures taken before the pass ended, and the parameters still to read now."""
        pieces = list(self._reading.pieces())
        if not pieces and not self._handback_pieces:  # the common case: everything is read now
            return pieces, order
        final: Set[int] = {i for indices, _ in pieces for i in indices} - self._handbacks.keys()
        handbacks = self._handbacks
        for indices, figures in self._handback_pieces:
            pieces.append((indices, figures))
            final.update(i for i in indices if handbacks[i].runs == 1 and i not in self._backward)
        if not final:
            return pieces, order
        return pieces, [i for i in order if i not in final or i in self._unseen]

    def _via_before(self, order: List[int]) -> Dict[int, str]:
        """How gradients read before the pass ended arrived: handed back only, or (the rest) through .grad."""
        handbacks, backward = self._handbacks, self._backward
        return {i: "grad" if i in handbacks and i not in backward else "backward" for i in order}

    def _read(self, order: List[int]) -> "_Reading":
        """Every given parameter's gradient in the pass, and how it arrived ("backward", "grad", "both")."""
        params = self.params
        if not self._bases and not self._handbacks and not self._unseen:  # the common case: .backward() only
            totals = list(map(operator.attrgetter("grad"), map(params.__getitem__, order)))
            if not any(map(operator.is_, totals, itertools.repeat(None))) \
                    and self._reading.all_as_left(params, order, totals):
                return _Reading(totals, dict.fromkeys(order, "backward"), set(), set())
        reading = _Reading([], {}, set(), set())
        for index in order:
            total, reading.via[index] = self._gradient(index, reading)
            reading.totals.append(total)
        return reading

    def _gradient(self, index: int, reading: "_Reading") -> Tuple[torch.Tensor, str]:
        """What the pass gave this parameter: .grad's gain plus the gradients handed back."""
        param = self.params[index]
        if index in self._unseen and index not in self._backward:
            return reading.unknown(param, index), "grad"
        parts, how = [], []
        if index in self._backward:
            grad, status = self._reading.backward_grad(param, index)
            if grad is None:
                wrapper = self.watched.wrapper
                if wrapper is not None and self.scope != wrappers.LOCAL and wrapper.holds_none_of(param):
                    grad = param.new_zeros(0)  # this rank's shard holds none of it: empty, not unknown
                else:
                    grad = reading.unknown(param, index)
            elif status == CHANGED:
                reading.changed.add(index)
            parts.append(self.gain(index, grad) if status in (AS_LEFT, CHANGED) else grad)
            how.append("backward")
        handback = self._handbacks.get(index)
        if handback is not None:
            if handback.edited_since():  # the caller changed its own tensor in place: its value then is gone
                reading.unknown(param, index)
            parts.append(handback.total)
            how.append("grad")
        if not parts:  # reached by a run that never ended (cut short by an exception): nothing to read
            return reading.unknown(param, index), "backward"
        total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        return total, "both" if len(how) == 2 else how[0]

    def _kept(self, order: List[int], now: Dict[int, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """keep_grads: a copy of each reached parameter's gradient in the pass (read now, or as .grad is)."""
        kept = {}
        names = self.watched.names
        for i in order:
            grad = now.get(i)
            if grad is None:
                handback = self._handbacks.get(i)
                grad = handback.total if handback is not None and i not in self._backward else self.params[i].grad
            if grad is not None:
                kept[names[i]] = grad.detach().clone()
        return kept

    def _release(self) -> None:
        """Only the (n, 3) figures stay on the device: every gradient reference goes."""
        self._bases = {}
        self._handbacks = {}
        self._handback_pieces = []
        self._tensor_rows = {}
        self._reading.release()

    # ---- on the host -------------------------------------------------------------
    def take_kept(self) -> Optional[Dict[str, torch.Tensor]]:
        kept, self.kept = self.kept, None
        return kept

    def to_trace(self, params: Tuple[str, ...]) -> Tuple[PassTrace, Dict[str, TensorGradFacts]]:
        """The pass's one host transfer: its record, and what backward brought its registered tensors."""
        if self.phase is not Phase.FINISHED:
            raise RuntimeError(f"pass {self.name!r} is {self.phase.value}: only a finished pass goes to the host")
        device, self._device = self._device, None
        self.phase = Phase.ON_HOST
        grid = device.grid()
        order, names = device.order, self.watched.names
        stale: Set[int] = set()
        # Judged where a step begins (an error) and in labelled passes (a warning: a forgotten zero_grad(),
        # unless the pass says it accumulates); an unlabelled run inside an accumulation loop keeps no bases.
        if device.bases is not None:
            stale = {i for i, row in zip(device.stale_candidates, device.bases.to_host(), strict=False)
                     if row[1] != 0.0 or row[2] != 0.0}
        max_abs, bad = grid[:, 1], grid[:, 2]
        # Three states kept apart: exactly zero (max |g| is 0, from a gradient really read), cleared
        # (unknown: .grad was gone, or zeroed in place after its run, or a handed-back tensor edited),
        # and empty (an FSDP shard with no element: nothing to be zero).
        hidden, reason = self._unknown_by_wrapper(device)
        if hidden:  # read, but not this pass's own: no number at all rather than a wrong one
            grid[_members(order, hidden)] = 0.0
        unknown = (_members(order, device.cleared | hidden)
                   | (_members(order, device.changed) & (max_abs == 0.0) & (bad == 0)))
        zero = (max_abs == 0.0) & (bad == 0) & ~unknown & ~_members(order, device.empty)
        hits, via, n = device.hits, device.via, len(order)
        columns = PassColumns(
            name=list(map(names.__getitem__, order)), hits=[1] * n if hits is _ONCE else [hits[i] for i in order],
            norm=_doubles(grid[:, 0]), max_abs=_doubles(max_abs), zero=zero.tolist(),
            nonfinite=bad.astype(np.int64).tolist(), via=list(map(via.__getitem__, order)), order=range(n),
            stale=[i in stale for i in order] if stale else [False] * n, cleared=unknown.tolist())
        trace = PassTrace.from_columns(columns, name=self.name, params=params, runs=self.runs,
                                       kinds=list(self.kinds), auto=self.auto, kept_grads=self.watched.keep_grads,
                                       step_start=self.step_start, failed=self.failed,
                                       scope=self.scope if "backward" in self.kinds else "local",
                                       grads_reset=self._resets_to_host(), unknown_because=reason)
        probe, self._zero_probe = self._zero_probe, None
        if probe is not None:  # read while candidates last: a candidate read as nonzero is never probed again
            zero_valued = self.watched.zero_values.read(probe)
            if zero.any():
                trace.zero_valued = [names[i] for i in zero_valued]
        if self._undefined:
            trace.undefined_grads = sorted(names[i] for i in self._undefined)
        if self.expected is not None:
            trace.expected = sorted(self.expected)
            trace.expected_partial = self.expected_partial
        return trace, {name: _tensor_facts(rows.tolist()) for name, rows in device.tensor_rows.items()}


    def _unknown_by_wrapper(self, device: "_DeviceFigures") -> Tuple[Set[int], Optional[str]]:
        """Parameters whose figures a distributed wrapper put out of reach in this pass, and why.

        A pass's figure is what ``.grad`` gained over it. Around a sync that is exact
        when the sync averaged only gradients the pass can tell apart: its own, and a
        ``.grad`` it found already averaged. It is not when the pass found this rank's
        unsynced gradient (an earlier ``no_sync`` microbatch) and the sync averaged it
        with the pass's own; nor when the gradient of a pass without sync stays inside
        the wrapper (FSDP2); nor when a run without sync follows a synced one.
        """
        wrapper, unknown, reason = self.watched.wrapper, set(self._unknown), self.unknown_because
        scopes = self._scopes
        if wrapper is None or not scopes or not wrapper.syncs():
            return unknown, reason
        backward = [i for i in device.order if i in self._backward]
        found: Set[int] = set()
        if scopes[-1] == wrappers.LOCAL and any(s != wrappers.LOCAL for s in scopes):
            found, why = set(backward), wrappers.MIXED_RUNS
        elif scopes[-1] == wrappers.LOCAL and wrapper.local_figures_hidden():
            found, why = set(backward), wrappers.LOCAL_HIDDEN
        elif self.prior_unsynced and wrapper.hides_unsynced():
            found, why = set(backward), wrappers.INHERITED_HIDDEN
        elif self.prior_unsynced and scopes[-1] != wrappers.LOCAL and device.bases is not None:
            # .grad held this rank's unsynced gradient where it was not zero when the pass began
            found = {i for i, row in zip(device.stale_candidates, device.bases.to_host(), strict=False)
                     if row[1] != 0.0 or row[2] != 0.0}
            why = wrappers.INHERITED
        if found:
            unknown |= found
            reason = reason or why
        return unknown, reason


# ``_DeviceFigures.hits`` when every parameter of the pass was reached exactly once.
_ONCE: Dict[int, int] = {}


@dataclass
class _DeviceFigures:
    """A finished pass's figures, still on the device (one host transfer reads them)."""

    order: List[int]  # indices of the parameters reached, in backward order
    hits: Counter
    via: Dict[int, str]
    pieces: List[Tuple[List[int], Figures]]  # a later piece overrides an earlier one for the same index
    bases: Optional[Figures]  # .grad as the pass found it, for staleness
    stale_candidates: List[int]
    cleared: Set[int]  # figure unknown: .grad cleared before it could be read, or a handback edited
    changed: Set[int]  # .grad changed in place after its last run: zero means cleared
    empty: Set[int]  # the local gradient has no element (an empty FSDP shard): never "exactly zero"
    tensor_rows: Dict[str, torch.Tensor]

    def grid(self) -> np.ndarray:
        """(norm, max |g|, NaN/Inf count) of every reached parameter, in ``order``."""
        order = self.order
        if len(self.pieces) == 1 and self.pieces[0][0] is order:
            return self.pieces[0][1].to_host()
        rows: Dict[int, np.ndarray] = {}
        for indices, figures in self.pieces:
            rows.update(zip(indices, figures.to_host(), strict=False))
        none = np.zeros(3)
        return np.array([rows.get(i, none) for i in order], dtype=np.float64).reshape(len(order), 3)


@dataclass
class _Reading:
    """The pass-end reading of some parameters' gradients."""

    totals: List[torch.Tensor]
    via: Dict[int, str]
    cleared: Set[int]
    changed: Set[int]

    def unknown(self, param: torch.Tensor, index: int) -> torch.Tensor:
        self.cleared.add(index)
        return torch.zeros_like(param)


def _tensor_facts(rows: List[List[float]]) -> TensorGradFacts:
    """A registered tensor's gradient over a pass, from one (norm, max |g|, NaN/Inf) row per delivery."""
    norms = [r[0] for r in rows]
    top = max(norms)
    if all(map(math.isfinite, norms)) and top > 0.0:
        # Scaled by the largest norm: the squares of 1e-200 (float64) would underflow.
        norm = top * math.sqrt(math.fsum((n / top) ** 2 for n in norms))
    else:  # zero, or NaN/Inf, which propagate
        norm = math.sqrt(sum(n * n for n in norms))
    return TensorGradFacts(hits=len(rows), norm=norm, max_abs=max(r[1] for r in rows),
                           nonfinite=int(sum(r[2] for r in rows)))


def _members(order: List[int], indices: Set[int]) -> np.ndarray:
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


def _empty(indices: List[int], grads: List[torch.Tensor]) -> Set[int]:
    """Indices whose local gradient has no element: a plain tensor's numel, a DTensor's local shard's."""
    if grads and set(map(type, grads)) == {torch.Tensor}:  # the common case, in C-level loops
        sizes = list(map(torch.Tensor.numel, grads))
        return set() if all(sizes) else {i for i, n in zip(indices, sizes, strict=False) if not n}
    return {i for i, g in zip(indices, grads, strict=False)
            if not (g.numel() if type(g) is torch.Tensor else _local_numel(g))}


def _local_numel(g: torch.Tensor) -> int:
    to_local = getattr(g, "to_local", None)  # a DTensor's numel is the global one
    return (to_local() if callable(to_local) else g).numel()
