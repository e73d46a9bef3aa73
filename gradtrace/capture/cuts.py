"""Capture: where the autograd graph was cut, judged at every module call (seen through ``module_calls``).

A module call is a cut when
  * it ran with grad disabled while it holds trainable parameters or received
    inputs that require grad (``no_grad``, ``inference_mode``, or ``checkpoint``
    when reentrant checkpointing ran it), or
  * it ran with grad enabled, its inputs or parameters require grad, and none
    of its outputs do (``detach`` for floating outputs, ``non_differentiable``
    for integer/bool ones).

Cuts are judged on inputs passed by keyword too (transformers passes
``hidden_states`` that way). An adapter that is simply not called (peft's
``disable_adapter``) is not a cut: its hook never fires.

The common case (grad on, output requires grad) returns after two attribute
reads; the stack is only walked the first time a given cut is seen, and every
walk is ``frames``' (the one frame rule). Each call made with grad also has its
output checked for NaN/Inf (``forward_values``), from the same wrapper or hook.
"""
from __future__ import annotations

import itertools
import sys
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..records import Cut
from . import module_calls
from .frames import checkpoint_caller, checkpoint_on_stack, locations, module_caller
from .modules import named_modules, named_parameters
from .reach import reachable_params

__all__ = ["CutLog", "ModuleCutDetector", "ModuleSite", "trainable_counts", "any_requires_grad"]

is_grad_enabled = torch.is_grad_enabled
Tensor = torch.Tensor
is_inference_mode_enabled = torch.is_inference_mode_enabled
_dynamo_compiling = torch.compiler.is_dynamo_compiling


