"""Capture: graph cuts seen op by op (``watch(model, cuts="ops")``).

A ``TorchFunctionMode`` sees every torch op called while the watch is open
(``Tensor.detach``, the ``.data`` getter, ``argmax``, comparisons, casts...).
An op is a *candidate* cut when

  * grad is enabled, one of its tensor inputs requires grad and none of its
    tensor outputs does: ``detach`` (floating output) or ``non_differentiable``
    (integer/bool output);
  * grad is disabled and one of its tensor inputs requires grad: ``no_grad``
    or ``inference_mode``.

A candidate becomes a cut (is recorded in the trace) when what it produced is
used where a gradient was wanted:

  * it flows into an op whose output requires grad (it rejoins a graph:
    ``head(h.detach())``),
  * it reaches ``backward`` / ``torch.autograd.grad``, or
  * it is registered with ``trace.tensor``.

Descendants of a candidate's output carry it along (``one_hot(h.argmax())``
then ``.float()``). So ``losses.append(loss.detach())`` or an accuracy computed
with ``argmax`` for logging is no cut: its result never comes back.

Outside any module forward, only inputs with autograd history (non-leaf
tensors) count: a parameter read outside a forward is bookkeeping (optimizer
steps, EMA, logging). Ops inside a module that was itself called with grad
disabled are left to the module-level detector, which has that call already.
Ops inside a custom ``autograd.Function``'s forward run without grad by design
(the Function brings its own backward): what they make is the Function's
output, which ``Function.apply`` then gives a history, so a carried tensor that
requires grad by the time it is used is dropped, never recorded.

A cut names the innermost watched module whose call is on the Python stack
(``""`` is the root, or no module at all) and the user's line
(``frames.user_location``); whose code a frame runs is ``frames``' one rule.

Cost: the common op (no candidate alive, output requires grad) returns after
one call and two attribute reads. Forward pre-hooks and forward hooks only
track module calls that began with grad disabled. Backward runs outside the
mode (the engine does not carry it into hooks), so gradtrace's own hooks are
never seen; its forward-time work (value statistics of registered tensors,
module hooks) is recognised by its frames.
"""
from __future__ import annotations

import functools
import sys
import threading
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._torch_compat import function_mode_stack, pop_function_mode, push_function_mode, current_autograd_node, \
    saved_tensors
from ..records import NonfiniteOrigin
from .cuts import CutLog
from .frames import GRADTRACE, called_by_gradtrace, first_outside_machinery, innermost_module, kind_of, \
    short_path, user_location
from .hook_state import ModuleHook
from .modules import named_modules

__all__ = ["OpCutMode", "NonfiniteOrigins", "op_name"]

_Tensor = torch.Tensor
_Size = torch.Size
_THIS_FILE = __file__
_dynamo_compiling = torch.compiler.is_dynamo_compiling
is_grad_enabled = torch.is_grad_enabled
is_inference_mode_enabled = torch.is_inference_mode_enabled

# Engine entry points: never cuts themselves; a candidate reaching one is a cut.
_ENGINE = frozenset({torch.autograd.backward, torch.autograd.grad, torch.Tensor.backward})
# Ops whose output is new data that never carries a gradient, by design.
_FRESH = frozenset({
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
    "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "new_empty_strided",
    "requires_grad_", "set_",
})
# Attribute reads that hand out the same data without its history.
_DETACHING_ATTRIBUTES = frozenset({"data"})
_detach_ = torch.Tensor.detach_


def op_name(func) -> str:
    """``detach``, ``argmax``, ``data`` (the attribute), ``log_softmax`` ..."""
    name = getattr(func, "__name__", None) or repr(func)
    if name in ("__get__", "__set__", "__delete__"):
        attribute = getattr(getattr(func, "__self__", None), "__name__", None)
        if attribute is not None:
            return attribute if name == "__get__" else f"{attribute}.{name}"
    return name


def _tensors(value):
    """Tensors in ``value``: itself, or the items of a tuple/list/dict that are tensors."""
    if isinstance(value, _Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, _Tensor):
                yield item
    elif isinstance(value, dict):
        for item in value.values():
            if isinstance(item, _Tensor):
                yield item


