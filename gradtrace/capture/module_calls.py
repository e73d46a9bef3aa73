"""How the cut detector sees every call of a watched module: an instance ``forward`` wrapper.

A forward hook sends ``Module.__call__`` down its slow path (building hook lists,
a closure per call): 2-5 us per module call on a 2-core CPU, before the hook does
anything; a chain of 1,000 small layers paid more for that than for everything
else gradtrace does. An instance attribute ``module.forward`` keeps the fast path:
``__call__`` calls it as it would the class's ``forward``, for about 0.5 us. The
wrapper is a ``functools.partial`` of a module-level function over (site, module),
so it is cheap to call and survives the ways a model is copied:

* ``copy.deepcopy(model)``, ``pickle`` and ``torch.save(model)`` inside a watch
  give the copy a :class:`LeftBehindForward` instead (as ``hook_state.ModuleHook``
  gives copied hooks a ``LeftBehind``): it holds nothing of the trace, records
  nothing, and takes itself out of the copy at its first call;
* ``inspect.signature(module.forward)`` follows ``__wrapped__`` to the forward it
  replaced (transformers and TRL read forward signatures);
* a module whose ``forward`` was already an instance attribute is wrapped on top
  of it, and gets it back at exit; one the user replaced during the watch keeps
  the replacement, and the wrapper inside it turns inert (``ModuleSite.retire``).

Forward hooks are used instead where the wrapper would change what is seen or
done: a module that already has forward hooks (they run after ``forward``, and a
hook the user registered before the watch ran before gradtrace's: it may detach
the output, which must be seen), global forward hooks (every call takes the slow
path anyway), a model holding ``nn.DataParallel`` (its replicas share their
originals' ``__dict__``: a wrapper would run the original module), a module that
refuses the attribute (TorchScript).

``no_grad`` regions (issue 23): a module entered with grad disabled is the root of
a region for the duration of its call; its descendants' wrappers, called with grad
still disabled in the same thread, only call through (no judging, no stack walk),
and the cut is recorded at the region's root, which is where the analysis reports
it anyway (the outermost module). A descendant called with grad re-enabled inside
the region (``torch.enable_grad()``) is judged as always. One region at a time: a
second thread entering a module without grad is judged call by call, as before.
"""
from __future__ import annotations

import copy
import functools
import threading
from typing import Optional

import torch
from torch import nn

from .._torch_compat import global_module_hooks_registered
from .hook_state import HookBatch

is_grad_enabled = torch.is_grad_enabled
# True only while torch.compile traces: the wrappers then only call through (as opcuts' mode steps aside):
# recording at trace time would be wrong, and tracing the judging and checks breaks the graph.
_dynamo_compiling = torch.compiler.is_dynamo_compiling
get_ident = threading.get_ident
Tensor = torch.Tensor


class Regions:
    """The thread whose ``no_grad`` region is open (None: none)."""

    __slots__ = ("thread",)

    def __init__(self) -> None:
        self.thread: Optional[int] = None


class ForwardWrapper(functools.partial):
    """gradtrace's ``module.forward``: a partial over (site, [the forward it wraps,] module).

    A copy of the module (deepcopy, pickle, torch.save) gets a :class:`LeftBehindForward`
    in its place: copying the site would copy the trace, and it would record the copy's
    calls as the watched model's.
    """

    __slots__ = ()

    def _parts(self):
        module = self.args[-1]
        previous = self.args[1] if len(self.args) == 3 else None
        return module, previous

    def __reduce__(self):
        return LeftBehindForward, self._parts()

    def __copy__(self) -> "LeftBehindForward":
        return LeftBehindForward(*self._parts())

    def __deepcopy__(self, memo) -> "LeftBehindForward":
        module, previous = self._parts()
        return LeftBehindForward(copy.deepcopy(module, memo), copy.deepcopy(previous, memo))


class LeftBehindForward:
    """What a copied module holds where gradtrace's forward wrapper was: at its first call it puts
    back the forward the wrapper stood over (the class's, or an instance forward) and calls it."""

    __slots__ = ("module", "previous", "__weakref__")

    def __init__(self, module: nn.Module, previous=None):
        self.module = module
        self.previous = previous

    @property
    def __wrapped__(self):  # what inspect.signature follows, as on the wrapper
        return self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)

    def __reduce__(self):
        return LeftBehindForward, (self.module, self.previous)

    def __call__(self, *args, **kwargs):
        module, previous = self.module, self.previous
        if module.__dict__.get("forward") is self:
            if previous is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = previous
        return (previous if previous is not None else type(module).forward.__get__(module))(*args, **kwargs)


def observe(batch: HookBatch, module: nn.Module, site, use_hooks: bool) -> bool:
    """Make ``site`` see every call of ``module``: a ``forward`` wrapper (True), or forward hooks (False;
    ``use_hooks``)."""
    if not use_hooks and not module._forward_hooks and not module._forward_pre_hooks:
        previous = module.__dict__.get("forward")
        if previous is None:
            wrapper = ForwardWrapper(_class_forward_root if site.root else _class_forward, site, module)
            wrapper.__wrapped__ = module.forward  # what inspect.signature follows
        else:
            wrapper = ForwardWrapper(_instance_forward_root if site.root else _instance_forward,
                                     site, previous, module)
            wrapper.__wrapped__ = previous
        if batch.forward_wrapper(module, wrapper):
            return True
    if site.root and site.outputs is not None:
        batch.forward_pre_hook(module, site.outputs.pre_hook())
    batch.forward_hook(module, site.hook, always_call=site.root and site.outputs is not None)
    return False