def _top_level_tensors(value: Any) -> List[torch.Tensor]:
    """The tensors a forward returned: the output itself, or the items of a tuple, list or dict (a ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return [item for item in items if isinstance(item, torch.Tensor)]


def any_requires_grad(value: Any) -> Optional[bool]:
    """Whether any tensor in ``value`` requires grad; None when it holds no tensor (shallow)."""
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, (tuple, list)):
        items: Iterable = value
    elif isinstance(value, dict):
        items = value.values()
    else:
        return None
    found = None
    for item in items:
        if isinstance(item, torch.Tensor):
            if item.requires_grad:
                return True
            found = False
    return found


def _floating_output(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() or value.is_complex()
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return any(isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) for t in items)


class CutLog:
    """The cuts of one trace, de-duplicated by (module, kind, op, pass, call site), and the forward calls.

    Forward calls are told apart by a clock shared with the cuts: each forward of a
    module that owns trainable parameters, run with grad enabled, stamps the module
    with the clock's next tick (negative when its output did not require grad). A
    cut and a forward can then be ordered: a ``no_grad`` call of a module that later
    ran with grad, in the same pass, is not what the pass differentiated.
    """

    def __init__(self, pass_name: Callable[[], Optional[str]]):
        self.by_seq: Dict[int, Cut] = {}  # in order of recording
        self.index: Dict[Tuple, int] = {}  # dedup key -> seq
        self.pass_name = pass_name
        self.tick = itertools.count(1).__next__  # the clock: cut sightings and forward calls
        self.last_event: Dict[int, int] = {}  # seq -> tick of its latest sighting
        self.next_seq = 0
        self.key_of: Dict[int, Tuple] = {}
        self.by_pass: Dict[Optional[str], List[int]] = {}  # seqs recorded inside each pass
        self.root_calls = 0  # forward calls of the watched model itself
        self.compiled = False  # torch.compile traced the watched model (its backward is one compiled node)
        # module path -> tick of its latest forward with grad enabled (negated when its output
        # did not require grad). Only modules that own trainable parameters are stamped.
        self.grad_forwards: Dict[str, int] = {}
        # This forward's trainable module outputs that required grad (id of a single-tensor output -> module),
        # cleared at each end of the watched model's forward, and the modules whose output the model returned
        # as is: an output the loss then ignores (an auxiliary head) is unused, not cut.
        self.outputs_by_id: Dict[int, str] = {}
        self.returned: Dict[str, None] = {}
        self.window_start = 0  # tick at which the current pass window began (see take_window)
        self.window_outside: Dict[int, None] = {}  # cuts seen outside any pass since then (seq, in order)

    @property
    def cuts(self) -> list:
        return list(self.by_seq.values())

    @property
    def events(self) -> int:
        """A mark: every cut sighting and forward call after it has a larger tick."""
        return self.tick()

    @property
    def ran_with_grad(self) -> set:
        """Modules that ran with grad and gave an output that requires grad (in their latest call)."""
        return {name for name, tick in self.grad_forwards.items() if tick > 0}

    def take_window(self) -> Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[int, ...]]:
        """The forwards of the pass that just finished: those since the previous pass finished.

        (modules that ran with grad enabled, in forward order; those whose output required grad;
        cuts seen outside any pass in that time, by seq). A pass's forwards usually run before it
        (an unlabelled backward) or inside it (a label).
        """
        start = self.window_start
        self.window_start = self.tick()
        stamped = sorted((abs(tick), name) for name, tick in self.grad_forwards.items() if abs(tick) > start)
        ran = tuple(name for _, name in stamped)
        carried = tuple(name for name in ran if self.grad_forwards[name] > 0)
        outside, self.window_outside = tuple(self.window_outside), {}
        return ran, carried, outside

    def ran_with_grad_after(self, seq: int) -> bool:
        """Did the cut's module run again with grad enabled after this cut was last seen?"""
        cut = self.by_seq.get(seq)
        if cut is None or cut.op is not None:
            return False
        return abs(self.grad_forwards.get(cut.module, 0)) > self.last_event.get(seq, 0)

    def record(self, kind: str, module: str, module_type: str, params: int,
               site: Tuple, op: Optional[str] = None, frame=None, inputs_require_grad: Optional[bool] = None,
               upstream: Optional[Callable[[], List[str]]] = None,
               passes_input: Optional[Callable[[], bool]] = None) -> None:
        """Note a cut; ``upstream`` / ``passes_input`` are asked only the first time its site is seen."""
        pass_name = self.pass_name()
        key = (module, kind, op, pass_name, site)
        tick = self.tick()
        seq = self.index.get(key)
        if seq is not None:
            self.by_seq[seq].count += 1
            self.last_event[seq] = tick
            if pass_name is None:
                self.window_outside[seq] = None
            return
        seq = self.next_seq
        self.next_seq += 1
        user, library = locations(frame)
        self.by_seq[seq] = Cut(kind=kind, module=module, op=op, location=user, library_location=library,
                               inputs_require_grad=inputs_require_grad, pass_name=pass_name,
                               module_type=module_type, params=params, seq=seq,
                               upstream=upstream() if callable(upstream) else upstream,
                               passes_input=passes_input() if callable(passes_input) else passes_input)
        self.index[key] = seq
        self.key_of[seq] = key
        self.by_pass.setdefault(pass_name, []).append(seq)
        self.last_event[seq] = tick
        if pass_name is None:
            self.window_outside[seq] = None

    def since(self, event: int) -> list:
        """Seqs of cuts seen after the mark ``event``, in the order of their latest sighting."""
        return [seq for seq, last in sorted(self.last_event.items(), key=lambda item: item[1]) if last > event]

    def drop_pass(self, name: str) -> List[int]:
        """Forget the cuts recorded inside pass ``name`` (max_passes dropped it); their seqs."""
        gone = self.by_pass.pop(name, [])
        for seq in gone:
            del self.by_seq[seq]
            self.last_event.pop(seq, None)
            self.index.pop(self.key_of.pop(seq), None)
        return gone


