"""Optimizer steps, seen without being told: torch.optim's global step hooks.

``torch.optim.optimizer.register_optimizer_step_pre_hook`` / ``_post_hook`` run
around every ``Optimizer.step`` in the process (any optimizer class built on
``torch.optim.Optimizer``); ``watch`` registers one of each and removes them on
exit. From them:

* step boundaries: the first pass after a step begins an optimizer step, where
  stale ``.grad`` is judged (a loop that never calls ``zero_grad()``);
* which optimizer stepped on which pass's gradients, and which watched
  parameters are in its param groups (alternating optimizers, NOT_IN_OPTIMIZER);
* what the step did to the weights, measured on a fixed sample of each stepped
  parameter's elements (``SAMPLE`` evenly spaced elements of the flattened
  tensor): the sampled weight and gradient are copied on the device before the
  step (one ``torch.cat`` per device), compared with the weight after it, and
  reduced per parameter with one ``index_add_``: how many sampled elements with
  a nonzero gradient the step left bitwise unchanged, and ||update||^2 and
  ||weight||^2 of the sample. Nothing is read on the host until the trace is
  read (``take``), so a step costs no host synchronisation. ``watch(updates=False)``
  skips the measurement;
* under a ``torch.amp.GradScaler`` (found on the stack: ``GradScaler._maybe_opt_step``
  calls the step), its scale and the total norm of the gradients handed to the
  step, for CLIP_BEFORE_UNSCALE.

An optimizer gradtrace does not know is read through ``param_groups`` alone: a
list of dicts with ``"params"`` (and ``"lr"`` when it has one).
"""
from __future__ import annotations

import itertools
import numbers
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.optim.optimizer as optimizer_hooks

from .._torch_compat import flatten_dense_tensors, foreach_norm
from ..records import OptimizerRecord

SAMPLE = 16  # elements sampled per parameter, evenly spaced over its flattened values
# Per stepped parameter, over its sampled elements: with a nonzero gradient, of those left bitwise
# unchanged, ||update||^2, ||weight||^2, finite weights (with finite gradients) the step made NaN/Inf.
STAT_COLUMNS = 5


