"""How the cut detector sees every call of a watched module: an instance ``forward`` wrapper.

A forward hook sends ``Module.__call__`` down its slow path (building hook lists,
a closure per call): 2-5 us per module call on a 2-core CPU, before the hook does
anything; a chain of 1,000 small layers paid more for that than for everything
else gradtrace does. An instance attribute ``module.forward`` keeps the fast path:
``__call__`` calls it as it would the class's ``forward``, for about 0.5 us. The
wrapper is a ``functools.partial`` of a module-level function over (site, module),
so it is cheap to call and survives the ways a model is copied:

* ``copy.deepcopy(model)`` copies the partial with its module argument rebound
  to the copy (the site, deep-copied as itself, still records into this watch:
  what copied forward hooks did);
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

import functools
import threading
from typing import Optional

import torch
from torch import nn

from .hook_state import HookBatch

is_grad_enabled = torch.is_grad_enabled
get_ident = threading.get_ident
Tensor = torch.Tensor


class Regions:
    """The thread whose ``no_grad`` region is open (None: none)."""

    __slots__ = ("thread",)

    def __init__(self) -> None:
        self.thread: Optional[int] = None


def observe(batch: HookBatch, module: nn.Module, site, use_hooks: bool) -> None:
    """Make ``site`` see every call of ``module``: a ``forward`` wrapper, or forward hooks (``use_hooks``)."""
    if not use_hooks and not module._forward_hooks and not module._forward_pre_hooks:
        previous = module.__dict__.get("forward")
        if previous is None:
            wrapper = functools.partial(_class_forward_root if site.root else _class_forward, site, module)
            wrapper.__wrapped__ = module.forward  # what inspect.signature follows
        else:
            wrapper = functools.partial(_instance_forward_root if site.root else _instance_forward,
                                        site, previous, module)
            wrapper.__wrapped__ = previous
        if batch.forward_wrapper(module, wrapper):
            return
    if site.root and site.outputs is not None:
        batch.forward_pre_hook(module, site.outputs.pre_hook())
    batch.forward_hook(module, site.hook, always_call=site.root and site.outputs is not None)


def needs_hooks(root: nn.Module, modules) -> bool:
    """Must every module of this model be seen through forward hooks (see the module docstring)?"""
    from torch.nn.modules import module as module_py

    if module_py._global_forward_hooks or module_py._global_forward_pre_hooks:
        return True
    return any(isinstance(m, nn.DataParallel) or getattr(m, "_is_replica", False) for _, m in modules)


# ---- the wrappers (module-level functions: a partial of one deep-copies with its module) ------------------
#
# The parameter holding the module is named ``self``: reentrant checkpointing of a module's ``forward``
# finds the checkpointed module in that frame's ``self`` (cuts.checkpoint_on_stack), as it would in the
# class's forward.


def _class_forward(site, self, *args, **kwargs):
    if is_grad_enabled():
        out = self.__class__.forward(self, *args, **kwargs)
        if out.__class__ is Tensor and out.requires_grad:  # the common case, inlined
            stamps = site.stamps
            if stamps is not None:
                stamps[site.name] = site.tick()
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
    if is_grad_enabled():
        out = previous(*args, **kwargs)
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
    return _root_call(site, functools.partial(_class_forward, site, self), args, kwargs)


def _instance_forward_root(site, previous, self, *args, **kwargs):
    return _root_call(site, functools.partial(_instance_forward, site, previous, self), args, kwargs)


def _root_call(site, call, args, kwargs):
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