def trainable_counts(root: nn.Module, modules: List[Tuple[str, nn.Module]],
                     trainable: Optional[Iterable[str]] = None) -> Dict[str, int]:
    """Trainable parameters inside each module path, in one pass over the modules.

    (Asking every module for its ``parameters()`` walks each subtree again, and
    building every prefix of every parameter's path is cubic in the nesting
    depth: a 3,000-deep model took minutes.) Each module's own count is added to
    its parent's, children first: the reverse of ``named_modules``' pre-order.
    """
    counts: Dict[str, int] = {}
    if trainable is None:  # the names of the trainable parameters, unless the caller has them
        trainable = [name for name, p in named_parameters(root, modules) if p.requires_grad]
    for name in trainable:
        owner = name.rpartition(".")[0]
        counts[owner] = counts.get(owner, 0) + 1
    for path in reversed([name for name, _ in modules]):
        if path and counts.get(path):
            parent = path.rpartition(".")[0]
            counts[parent] = counts.get(parent, 0) + counts[path]
    return counts


class ModuleCutDetector:
    """Sees every call of every module of the watched model (``module_calls``) and judges it (``ModuleSite``)."""

    def __init__(self, root: nn.Module, log: CutLog, modules: Optional[List[Tuple[str, nn.Module]]] = None,
                 trainable: Optional[Iterable[str]] = None, names_by_id: Optional[Dict[int, str]] = None,
                 forward: Optional[Any] = None, forward_values=None, hooks_only: bool = False):
        self.log = log
        self.names_by_id = names_by_id or {}  # watched parameters: what a parameter-free cut has upstream
        # The watched model's forward (hookless.ForwardOutputs): told when a trainable module runs with
        # grad outside it, which a hookless reading of the backward would not see.
        self.forward = forward
        self.forward_values = forward_values  # a forward_values.ForwardValues, or None
        self.regions = module_calls.Regions()
        self.modules = []
        self.names = {}  # id(module) -> (path, module)
        self.trainable = {}  # id(module) -> trainable parameters inside it
        self.sites: List["ModuleSite"] = []
        self.wrapped_root: Optional["ModuleSite"] = None  # the root's site, when a wrapper sees its calls
        modules = named_modules(root) if modules is None else modules  # a walk already made
        # hooks_only (cuts="ops"): the op mode's own hooks put every module call on the slow path anyway,
        # and under torch.compile a forward wrapper is compiled apart from the module call, which then
        # stays on the stack around the compiled kernels, whose ops the mode would take for cuts.
        self.use_hooks = hooks_only or module_calls.needs_hooks(root, modules)
        counts = trainable_counts(root, modules, trainable)
        for name, module in modules:
            self.modules.append((name, module, counts.get(name, 0)))
            self.names[id(module)] = (name, module)
            self.trainable[id(module)] = counts.get(name, 0)

    def attach(self, hooks) -> None:
        """Watch every module's calls (``hooks``: a ``hook_state.HookBatch``, which also takes them off);
        ``retire`` when the watch ends."""
        for name, module, trainable in self.modules:
            site = ModuleSite(self, name, module, trainable)
            self.sites.append(site)
            if module_calls.observe(hooks, module, site, self.use_hooks) and site.root:
                self.wrapped_root = site

    def retire(self) -> None:
        """The watch ended: a wrapper left inside a ``forward`` the user replaced (or on a copy) records nothing."""
        for site in self.sites:
            site.retire()
        self.sites = []
        self.wrapped_root = None