def _sample(t: torch.Tensor) -> torch.Tensor:
    """A strided view of up to SAMPLE elements (a view: no copy until the caller concatenates)."""
    n = t.numel()
    stride = max(1, n // SAMPLE)
    if t.is_contiguous():  # one op instead of three: the same elements as the reshape-and-slice below
        return t.detach().as_strided((len(range(0, n, stride)[:SAMPLE]),), (stride,))
    flat = t.detach().reshape(-1)
    return flat[::stride][:SAMPLE]


def _lr(value: Any) -> Optional[float]:
    """A param group's lr as a float: a number, or a tensor on the host; None for anything else."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type == "cpu":
        return float(value)
    return None


def _scaler_on_stack(depth: int = 2, limit: int = 6):
    """The GradScaler whose ``step`` is calling this optimizer step, if any (a few frames up)."""
    frame = sys._getframe(depth)
    for _ in range(limit):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.amp.GradScaler):
            return owner
        frame = frame.f_back
    return None


@dataclass
class _Optimizer:
    """What gradtrace knows of one optimizer: its label and its watched parameters (by index)."""

    name: str
    ref: Any  # a weak reference to the optimizer
    signature: tuple = ()
    indices: List[int] = field(default_factory=list)
    plain: List[int] = field(default_factory=list)  # of ``indices``, the dense plain tensors


@dataclass
class _Group:
    """Parameters of one device and dtype, sampled together: the small ones whole (one flatten), then
    a strided view of each large one; ``segment`` gives each sampled element's row."""

    small: List[int]
    large: List[int]
    segment: torch.Tensor

    @property
    def order(self) -> List[int]:
        return self.small + self.large


@dataclass
class _Before:
    """One step's sample before the step: per group, the weights and gradients sampled."""

    groups: List[_Group]
    weights: List[torch.Tensor]
    grads: Optional[List[torch.Tensor]]  # None: a closure makes them inside the step, sampled after it


@dataclass
class PendingStep:
    """One step's figures, still on the device."""

    optimizer: str
    params: List[str]
    lrs: List[Optional[float]]
    pass_name: Optional[str]
    stepped: List[int] = field(default_factory=list)  # indices measured, in the order of ``stats`` rows
    stats: List[torch.Tensor] = field(default_factory=list)  # per device: (n, STAT_COLUMNS) float64
    scale: Optional[torch.Tensor] = None
    grad_sq: List[torch.Tensor] = field(default_factory=list)
    any_grad: bool = True  # some watched parameter it owns had a .grad


class OptimizerObserver:
    """The global step hooks of one watch, and what they saw (``records``, read with ``take``)."""

    def __init__(self, names: List[str], params: List[torch.Tensor], on_step: Callable[[], None],
                 pass_of_step: Callable[[], Optional[str]], measure_updates: bool = True):
        self.names = names
        self.params = params
        self.index_of = {id(p): i for i, p in enumerate(params)}
        self.on_step = on_step
        self.pass_of_step = pass_of_step
        self.measure_updates = measure_updates
        self.known: Dict[int, _Optimizer] = {}
        self.counter = itertools.count()
        self.before: Dict[int, _Before] = {}
        self.pending: List[PendingStep] = []
        self.group_cache: Dict[tuple, List[_Group]] = {}
        # Each parameter's sample view, made once: optimizers update weights in place, so the view keeps
        # showing the current values (made again if the parameter's storage was replaced).
        self.weight_views: Dict[int, Tuple[torch.Tensor, int]] = {}

    def attach(self, handles: List[Any]) -> None:
        handles.append(optimizer_hooks.register_optimizer_step_pre_hook(self.pre_step))
        handles.append(optimizer_hooks.register_optimizer_step_post_hook(self.post_step))

    # ---- the hooks ---------------------------------------------------------------
    def pre_step(self, optimizer, args, kwargs) -> None:
        seen = self._seen(optimizer)
        if seen is None:
            return
        params = self.params
        # A closure (LBFGS, Lightning's automatic optimization) runs forward and backward inside the
        # step: the gradients exist only after it, so they are sampled then.
        closure = kwargs.get("closure") if kwargs else None
        rest = args[1:] if args and args[0] is optimizer else args  # the hook is handed (self, closure, ...)
        if closure is None and rest and callable(rest[0]):
            closure = rest[0]
        with_grad = list(seen.plain) if closure is not None else [i for i in seen.plain if params[i].grad is not None]
        step = PendingStep(seen.name, [self.names[i] for i in seen.indices], self._lrs(optimizer),
                           self.pass_of_step(), any_grad=bool(with_grad))
        # Sparse gradients (nn.Embedding(sparse=True)) are not sampled: their parameters are left unjudged.
        with_grad = [i for i in with_grad if params[i].grad is None or params[i].grad.layout == torch.strided]
        scaler = _scaler_on_stack()
        if scaler is not None and closure is None and with_grad and getattr(scaler, "_scale", None) is not None:
            step.scale = scaler._scale.detach().clone()
            step.grad_sq = _squares_by_device([params[i].grad for i in with_grad])
        self.pending.append(step)
        if self.measure_updates and with_grad:
            with torch.no_grad():  # the hooks run outside the step's own no_grad
                self.before[id(optimizer)] = self._sample_before(with_grad, grads_now=closure is None)

    def post_step(self, optimizer, args, kwargs) -> None:
        before = self.before.pop(id(optimizer), None)
        seen = self.known.get(id(optimizer))
        if seen is None:
            return
        self.on_step()
        if before is None:
            return
        step = next((s for s in reversed(self.pending) if s.optimizer == seen.name), None)
        if step is None:
            return
        if before.grads is None:  # a closure made them during the step
            step.any_grad = any(self.params[i].grad is not None for g in before.groups for i in g.order)
            if not step.any_grad:
                return
        with torch.no_grad():
            grads = before.grads if before.grads is not None else [self._sample_grads(g) for g in before.groups]
            for group, weight, grad in zip(before.groups, before.weights, grads, strict=False):
                after = self._sample_weights(group)
                moved = grad != 0
                unchanged = moved & (after == weight)
                # Finite weights and gradients the step made NaN/Inf: the update itself overflowed.
                broken = ~torch.isfinite(after) & torch.isfinite(weight) & torch.isfinite(grad)
                update = after.to(torch.float64) - weight.to(torch.float64)
                update = torch.where(broken | ~torch.isfinite(update), 0.0, update)
                columns = torch.stack([moved.to(torch.float64), unchanged.to(torch.float64), update * update,
                                       weight.to(torch.float64).square(), broken.to(torch.float64)], dim=1)
                stats = torch.zeros(len(group.order), STAT_COLUMNS, dtype=torch.float64, device=columns.device)
                step.stats.append(stats.index_add_(0, group.segment, columns))
                step.stepped.extend(group.order)

    # ---- pieces ----------------------------------------------------------------------
    def _seen(self, optimizer) -> Optional[_Optimizer]:
        groups = getattr(optimizer, "param_groups", None)
        if not isinstance(groups, (list, tuple)):
            return None  # not an optimizer gradtrace can read: no verdict from it
        seen = self.known.get(id(optimizer))
        if seen is None or seen.ref() is not optimizer:
            seen = _Optimizer(f"{type(optimizer).__name__}#{next(self.counter)}", weakref.ref(optimizer))
            self.known[id(optimizer)] = seen
        signature = tuple((len(g.get("params", ())), id(g.get("params", [None])[0]) if g.get("params") else 0)
                          for g in groups if isinstance(g, dict))
        if signature != seen.signature:  # param groups added or replaced: read them again
            seen.signature = signature
            index_of = self.index_of
            seen.indices = [index_of[id(p)] for g in groups if isinstance(g, dict)
                            for p in g.get("params", ()) if id(p) in index_of]
            # Plain dense tensors only are sampled (a DTensor shard or a sparse weight is not).
            seen.plain = [i for i in seen.indices if type(self.params[i]) in _PLAIN
                          and self.params[i].layout == torch.strided]
        return seen

    @staticmethod
    def _lrs(optimizer) -> List[Optional[float]]:
        return [_lr(g.get("lr")) for g in optimizer.param_groups if isinstance(g, dict)]

    def _sample_before(self, indices: List[int], grads_now: bool = True) -> _Before:
        groups = self._groups(indices)
        grads = [self._sample_grads(g) for g in groups] if grads_now else None
        return _Before(groups, [self._sample_weights(g) for g in groups], grads)

    def _sample_grads(self, group: _Group) -> torch.Tensor:
        """The group's sampled gradients; a parameter without one reads as zeros (never judged)."""
        params = self.params
        grads = [params[i].grad if params[i].grad is not None and params[i].grad.layout == torch.strided
                 else torch.zeros_like(params[i]) for i in group.order]
        small = len(group.small)
        parts = [flatten_dense_tensors(grads[:small])] if small else []
        parts += [_sample(g) for g in grads[small:]]
        return torch.cat(parts)

    def _sample_weights(self, group: _Group) -> torch.Tensor:
        """A copy of the group's sampled weights (small parameters whole, one strided view per large one)."""
        params = self.params
        parts = [flatten_dense_tensors([params[i] for i in group.small])] if group.small else []
        parts += [self._weights(i) for i in group.large]
        return torch.cat(parts)

    def _weights(self, index: int) -> torch.Tensor:
        param = self.params[index]
        cached = self.weight_views.get(index)
        pointer = param.data_ptr()
        if cached is None or cached[1] != pointer:
            cached = self.weight_views[index] = (_sample(param), pointer)
        return cached[0]

    def _groups(self, indices: List[int]) -> List[_Group]:
        """How ``indices`` are sampled: by device and dtype, small parameters first (cached per list)."""
        key = tuple(indices)
        groups = self.group_cache.get(key)
        if groups is not None:
            return groups
        params = self.params
        by_kind: Dict[tuple, Tuple[List[int], List[int]]] = {}
        for i in indices:
            p = params[i]
            small, large = by_kind.setdefault((p.device, p.dtype), ([], []))
            (small if p.numel() <= SAMPLE and p.is_contiguous() else large).append(i)
        groups = []
        for (device, _), (small, large) in by_kind.items():
            counts = [params[i].numel() for i in small] + [_sample(params[i]).numel() for i in large]
            segment = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(device)
            groups.append(_Group(small, large, segment))
        if len(self.group_cache) > 64:
            self.group_cache.clear()
        self.group_cache[key] = groups
        return groups

    # ---- to the host ---------------------------------------------------------------
    def take(self, records: Dict[str, OptimizerRecord]) -> None:
        """Move every pending step's figures to the host, into ``records`` (one transfer per step and device)."""
        pending, self.pending = self.pending, []
        for step in pending:
            record = records.get(step.optimizer)
            if record is None:
                record = records[step.optimizer] = OptimizerRecord(name=step.optimizer)
            record.params, record.lrs = step.params, step.lrs
            record.steps += 1
            if step.pass_name is not None:
                record.passes[step.pass_name] = record.passes.get(step.pass_name, 0) + 1
            moved, unchanged, ratio = _fold_updates(record, step, self.names, self.params)
            _note_step(record, step.lrs, ratio, moved, unchanged)
            if not step.any_grad or moved == 0:  # nothing to apply: the step cannot change a weight
                record.empty_steps += 1
                record.zeroed_steps += step.any_grad  # .grad there, and zero
                record.empty_passes.append(step.pass_name)
                del record.empty_passes[:-SCALED_STEPS_KEPT]
            if step.scale is not None:
                grad_norm = float(sum(float(t) for t in step.grad_sq)) ** 0.5
                record.scaled_steps.append([step.pass_name, grad_norm, float(step.scale)])
                del record.scaled_steps[:-SCALED_STEPS_KEPT]


SCALED_STEPS_KEPT = 64
NONFINITE_STEPS_KEPT = 8
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _squares_by_device(grads: List[torch.Tensor]) -> List[torch.Tensor]:
    by_device: Dict[torch.device, List[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    return [torch.stack(foreach_norm(gs)).to(torch.float64).square().sum() for gs in by_device.values()]


def _note_step(record: OptimizerRecord, lrs: List[Optional[float]], ratio: Optional[float],
               moved: Optional[float], unchanged: Optional[float]) -> None:
    """One step's lr and measured figures into ``record.history`` (the first steps and the newest kept)."""
    known = [lr for lr in lrs if lr is not None and lr == lr]
    lr = max(known) if known else None
    if lr is not None and lr > record.peak_lr:
        record.peak_lr = lr
    record.history.append([record.steps, lr, ratio, moved or 0.0, unchanged or 0.0])
    head, tail = OptimizerRecord.HISTORY_HEAD, OptimizerRecord.HISTORY_TAIL
    if len(record.history) > head + tail:
        del record.history[head]


def _fold_updates(record: OptimizerRecord, step: PendingStep, names: List[str],
                  params: List[torch.Tensor]) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """Fold one step's sampled figures into ``record``: (sampled elements with a nonzero gradient, those the
    step left unchanged, the whole-step update-to-weight ratio), each None where not measured."""
    if not step.stats:
        return None, None, None
    rows = torch.cat([s.cpu() for s in step.stats]).tolist()
    total_update = total_weight = moved_total = unchanged_total = 0.0
    drift, broken = [], []
    for index, (moved, unchanged, update_sq, weight_sq, made_nonfinite) in zip(step.stepped, rows, strict=False):
        if made_nonfinite:
            broken.append((names[index], int(made_nonfinite)))
        total_update += update_sq
        total_weight += weight_sq
        moved_total += moved
        unchanged_total += unchanged
        if moved == 0:
            if update_sq > 0:
                drift.append(names[index])
            continue  # no sampled element had a gradient: nothing to judge
        name = names[index]
        figures = record.updates.get(name)
        if figures is None:
            figures = record.updates[name] = [0.0, 0.0, 0.0, 0.0, 0.0]
            record.dtypes[name] = str(params[index].dtype).replace("torch.", "")
        figures[0] += 1
        figures[1] += float(unchanged == moved)
        figures[2], figures[3] = update_sq, weight_sq
        if weight_sq > 0:
            figures[4] = max(figures[4], (update_sq / weight_sq) ** 0.5)
    if broken and len(record.nonfinite_steps) < NONFINITE_STEPS_KEPT:
        record.nonfinite_steps.append([record.steps, step.pass_name, [n for n, _ in broken],
                                       sum(c for _, c in broken)])
    ratio = (total_update / total_weight) ** 0.5 if total_weight > 0 else None
    if ratio is not None:
        record.max_ratio = max(record.max_ratio, ratio)
    record.drift = drift
    return moved_total, unchanged_total, ratio