def _arguments(args, kwargs):
    """Tensor arguments, including those inside list/tuple arguments that start with a tensor.

    (``torch.cat([a, b])``); a long list of numbers is not walked.
    """
    for values in (args, kwargs.values()) if kwargs else (args,):
        for a in values:
            if isinstance(a, _Tensor):
                yield a
            elif isinstance(a, (list, tuple)) and a and isinstance(a[0], _Tensor):
                for t in a:
                    if isinstance(t, _Tensor):
                        yield t


def _input_grad(args, kwargs) -> int:
    """0: no input requires grad; 1: only leaves (parameters) do; 2: an input with autograd history does."""
    found = _scan(args)
    if found < 2 and kwargs:
        found = max(found, _scan(kwargs.values()))
    return found


def _scan(values) -> int:
    found = 0
    for a in values:  # a plain loop: this runs for every op whose output carries no gradient
        if isinstance(a, _Tensor):
            if a.requires_grad:
                if a.grad_fn is not None:
                    return 2
                found = 1
        elif isinstance(a, (list, tuple)) and a and isinstance(a[0], _Tensor):
            for t in a:
                if isinstance(t, _Tensor) and t.requires_grad:
                    if t.grad_fn is not None:
                        return 2
                    found = 1
    return found


def _output_kind(out) -> Optional[str]:
    """With grad on: None when some output requires grad or none is a tensor; else the cut kind."""
    floating = False
    seen = False
    for t in _tensors(out):
        if t.requires_grad:
            return None
        seen = True
        floating = floating or t.is_floating_point() or t.is_complex()
    if not seen:
        return None
    return "detach" if floating else "non_differentiable"


def _requires_grad(out) -> bool:
    return any(t.requires_grad for t in _tensors(out))


class _Code:
    __slots__ = ("co_filename",)

    def __init__(self, filename: str):
        self.co_filename = filename


class _Place:
    """What ``cuts.user_location`` reads of a frame, kept without keeping the frame (and its locals) alive."""

    __slots__ = ("f_code", "f_lineno", "f_back")

    def __init__(self, location: str):
        filename, _, line = location.rpartition(":")
        self.f_code = _Code(filename or location)
        self.f_lineno = int(line) if line.isdigit() else 0
        self.f_back = None


class _Candidate:
    """An op whose outputs carry no gradient of something trainable; a cut once its result is used."""

    __slots__ = ("kind", "module", "module_type", "params", "site", "op", "place", "recorded")

    def __init__(self, kind, module, module_type, params, site, op, place):
        self.kind = kind
        self.module = module
        self.module_type = module_type
        self.params = params
        self.site = site
        self.op = op
        self.place = place
        self.recorded = False