class ModuleSite:
    """One module's call, judged: the stamp of a forward with grad, and the cuts (see the module docstring).

    Called by the module's ``forward`` wrapper or forward hook (``module_calls``). The
    common case (grad on, a tensor out that requires grad) is inlined in the wrapper:
    a stamp, nothing else.
    """

    __slots__ = ("detector", "log", "name", "module_type", "trainable", "root", "stamps", "tick", "outside",
                 "outputs", "regions", "check_values", "around", "live")

    def __init__(self, detector: ModuleCutDetector, name: str, module: nn.Module, trainable: int):
        self.detector = detector
        self.log = detector.log
        self.name = name
        self.module_type = type(module).__name__
        self.trainable = trainable
        self.root = not name
        # Modules that own trainable parameters are stamped on every forward with grad (a dict
        # store and a counter: tens of ns); parameter-free modules are not.
        self.stamps = self.log.grad_forwards if trainable else None
        self.tick = self.log.tick
        # The watched forward (hookless reading): told of a trainable module run with grad outside it...
        self.outside = detector.forward if trainable and name else None
        # ... and, at the root, the forward itself (its depth, and its outputs).
        self.outputs = detector.forward if not name else None
        self.regions: Optional[module_calls.Regions] = detector.regions
        # forward_values: NaN/Inf flags of each output made with grad, kept on the device
        # (capture/forward_values.py); called as check_values(module, args, kwargs, output).
        forward_values = detector.forward_values
        self.check_values = forward_values.for_module(name, module) if forward_values is not None else None
        # At the root, seen through its wrapper: (begin, end) called around each call, in place of forward
        # pre- and always-called hooks that would send the model's call down Module.__call__'s slow path.
        self.around = None
        self.live = True

    def retire(self) -> None:
        self.live = False
        self.stamps = self.outside = self.outputs = self.regions = self.check_values = self.around = None

    # ---- the judgments ----------------------------------------------------------------------------
    def after_grad(self, args, kwargs, output) -> None:
        """A call that ran with grad enabled: stamped; a cut when its inputs require grad and its output does not."""
        if not self.live:
            return
        name, stamps = self.name, self.stamps
        if output.__class__ is Tensor:
            differentiable = output.requires_grad
        else:
            differentiable = any_requires_grad(output)
            if differentiable is None:  # no tensor output at all
                return
        if differentiable:
            if stamps is not None:
                stamps[name] = self.tick()
                if output.__class__ is Tensor:
                    self.log.outputs_by_id[id(output)] = name
                outside = self.outside
                if outside is not None and not outside.depth:
                    outside.ran_outside()
            return
        if stamps is not None:
            stamps[name] = -self.tick()  # ran with grad; its output carries none
        # Judged on inputs, not parameters: an adapter that is simply not
        # used (peft's disable_adapter) leaves trainable parameters idle
        # without cutting anything.
        if not _inputs_require_grad(args, kwargs):
            return
        kind = "detach" if _floating_output(output) else "non_differentiable"
        self._record(kind, args, kwargs, None, output)

    def after_no_grad(self, args, kwargs, output) -> None:
        """A call with grad disabled (a region's root, or any call of a second thread)."""
        if not self.live or (not self.trainable and not _inputs_require_grad(args, kwargs)):
            return
        inference = is_inference_mode_enabled()
        segment = None if inference else checkpoint_on_stack(sys._getframe(1))
        if segment is not None:
            checkpointed = self.detector.names.get(id(segment.f_locals.get("self")))
            if checkpointed is not None:  # one cut for the checkpointed module, not one per child
                path, module = checkpointed
                self.log.record("checkpoint", path, type(module).__name__, self.detector.trainable[id(module)],
                                ("checkpoint", path), frame=checkpoint_caller(segment),
                                inputs_require_grad=_segment_inputs_require_grad(segment))
                return
        kind = "inference_mode" if inference else "checkpoint" if segment is not None else "no_grad"
        self._record(kind, args, kwargs, segment, output)

    def after_root(self, output) -> None:
        """A call of the watched model itself ended."""
        if not self.live:
            return
        log = self.log
        log.root_calls += 1  # "forwards were seen" even when no backward ever ran
        if log.outputs_by_id:
            for tensor in _top_level_tensors(output):
                module = log.outputs_by_id.get(id(tensor))  # alive, so its id is no dead output's
                if module is not None and tensor.requires_grad:
                    log.returned[module] = None
            log.outputs_by_id.clear()
        if self.outputs is not None:
            self.outputs.mark(output)

    def _record(self, kind: str, args, kwargs, segment, output) -> None:
        # A checkpointed function's children are located at the checkpoint(...) call, not inside it.
        # (module_caller steps over Module.__call__ and gradtrace's own frames: the wrapper, this site.)
        caller = checkpoint_caller(segment) if kind == "checkpoint" else module_caller(sys._getframe(1))
        site = (caller.f_code, caller.f_lineno) if caller is not None else None
        inputs = _segment_inputs_require_grad(segment) if kind == "checkpoint" else None
        # A parameter-free module that cuts (rotary embeddings' cos/sin are non-differentiable by
        # design) can only explain parameters upstream of it: which ones is asked once per site.
        names_by_id = self.detector.names_by_id
        upstream = (lambda: _upstream_params(args, kwargs, names_by_id)) \
            if not self.trainable and kind in ("detach", "non_differentiable") else None
        # ... and one that hands a grad-carrying input back detached is a real cut (Cut.passes_input).
        passes_input = (lambda: _passes_input_through(args, kwargs, output)) \
            if not self.trainable and kind == "detach" else None
        self.log.record(kind, self.name, self.module_type, self.trainable, site, frame=caller,
                        inputs_require_grad=inputs, upstream=upstream, passes_input=passes_input)

    # ---- as a forward hook (module_calls.observe's other way) ------------------------------------------
    def hook(self, module, args, kwargs, output) -> None:
        if self.root and self.outputs is not None:
            self.outputs.depth -= 1  # counted in by the pre-hook; this hook is always called
        if _dynamo_compiling():  # torch.compile is tracing: nothing to record at trace time (as the wrappers)
            if self.root and self.outputs is not None:
                module_calls.compiled_call(self)
            return
        if is_grad_enabled():
            check_values = self.check_values
            if check_values is not None and output is not None:  # (None: the root's forward raised)
                check_values(module, args, kwargs, output)
            self.after_grad(args, kwargs, output)
        else:
            regions = self.regions
            if regions is None or regions.thread != threading.get_ident():  # (a region's root records it)
                self.after_no_grad(args, kwargs, output)
        if self.root and output is not None:
            self.after_root(output)