def needs_hooks(root: nn.Module, modules) -> bool:
    """Must every module of this model be seen through forward hooks (see the module docstring)?"""
    if global_module_hooks_registered():
        return True
    return any(isinstance(m, nn.DataParallel) or getattr(m, "_is_replica", False) for _, m in modules)


# ---- the wrappers (module-level functions: a partial of one deep-copies with its module) ------------------
#
# The parameter holding the module is named ``self``: reentrant checkpointing of a module's ``forward``
# finds the checkpointed module in that frame's ``self`` (frames.checkpoint_on_stack), as it would in the
# class's forward.


def _class_forward(site, self, *args, **kwargs):
    if _dynamo_compiling():
        return self.__class__.forward(self, *args, **kwargs)
    if is_grad_enabled():
        out = self.__class__.forward(self, *args, **kwargs)
        check_values = site.check_values  # forward_values' NaN/Inf flags (capture/forward_values.py)
        if check_values is not None:
            check_values(self, args, kwargs, out)
        if out.__class__ is Tensor and out.requires_grad:  # the common case, inlined
            stamps = site.stamps
            if stamps is not None:
                stamps[site.name] = site.tick()
                site.log.outputs_by_id[id(out)] = site.name  # was it returned by the model? (cuts.ModuleSite)
                outside = site.outside
                if outside is not None and not outside.depth:
                    outside.ran_outside()
            return out
        site.after_grad(args, kwargs, out)
        return out
    regions = site.regions
    if regions is not None and regions.thread == get_ident():  # inside this thread's region: call through
        return self.__class__.forward(self, *args, **kwargs)
    return _no_grad_call(site, functools.partial(self.__class__.forward, self), args, kwargs)


def _instance_forward(site, previous, self, *args, **kwargs):
    if _dynamo_compiling():
        return previous(*args, **kwargs)
    if is_grad_enabled():
        out = previous(*args, **kwargs)
        check_values = site.check_values
        if check_values is not None:
            check_values(self, args, kwargs, out)
        site.after_grad(args, kwargs, out)
        return out
    return _no_grad_call(site, previous, args, kwargs)


def _no_grad_call(site, forward, args, kwargs):
    regions = site.regions
    if regions is None:  # retired: the watch is over
        return forward(*args, **kwargs)
    me = get_ident()
    if regions.thread == me:  # inside this thread's region: its root records the cut
        return forward(*args, **kwargs)
    if regions.thread is not None:  # another thread's region: judged call by call
        out = forward(*args, **kwargs)
        site.after_no_grad(args, kwargs, out)
        return out
    regions.thread = me
    try:
        out = forward(*args, **kwargs)
    finally:
        regions.thread = None
    site.after_no_grad(args, kwargs, out)
    return out


def _class_forward_root(site, self, *args, **kwargs):
    return _root_call(site, self, functools.partial(_class_forward, site, self), args, kwargs)


def _instance_forward_root(site, previous, self, *args, **kwargs):
    return _root_call(site, self, functools.partial(_instance_forward, site, previous, self), args, kwargs)


def _root_call(site, module, call, args, kwargs):
    if _dynamo_compiling():
        if site.outputs is not None:
            compiled_call(site)
        return call(*args, **kwargs)
    around = site.around  # what the watched model's own forward hooks would do (unregistered.py's begin/end)
    if around is None:
        return _root_body(site, call, args, kwargs)
    begin, end = around
    begin(module, args)
    out = None
    try:
        out = _root_body(site, call, args, kwargs)
    finally:
        end(module, args, out)  # always called, as the always-called forward hook it stands for
    return out


_COMPILED_CALL = None  # _compiled_model_called behind torch.compiler.disable, made at the first compile


def compiled_call(site) -> None:
    """Called while torch.compile traces the watched model: its compiled code calls none of the wrappers
    (no output marked for hookless reading, no trainable module stamped), so every call of the compiled
    model puts the parameter hooks back in for the backward to come. (Made lazily: torch.compiler.disable
    imports dynamo, seconds, which only a compile has already paid for; the call is one graph break.)"""
    global _COMPILED_CALL
    if _COMPILED_CALL is None:
        _COMPILED_CALL = torch.compiler.disable(_compiled_model_called)
    _COMPILED_CALL(site)


def _compiled_model_called(site) -> None:
    site.log.compiled = True
    outputs = site.outputs
    if outputs is not None:
        outputs.ran_outside()  # hooks back in (hookless.HooklessRuns.relearn)


def _root_body(site, call, args, kwargs):
    outputs = site.outputs
    if outputs is None:
        out = call(*args, **kwargs)
    else:
        outputs.depth += 1  # a trainable module run with grad while depth is 0 ran outside this forward
        try:
            out = call(*args, **kwargs)
        finally:
            outputs.depth -= 1
    site.after_root(out)
    return out