class _CutMode(TorchFunctionMode):
    def __init__(self, owner: "OpCutMode"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if _dynamo_compiling():
            # True only while torch.compile traces this call: the mode stays out of compiled graphs
            # (recording at trace time would be wrong, and its frame walks would break the graph).
            return func(*args, **kwargs) if kwargs else func(*args)
        owner = self.owner
        if owner.pending:
            return owner.follow(func, args, kwargs or {})
        if func is _detach_:
            return owner.in_place_detach(func, args, kwargs or {})
        out = func(*args, **kwargs) if kwargs else func(*args)
        if isinstance(out, _Tensor):
            if out.requires_grad:  # the common path: a differentiable op
                owner.origins.watch_node(func, out, sys._getframe(1))
                return out
        elif isinstance(out, (tuple, list)) and out and type(out) is not _Size:
            first = out[0]
            if not isinstance(first, _Tensor):
                return out  # numbers
            if first.requires_grad:  # differentiable tensors (split, chunk, max)
                owner.origins.watch_node(func, first, sys._getframe(1))
                return out
        else:
            return out  # None, a number, a Size: no tensor came out
        owner.inspect(func, args, kwargs, out)
        return out


class _Calls(threading.local):
    """The watched module calls that began with grad disabled, running in this thread."""

    def __init__(self):
        self.without_grad: List[nn.Module] = []


class OpCutMode:
    """Op-level cut detection for one watch: a TorchFunctionMode plus module-entry hooks."""

    def __init__(self, root: nn.Module, log: CutLog, names_by_id: Dict[int, str]):
        self.log = log
        self.names_by_id = names_by_id
        self.modules: List[Tuple[str, nn.Module]] = named_modules(root)
        self.module_names: Dict[int, str] = {id(m): name for name, m in self.modules}
        self.calls = _Calls()
        # id(tensor) -> (weak reference, candidate it carries), for tensors still alive
        self.pending: Dict[int, Tuple[weakref.ref, _Candidate]] = {}
        self._trainable: Dict[int, int] = {}
        self.origins = NonfiniteOrigins(log.pass_name, self.module_names)
        self.mode = _CutMode(self)

    # ---- module calls that began without grad ------------------------------
    def attach(self, register: Callable) -> "_Pushed":
        """Register the module hooks with ``register``; return the context that pushes the mode."""
        for _, module in self.modules:
            # ModuleHook: a copy of the model (deepcopy, pickle) gets inert stand-ins, never this mode.
            register(module.register_forward_pre_hook(ModuleHook(self._enter)))
            register(module.register_forward_hook(ModuleHook(self._leave), always_call=True))
        return _Pushed(self)

    def _enter(self, module, args) -> None:
        if not is_grad_enabled():
            self.calls.without_grad.append(module)

    def _leave(self, module, args, output) -> None:
        stack = self.calls.without_grad
        if stack and module in stack:  # `in` compares identity first; modules do not define __eq__
            while stack.pop() is not module:  # a forward raised past calls whose hooks never ran
                pass

    # ---- the op path -------------------------------------------------------
    def inspect(self, func, args, kwargs, out) -> None:
        """An op whose outputs carry no gradient: is it a candidate cut of something trainable?"""
        grad_in = _input_grad(args, kwargs)
        if not grad_in:
            return  # nothing trainable went in: masks, indices, data
        if is_grad_enabled():
            kind = _output_kind(out)
            if kind is None:
                return
        else:
            if _requires_grad(out):
                return  # an in-place op on a tensor that keeps its history
            if self.calls.without_grad:
                return  # inside a module called without grad: the module-level detector has it
            kind = "inference_mode" if is_inference_mode_enabled() else "no_grad"
        candidate = self._candidate(kind, func, grad_in, sys._getframe(1))
        if candidate is not None:
            self._carry(out, candidate)

    def in_place_detach(self, func, args, kwargs):
        grad_in = _input_grad(args, kwargs) if is_grad_enabled() else 0
        out = func(*args, **kwargs)
        if grad_in:
            candidate = self._candidate("detach", func, grad_in, sys._getframe(1))
            if candidate is not None:
                self._carry(out, candidate)
        return out

    def follow(self, func, args, kwargs):
        """The op path while candidates are alive: is one of them used where a gradient was wanted?"""
        pending = self.pending
        carried = None
        for t in _arguments(args, kwargs):
            entry = pending.get(id(t))
            if entry is not None:
                if t.requires_grad:
                    # Made without a gradient, given a history afterwards: a custom autograd Function's
                    # output (its forward runs without grad by design; the Function brings the backward).
                    del pending[id(t)]
                    continue
                carried = entry[1]
                break
        if carried is None:
            if func is _detach_:
                return self.in_place_detach(func, args, kwargs)
            out = func(*args, **kwargs)
            if isinstance(out, (_Tensor, tuple, list)) and type(out) is not _Size:
                differentiable = next((t for t in _tensors(out) if t.requires_grad), None)
                if differentiable is None:
                    self.inspect(func, args, kwargs, out)
                else:
                    self.origins.watch_node(func, differentiable, sys._getframe(1))
            return out
        if func in _ENGINE:
            self._record(carried)  # before the engine raises that nothing requires grad
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if _requires_grad(out):
            self._record(carried)  # it rejoined a graph: the gradient it would have carried is lost
            self.origins.watch_node(func, next(t for t in _tensors(out) if t.requires_grad), sys._getframe(1))
        elif called_by_gradtrace(_op_caller(sys._getframe(1))):
            self._record(carried)  # registered with trace.tensor
        else:
            self._carry(out, carried)
        return out

    # ---- candidates and cuts -------------------------------------------------
    def _candidate(self, kind: str, func, grad_in: int, frame) -> Optional[_Candidate]:
        if func in _ENGINE:
            return None
        name = op_name(func)
        if getattr(func, "__name__", None) == "__get__":
            if name not in _DETACHING_ATTRIBUTES:
                return None  # .grad, .shape, .T ...: attribute reads are not cuts, except .data
        elif name in _FRESH:
            return None
        site = _site_frame(frame)
        if site is None:
            return None  # gradtrace's own work
        module = innermost_module(frame, self.module_names)
        if module is None and grad_in < 2:
            return None  # a parameter read outside any forward: optimizer, EMA, logging
        return _Candidate(kind, self.module_names[id(module)] if module is not None else "",
                          type(module).__name__ if module is not None else "",
                          self._trainable_in(module), (site.f_code, site.f_lineno), name,
                          _Place(user_location(site)))

    def _carry(self, out, candidate: _Candidate) -> None:
        pending = self.pending
        for t in _tensors(out):
            key = id(t)
            if key not in pending:
                pending[key] = (weakref.ref(t, _forget(pending, key)), candidate)

    def _record(self, candidate: _Candidate) -> None:
        if candidate.recorded:
            return
        candidate.recorded = True
        self.log.record(candidate.kind, candidate.module, candidate.module_type, candidate.params,
                        candidate.site, op=candidate.op, frame=candidate.place)

    def _trainable_in(self, module: Optional[nn.Module]) -> int:
        if module is None:
            return len(self.names_by_id)
        count = self._trainable.get(id(module))
        if count is None:
            names_by_id = self.names_by_id
            count = self._trainable[id(module)] = sum(1 for p in module.parameters() if id(p) in names_by_id)
        return count


def _forget(pending: dict, key: int):
    def forget(ref) -> None:
        entry = pending.get(key)
        if entry is not None and entry[0] is ref:
            del pending[key]

    return forget


def _op_caller(frame):
    """The frame that called the op: past this file's own frames (the mode's plumbing)."""
    while frame is not None and frame.f_code.co_filename == _THIS_FILE:
        frame = frame.f_back
    return frame


def _site_frame(frame):
    """The op's site: the first frame outside torch and Python; None when that is gradtrace's own work."""
    site = first_outside_machinery(_op_caller(frame))
    if site is None or kind_of(site.f_code.co_filename) == GRADTRACE:
        return None
    return site


class _Pushed:
    """Pushes the mode on enter; on exit takes exactly it off, whatever sits above it."""

    def __init__(self, owner: OpCutMode):
        self.owner = owner
        self.mode = owner.mode

    def __enter__(self):
        self.mode.__enter__()
        return self.mode

    def __exit__(self, *exc):
        self.owner.pending.clear()
        self.owner.origins.enabled = False
        stack = function_mode_stack()
        if stack and stack[-1] is self.mode:
            self.mode.__exit__(*exc)
            return False
        if not any(m is self.mode for m in stack):
            return False  # already gone
        above = []
        while True:
            top = pop_function_mode()
            if top is self.mode:
                break
            above.append(top)
        for m in reversed(above):
            push_function_mode(m)
        return False


# ---- where a NaN/Inf gradient is born ----------------------------------------------------


class NonfiniteOrigins:
    """Finds the op whose backward first turned finite incoming gradients into NaN/Inf.

    Every differentiable op seen in the forward gets a post-hook on its autograd
    node, carrying the op's name, its module and its line (one frame walk per op,
    no tensor work). In backward the hook reads nothing back (a hook must not
    synchronise): it keeps one device vector per node, a float64 sum of each
    tensor (finite exactly when the tensor is) in three groups: the gradients
    the node produced, the gradients that came in, and the forward values it
    saved (plus its output, if still alive). When the trace is read, one transfer per pass finds the
    first node, in the order backward ran them, that produced a non-finite
    gradient from finite ones.
    """

    LIMIT = 200_000  # node entries kept while the trace is not read; past it the oldest half goes

    def __init__(self, pass_name: Callable[[], Optional[str]], module_names: Dict[int, str]):
        self.pass_name = pass_name
        self.module_names = module_names
        # (pass, info, node name, (produced, incoming) counts, device vector of float64 sums)
        self.flags: List[Tuple[Optional[str], tuple, str, Tuple[int, int], "torch.Tensor"]] = []
        self.enabled = True
        self.forward_values = None  # a forward_values.ForwardValues: op outputs checked for NaN/Inf too

    def watch_node(self, func, out: torch.Tensor, frame) -> None:
        name = getattr(func, "__name__", None)
        # Its backward only moves gradients around: it cannot turn finite ones into NaN/Inf. (Its forward
        # can still overflow, for the forward check below, when it adds up.)
        routing = name in _ROUTING_OPS
        if routing and (self.forward_values is None or name not in _CAN_OVERFLOW):
            return
        node = out.grad_fn
        if node is None:
            return
        site, module = self._place(frame)
        if site is None:
            return  # gradtrace's own work
        info = (op_name(func), module, site.f_code.co_filename, site.f_lineno, weakref.ref(out))
        if self.forward_values is not None:  # forward_values: the op's output checked for NaN/Inf on the device
            self.forward_values.check_op(info, out)
        if routing:
            return
        # The hook must not hold the node (a cycle through C++ that no GC can break): the engine names it.
        node.register_hook(functools.partial(self._on_node, info))

    def _place(self, frame):
        """The op's line (first frame outside torch) and the innermost watched module on the stack."""
        site = _site_frame(frame)
        if site is None:
            return None, ""
        module = innermost_module(frame, self.module_names)
        return site, "" if module is None else self.module_names[id(module)]

    def _on_node(self, info, grad_inputs, grad_outputs) -> None:
        if not self.enabled:
            return  # a graph built inside the watch, run backward after it closed
        produced = [g for g in grad_inputs if g is not None and g.is_floating_point()]
        if not produced:
            return
        if len(self.flags) >= self.LIMIT:  # a watch left open and never read: keep the newest half
            del self.flags[:self.LIMIT // 2]
        node = current_autograd_node()
        forward = [t.detach() for t in saved_tensors(node) if t.is_floating_point()]
        out = info[4]()
        if out is not None:
            forward.append(out.detach())
        incoming = [g for g in grad_outputs if g is not None and g.is_floating_point()]
        device = produced[0].device
        # One float64 sum per tensor (finite exactly when the tensor is: float64 cannot overflow on a
        # float32 sum), stacked into one device vector; the group sizes say which sum is whose.
        sums = torch.stack([t.sum(dtype=torch.float64).to(device) for t in (*produced, *incoming, *forward)])
        self.flags.append((self.pass_name(), info, node.name(), (len(produced), len(incoming)), sums))

    def take(self, pass_name: str) -> Optional[NonfiniteOrigin]:
        """The origin for a finished pass (labelled, or the unlabelled runs so far); forgets their flags."""
        mine = [entry for entry in self.flags if entry[0] in (pass_name, None)]
        self.flags = [entry for entry in self.flags if entry[0] not in (pass_name, None)]
        if not mine:
            return None
        finite = torch.cat([sums.to("cpu") for *_, sums in mine]).isfinite().tolist()  # one read per pass
        start = 0
        for _, info, node_name, (n_produced, n_incoming), sums in mine:
            flags = finite[start:start + len(sums)]
            start += len(sums)
            produced, incoming, forward = (flags[:n_produced], flags[n_produced:n_produced + n_incoming],
                                           flags[n_produced + n_incoming:])
            if not all(produced) and all(incoming):
                return _origin(pass_name, info, node_name, "finite" if all(forward) else "nonfinite")
        return None


# Ops whose backward copies, sums, scatters or masks the incoming gradient (views, shape changes,
# joins, addition): hooking them (a ~10 us RemovableHandle each) could never name an origin.
_ROUTING_OPS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "contiguous", "expand", "expand_as",
    "squeeze", "unsqueeze", "flatten", "unflatten", "__getitem__", "select", "narrow", "split", "chunk",
    "unbind", "cat", "stack", "t", "clone", "add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__",
    "__rsub__", "__isub__", "sub_", "neg", "__neg__", "float", "double", "masked_fill", "masked_fill_",
    "where", "sum", "repeat", "repeat_interleave", "roll", "flip", "tril", "triu", "gather", "index_select",
    "embedding", "pad", "dropout", "detach",
})


# Routing ops whose forward can still overflow (a float16 residual sum past 65504).
_CAN_OVERFLOW = frozenset({"add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__",
                           "__isub__", "sub_", "sum"})


def _origin(pass_name, info, node_name: str, forward: str) -> NonfiniteOrigin:
    op, module, filename, line, _ = info
    return NonfiniteOrigin(op=op, location=f"{short_path(filename)}:{line}", node=node_name, module=module,
                           forward=forward, pass_name=pass_name)