def _upstream_params(args, kwargs, names_by_id: Dict[int, str]) -> List[str]:
    """Watched parameters the inputs that require grad were computed from (a walk of their graphs)."""
    found: set = set()
    values = list(args) + list((kwargs or {}).values())
    for value in values:
        items = value if isinstance(value, (tuple, list)) else value.values() if isinstance(value, dict) else (value,)
        for item in items:
            if isinstance(item, torch.Tensor) and item.requires_grad:
                found |= reachable_params(item, names_by_id)[0]
    return sorted(found)


def _passes_input_through(args, kwargs, output) -> bool:
    """Does an output share storage with an input that requires grad? (``x.detach()`` and ``x.data`` do;
    fresh data computed from an input's shape or dtype, like rotary cos/sin, does not.)"""
    inputs = {t.untyped_storage().data_ptr() for t in _shallow_tensors((args, kwargs)) if t.requires_grad}
    return any(t.untyped_storage().data_ptr() in inputs for t in _shallow_tensors((output,)))


def _shallow_tensors(values) -> List[torch.Tensor]:
    """Tensors in ``values`` and one level into their tuples, lists and dicts."""
    found = []
    for value in values:
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif isinstance(item, (tuple, list)):
                found.extend(t for t in item if isinstance(t, torch.Tensor))
            elif isinstance(item, dict):
                found.extend(t for t in item.values() if isinstance(t, torch.Tensor))
    return found


def _segment_inputs_require_grad(segment) -> bool:
    """Did any tensor the checkpointed callable was given require grad? (Without one, reentrant
    checkpointing gives the segment's parameters no gradient at all.)"""
    owner = segment.f_locals.get("self")
    values = [v for k, v in segment.f_locals.items() if v is not owner]
    return bool(any_requires_grad(values)) or any(bool(any_requires_grad(v)) for v in values
                                                  if isinstance(v, (tuple, list, dict)))


def _inputs_require_grad(args, kwargs) -> bool:
    if any_requires_grad(args):
        return True
    return bool(kwargs) and bool(any_requires_grad(kwargs))
