"""Every private torch API gradtrace uses, probed in one place.

Private APIs change between torch releases without notice. Each one gradtrace
relies on is a :class:`Probe` here: where it lives (looked up once, when first
needed) and, where only behaviour can tell, a self-test that exercises it the
way gradtrace does (run once, by the first ``watch`` that needs the feature).
The rest of the package imports the result from this module and never reaches
into torch's internals itself. A missing or changed API never degrades into a
silent wrong number: ``require`` (called by ``watch`` before it registers
anything) raises ``GradtraceError`` naming the torch version, the API and what
would not work, and the stand-in left in place of a missing callable raises the
same error if it is ever reached.

Loading and analysing a saved trace uses none of these.
"""
from __future__ import annotations

import operator
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .errors import GradtraceError

__all__ = ["Probe", "PROBES", "TORCH_RANGE", "require", "missing", "saved_tensors", "fsdp1_flat_params",
           "fsdp1_syncing", "fsdp1_flat_grads_left", "fsdp1_outside_shard", "fsdp2_groups", "fsdp2_syncing",
           "fsdp2_unsharded_copies", "fsdp2_unsynced_left", "active_ddp",
           "global_module_hooks_registered"]

# The torch releases the test suite runs on: >= the first, < the second (setup.cfg declares the same;
# a test keeps them equal).
TORCH_RANGE: Tuple[Tuple[int, int], Tuple[int, int]] = ((2, 6), (2, 16))


def _release(version: Tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


TESTED_TORCH = f"{_release(TORCH_RANGE[0])} to {_release((TORCH_RANGE[1][0], TORCH_RANGE[1][1] - 1))}"


@dataclass(frozen=True)
class Probe:
    """One private torch API: where it lives, what gradtrace needs it for, how to tell it still works."""

    name: str  # the dotted path, for messages
    needed_for: str  # what will not work without it
    feature: str  # "capture" (every watch), "ops" (watch(cuts="ops")), "stats" (pass-end statistics),
    # "gather" (trace.gather()), "fsdp1" (watching a FullyShardedDataParallel), "fsdp2" (watching fully_shard
    # modules), "ddp_module" (watching the module inside a DDP under torch.distributed)
    find: Callable[[], Any]  # the object; AttributeError/ImportError when this torch lacks it
    check: Optional[Callable[[Any], None]] = None  # a self-test of the behaviour gradtrace relies on; raises


# ---- self-tests: each exercises one private API exactly as gradtrace uses it ---------------------
# They run once, on the CPU, with grad on, the first time ``require`` asks for their feature.


def _leaf() -> torch.Tensor:
    return torch.zeros(2, device="cpu", requires_grad=True)


def _check_backward_hooks_on_a_leaf(_) -> None:
    """hook_state.HookBatch: a dict assigned to a leaf's ``_backward_hooks`` is called by the engine, and
    assigning None again drops it (hook_state.restore)."""
    leaf, fired = _leaf(), []
    leaf._backward_hooks = OrderedDict([(0, lambda g: fired.append(1))])
    (leaf * 2).sum().backward()
    leaf._backward_hooks = None
    (leaf * 2).sum().backward()
    if fired != [1]:
        raise AssertionError(f"a hook put in a leaf's _backward_hooks fired {len(fired)} times in 2 backwards, "
                             "not once")


def _check_register_hook_dict(_) -> None:
    """hook_state.HookBatch: a non-leaf's hook dict is handed to its grad_fn with ``_register_hook_dict``."""
    inner, fired = _leaf() * 2, []
    inner._backward_hooks = OrderedDict([(0, lambda g: fired.append(1))])
    inner.grad_fn._register_hook_dict(inner)
    inner.sum().backward()
    if fired != [1]:
        raise AssertionError("a hook dict registered on a non-leaf's grad_fn did not fire")


def _check_post_accumulate_container(_) -> None:
    if _leaf()._post_accumulate_grad_hooks is not None:
        raise AssertionError("a new tensor's _post_accumulate_grad_hooks is not None")


def _check_forward_hooks_with_kwargs(_) -> None:
    """hook_state.HookBatch.forward_hook: a module hook put straight into the two dicts gets the kwargs."""
    module, seen = nn.Identity(), []
    module._forward_hooks[-1] = lambda mod, args, kwargs, out: seen.append((args, kwargs))
    module._forward_hooks_with_kwargs[-1] = True
    try:
        module(torch.zeros(1, device="cpu"))
    finally:
        module._forward_hooks.pop(-1, None)
        module._forward_hooks_with_kwargs.pop(-1, None)
    if len(seen) != 1 or seen[0][1] != {}:
        raise AssertionError("a hook put in _forward_hooks/_forward_hooks_with_kwargs was not called with kwargs")


def _global_module_hooks() -> Tuple[dict, dict]:
    from torch.nn.modules import module as module_py

    return module_py._global_forward_hooks, module_py._global_forward_pre_hooks


def _check_global_module_hooks(found) -> None:
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert len(found[0]) > 0, "a registered global forward hook is not in _global_forward_hooks"
    finally:
        handle.remove()


def _check_handle_counter(handle_class) -> None:
    """hook_state.HookBatch takes hook ids from RemovableHandle's class counter, as handles do."""
    first = handle_class.next_id
    handle = handle_class(OrderedDict())
    if not isinstance(first, int) or handle.id != first or handle_class.next_id != first + 1:
        raise AssertionError("RemovableHandle ids no longer come from RemovableHandle.next_id")


def _check_module_containers(_) -> None:
    """modules.named_modules / named_parameters read ``_modules`` and ``_parameters`` directly."""
    model = nn.Sequential(nn.Linear(1, 1, device="cpu"))
    if model._modules.get("0") is not model[0] or model[0]._parameters.get("weight") is not model[0].weight:
        raise AssertionError("Module._modules / Module._parameters no longer hold children and parameters")


def _check_module_call_frames(_) -> None:
    """frames.innermost_module / module_caller: below a forward lies the module's ``_call_impl`` frame
    (``self`` is the module), and every frame between it and the module's caller is in its file."""
    found = []

    class Probing(nn.Module):
        def forward(self, x):
            frame, call, caller = sys._getframe(1), None, None
            while frame is not None:
                if frame.f_code is MODULE_CALL_CODE and frame.f_locals.get("self") is self:
                    call = frame
                if frame.f_code.co_filename != MODULE_CALL_FILE and call is not None and caller is None:
                    caller = frame
                frame = frame.f_back
            found.append((call, caller))
            return x

    here = sys._getframe()
    Probing()(torch.zeros(1, device="cpu"))
    call, caller = found[0]
    if call is None:
        raise AssertionError("no Module._call_impl frame (with the module as `self`) below a forward")
    if caller is not here:
        raise AssertionError("frames between a module's caller and its forward are not all in "
                             "Module._call_impl's file")


def _check_checkpoint_file(_) -> None:
    """frames.checkpoint_on_stack: reentrant checkpointing runs the segment from CheckpointFunction's file."""
    from torch.utils.checkpoint import CheckpointFunction

    seen = []

    def segment(x):
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename != CHECKPOINT_FILE:
            frame = frame.f_back
        seen.append(frame is not None and not torch.is_grad_enabled())
        return x * 2

    # What checkpoint(use_reentrant=True) runs; calling checkpoint() itself would import torch._dynamo (~3 s).
    CheckpointFunction.apply(segment, False, _leaf())
    if seen != [True]:
        raise AssertionError("reentrant checkpointing did not run its segment without grad under "
                             "CheckpointFunction's file")


def _check_function_backward_codes(_) -> None:
    """frames.function_backward_on_stack: a custom Function's backward runs under BackwardCFunction.apply."""
    seen = []

    class Probing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1

        @staticmethod
        def backward(ctx, g):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code not in FUNCTION_BACKWARD_CODES:
                frame = frame.f_back
            seen.append(frame is not None)
            return g

    Probing.apply(_leaf()).sum().backward()
    if seen != [True]:
        raise AssertionError("a custom Function's backward does not run under BackwardCFunction.apply")


def _check_function_outputs_gain_history(_) -> None:
    """opcuts: a custom Function's outputs are the very tensors its forward returned, given a history
    afterwards (how ops inside its forward, run without grad by design, are told from a cut)."""
    made = []

    class Probing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            out = x * x
            made.append((out, out.requires_grad))
            return out

        @staticmethod
        def backward(ctx, g):
            return g

    out = Probing.apply(_leaf())
    if not made or made[0][0] is not out or made[0][1] or not out.requires_grad:
        raise AssertionError("a custom Function's output is not its forward's tensor given a grad_fn")


def _functions_backward_codes() -> frozenset:
    cls = torch.autograd.function.BackwardCFunction
    return frozenset(getattr(cls, name).__code__ for name in ("apply", "apply_boxed") if hasattr(cls, name))


def _fsdp1_sync_flag() -> Optional[bool]:
    """FSDP1's no_sync() flips ``_sync_gradients`` on every unit (an instance attribute: read its code)."""
    import inspect

    from torch.distributed.fsdp import FullyShardedDataParallel
    return True if "_sync_gradients" in inspect.unwrap(FullyShardedDataParallel.no_sync).__code__.co_names else None


def _fsdp2_state_access() -> Optional[Any]:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group
    needed = (hasattr(FSDPModule, "_get_fsdp_state")
              and "reduce_grads" in _fsdp_param_group.FSDPParamGroup.__init__.__code__.co_names
              and hasattr(_fsdp_param.FSDPParam, "sharded_param") is False  # an instance attribute
              and "_unsharded_param" in _fsdp_param.FSDPParam.init_unsharded_param.__code__.co_names)
    return FSDPModule._get_fsdp_state if needed else None


def _ddp_active_module_access() -> Optional[Any]:
    """DDP names itself in a class attribute while it runs its module's forward."""
    ddp = nn.parallel.DistributedDataParallel
    return ddp._get_active_ddp_module if "_active_ddp_module" in vars(ddp) else None


PROBES = (
    Probe("torch.autograd.Variable._execution_engine.queue_callback",
          "closing an engine run when backward finishes", "capture",
          lambda: torch.autograd.Variable._execution_engine.queue_callback),
    Probe("torch._C._current_graph_task_id",
          "telling concurrent and nested engine runs apart", "capture",
          lambda: torch._C._current_graph_task_id),
    Probe("torch._C._current_autograd_node",
          "telling a .backward() run from a torch.autograd.grad run", "capture",
          lambda: torch._C._current_autograd_node),
    Probe("torch._C._will_engine_execute_node",
          "telling a .backward() run from a torch.autograd.grad run", "capture",
          lambda: torch._C._will_engine_execute_node),
    Probe("torch._C._functorch.is_legacy_batchedtensor",
          "torch.autograd.grad(..., is_grads_batched=True): telling batched gradients apart", "capture",
          lambda: torch._C._functorch.is_legacy_batchedtensor),
    Probe("torch.Tensor._cdata",
          "telling a parameter swapped in place (torch.utils.swap_tensors) from the one watch hooked",
          "capture", lambda: torch.Tensor._cdata),
    Probe("torch._C._set_grad_enabled",
          "checking module outputs for NaN/Inf without an autograd node or a detach per check", "capture",
          lambda: torch._C._set_grad_enabled),
    Probe("torch.Tensor._backward_hooks",
          "putting parameter hooks on and taking them off without a RemovableHandle each", "capture",
          lambda: torch.Tensor._backward_hooks, _check_backward_hooks_on_a_leaf),
    Probe("torch.autograd.graph.Node._register_hook_dict",
          "hooks on registered tensors that are not leaves", "capture",
          lambda: (_leaf() * 2).grad_fn._register_hook_dict, _check_register_hook_dict),
    Probe("torch.Tensor._post_accumulate_grad_hooks",
          "leaving no hook container behind on parameters", "capture",
          lambda: torch.Tensor._post_accumulate_grad_hooks, _check_post_accumulate_container),
    Probe("torch.nn.Module._forward_hooks_with_kwargs",
          "module forward hooks that see inputs passed by keyword (cut detection)", "capture",
          lambda: nn.Module()._forward_hooks_with_kwargs, _check_forward_hooks_with_kwargs),
    Probe("torch.nn.modules.module._global_forward_hooks / _global_forward_pre_hooks",
          "seeing module calls through forward wrappers unless global module hooks are registered", "capture",
          _global_module_hooks, _check_global_module_hooks),
    Probe("torch.utils.hooks.RemovableHandle.next_id",
          "hook ids that never collide with the user's", "capture",
          lambda: torch.utils.hooks.RemovableHandle, _check_handle_counter),
    Probe("torch.nn.Module._modules / _parameters",
          "walking deep module trees without recursion", "capture",
          lambda: nn.Module, _check_module_containers),
    Probe("torch.nn.Module._call_impl",
          "finding the module an op ran in and the line that called a module (cut locations)", "capture",
          lambda: nn.Module._call_impl.__code__, _check_module_call_frames),
    Probe("torch.utils.checkpoint.CheckpointFunction",
          "telling reentrant checkpointing from no_grad (GRAPH_CUT kind 'checkpoint')", "capture",
          lambda: __import__("torch.utils.checkpoint", fromlist=["CheckpointFunction"]
                             ).CheckpointFunction.forward.__code__.co_filename,
          _check_checkpoint_file),
    Probe("torch.autograd.function.BackwardCFunction.apply",
          "telling engine runs nested in a custom Function's backward (reentrant checkpointing)", "capture",
          lambda: _functions_backward_codes() or None, _check_function_backward_codes),
    Probe("torch._utils._flatten_dense_tensors",
          "pass-end statistics of small gradients (one fused buffer)", "stats",
          lambda: __import__("torch._utils", fromlist=["_flatten_dense_tensors"])._flatten_dense_tensors),
    Probe("torch._foreach_norm",
          "pass-end statistics of large gradients", "stats",
          lambda: torch._foreach_norm),
    Probe("torch.autograd.Function.apply",
          "cuts='ops': telling a custom Function's forward (no grad by design) from a cut", "ops",
          lambda: torch.autograd.Function.apply, _check_function_outputs_gain_history),
    Probe("torch.overrides._get_current_function_mode_stack",
          "cuts='ops': taking the mode off the stack on exit", "ops",
          lambda: torch.overrides._get_current_function_mode_stack),
    Probe("torch._C._pop_torch_function_stack",
          "cuts='ops': taking the mode off the stack on exit", "ops",
          lambda: torch._C._pop_torch_function_stack),
    Probe("torch._C._push_on_torch_function_stack",
          "cuts='ops': taking the mode off the stack on exit", "ops",
          lambda: torch._C._push_on_torch_function_stack),
    Probe("torch.distributed.distributed_c10d._get_default_store",
          "trace.gather(): every rank naming the ranks that did not call it in time", "gather",
          lambda: __import__("torch.distributed.distributed_c10d",
                             fromlist=["_get_default_store"])._get_default_store),
    Probe("torch.distributed.fsdp.FullyShardedDataParallel._sync_gradients",
          "watch() of a FullyShardedDataParallel module: telling no_sync() (local gradients) from a synced backward",
          "fsdp1", lambda: _fsdp1_sync_flag()),
    Probe("torch.distributed.fsdp.FSDPModule._get_fsdp_state",
          "watch() of a fully_shard module: its unsharded parameter copies and whether gradient sync is on",
          "fsdp2", lambda: _fsdp2_state_access()),
    Probe("torch.nn.parallel.DistributedDataParallel._active_ddp_module",
          "watch() of the module inside a DistributedDataParallel: finding the wrapper (whose all-reduce "
          "decides what .grad holds) from the module's forward", "ddp_module",
          lambda: _ddp_active_module_access()),
    Probe("torch.distributed.fsdp._flat_param.FlatParameter",
          "watch() of a FullyShardedDataParallel module: its flat parameters and the shapes of the originals",
          "fsdp1", lambda: __import__("torch.distributed.fsdp._flat_param", fromlist=["FlatParameter"]).FlatParameter),
)
_BY_NAME = {probe.name: probe for probe in PROBES}

# name -> the object, or None when missing or broken; filled on first use (the FSDP1 lookup alone costs
# ~1 s of imports, and only a watch of an FSDP1 module needs it).
FOUND: Dict[str, Optional[Any]] = {}
BROKEN: Dict[str, str] = {}  # name -> what its self-test saw
_CHECKED: set = set()


def _find(probe: Probe) -> Optional[Any]:
    if probe.name not in FOUND:
        try:
            FOUND[probe.name] = probe.find()
        except (AttributeError, ImportError):
            FOUND[probe.name] = None
    return FOUND[probe.name]


def _works(probe: Probe) -> bool:
    """Found, and its self-test (run once) passed."""
    if _find(probe) is None:
        return False
    if probe.check is not None and probe.name not in _CHECKED:
        _CHECKED.add(probe.name)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                probe.check(FOUND[probe.name])
        except Exception as exc:  # whatever a changed torch raises: the API does not work as gradtrace uses it
            BROKEN[probe.name] = f"{type(exc).__name__}: {exc}"
            FOUND[probe.name] = None
    return FOUND[probe.name] is not None


def missing(features: Iterable[str]) -> list:
    """The probes of ``features`` that this torch lacks or that fail their self-test."""
    wanted = set(features)
    return [p for p in PROBES if p.feature in wanted and not _works(p)]


def _message(probes) -> str:
    lines = "; ".join(f"{p.name} ({p.needed_for}" + (f"; self-test: {BROKEN[p.name]}" if p.name in BROKEN else "")
                      + ")" for p in probes)
    return (f"gradtrace cannot watch gradients on torch {torch.__version__}: it lacks {lines}. "
            f"gradtrace is tested on torch {TESTED_TORCH}; install a tested torch "
            f"(pip install 'torch>={_release(TORCH_RANGE[0])},<{_release(TORCH_RANGE[1])}') "
            f"or a gradtrace release made for this one.")


def require(*features: str) -> None:
    """Raise GradtraceError before anything is registered when a needed private API is missing or broken."""
    absent = missing(features)
    if absent:
        raise GradtraceError(_message(absent))


class _Absent:
    """Stands in for a missing callable: reaching it is an error, never a silent default."""

    def __init__(self, probe: Probe):
        self.probe = probe

    def __call__(self, *args, **kwargs):
        raise GradtraceError(_message([self.probe]))


def _get(name: str) -> Any:
    probe = _BY_NAME[name]
    value = _find(probe)
    return _Absent(probe) if value is None else value


queue_callback = _get("torch.autograd.Variable._execution_engine.queue_callback")
current_graph_task_id = _get("torch._C._current_graph_task_id")
current_autograd_node = _get("torch._C._current_autograd_node")
will_engine_execute_node = _get("torch._C._will_engine_execute_node")
is_batched_grad = _get("torch._C._functorch.is_legacy_batchedtensor")
set_grad_enabled = _get("torch._C._set_grad_enabled")  # a C call: no context-manager object per use
flatten_dense_tensors = _get("torch._utils._flatten_dense_tensors")
foreach_norm = _get("torch._foreach_norm")
function_mode_stack = _get("torch.overrides._get_current_function_mode_stack")
pop_function_mode = _get("torch._C._pop_torch_function_stack")
push_function_mode = _get("torch._C._push_on_torch_function_stack")


def global_module_hooks_registered() -> bool:
    """Are torch's global module forward (pre-)hooks registered now? (Every module call then takes
    ``Module.__call__``'s slow path anyway.)"""
    hooks, pre_hooks = _get("torch.nn.modules.module._global_forward_hooks / _global_forward_pre_hooks")
    return bool(hooks) or bool(pre_hooks)


# Frames the stack walks in capture/frames.py look for (code objects compared with `is`, files with ==).
# A missing one leaves a value no frame matches; require("capture") refuses to watch before that matters.
MODULE_CALL_CODE = _find(_BY_NAME["torch.nn.Module._call_impl"])
MODULE_CALL_FILE = getattr(MODULE_CALL_CODE, "co_filename", "<missing: torch.nn.Module._call_impl>")
CHECKPOINT_FILE = _find(_BY_NAME["torch.utils.checkpoint.CheckpointFunction"]) or "<missing: CheckpointFunction>"
FUNCTION_BACKWARD_CODES = _find(_BY_NAME["torch.autograd.function.BackwardCFunction.apply"]) or frozenset()


_SAVED_NAMES: dict = {}


def tensor_impls(tensors: List[torch.Tensor]) -> List[int]:
    """Each tensor's C++ implementation, as an address (``Tensor._cdata``): ``torch.utils.swap_tensors``
    changes it under the same Python object."""
    return list(map(_CDATA, tensors))


_CDATA = operator.attrgetter("_cdata")


def saved_tensors(node) -> list:
    """The tensors an autograd node saved for its backward (``node._saved_self``, ``_saved_result``...).

    Readable in a node's post-hook, before the engine releases them. Anything
    unreadable (released, or not a tensor) is skipped.
    """
    names = _SAVED_NAMES.get(type(node))
    if names is None:
        names = _SAVED_NAMES[type(node)] = [a for a in dir(type(node)) if a.startswith("_saved_")]
    found = []
    for name in names:
        try:
            value = getattr(node, name)
        except RuntimeError:
            continue
        items = value if isinstance(value, (tuple, list)) else (value,)
        found.extend(t for t in items if isinstance(t, torch.Tensor))
    return found


default_store = _get("torch.distributed.distributed_c10d._get_default_store")


def fsdp1_flat_params(root: nn.Module) -> list:
    """``[(flat_param, [(original parameter, its unsharded shape), ...]), ...]`` of every FSDP1 unit.

    FSDP1 runs backward through the flat parameter, never through the originals
    the user named; after its post-backward the originals' ``.grad`` are views
    of this rank's shard (None where the shard holds none of it).
    """
    require("fsdp1")
    from torch.distributed.fsdp import FullyShardedDataParallel

    groups = []
    for module in root.modules():
        flat = getattr(module, "_flat_param", None) if isinstance(module, FullyShardedDataParallel) else None
        if flat is not None and getattr(flat, "_params", None) is not None:  # use_orig_params=True
            groups.append((flat, [(p, list(shape)) for p, shape in zip(flat._params, flat._shapes, strict=False)]))
    return groups


def fsdp1_syncing(units: list) -> bool:
    """Does FSDP1 reduce-scatter this backward's gradients? (False inside ``no_sync()``.)"""
    require("fsdp1")
    return all(getattr(m, "_sync_gradients", True) for m in units)


def fsdp1_flat_grads_left(units: list) -> bool:
    """Does a flat parameter hold a gradient (after ``no_sync()``: the local accumulation waiting for a sync)?"""
    return any(getattr(m, "_flat_param", None) is not None and m._flat_param.grad is not None for m in units)


def fsdp2_groups(root: nn.Module) -> list:
    """Every FSDP2 parameter group under ``root`` (one per ``fully_shard``-ed module that holds parameters)."""
    require("fsdp2")
    from torch.distributed.fsdp import FSDPModule

    groups = []
    for module in root.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                groups.append(group)
    return groups


def fsdp2_syncing(groups: list) -> bool:
    """Does FSDP2 reduce-scatter this backward's gradients? (False after ``set_requires_gradient_sync(False)``.)"""
    return all(group.reduce_grads for group in groups)


def fsdp2_unsharded_copies(groups: list) -> list:
    """``[(sharded DTensor parameter, its unsharded copy or None before the first forward), ...]``."""
    return [(fsdp_param.sharded_param, getattr(fsdp_param, "_unsharded_param", None))
            for group in groups for fsdp_param in group.fsdp_params]


def fsdp2_unsynced_left(groups: list) -> bool:
    """Does an unsharded copy hold a gradient that no reduce-scatter took yet (sync was off)?"""
    for group in groups:
        for fsdp_param in group.fsdp_params:
            copy = getattr(fsdp_param, "_unsharded_param", None)
            if getattr(fsdp_param, "unsharded_accumulated_grad", None) is not None or (
                    copy is not None and copy.grad is not None):
                return True
    return False


def fsdp1_outside_shard(groups: list) -> set:
    """``{id(original parameter)}`` of those no element of which lies in this rank's shard of its flat
    parameter: after a synced backward their ``.grad`` is None, which says "nothing here", not "cleared"."""
    outside = set()
    for flat, members in groups:
        infos = getattr(flat, "_shard_param_infos", None)
        if infos is not None and len(infos) == len(members):
            outside.update(id(p) for (p, _), info in zip(members, infos, strict=False) if not info.in_shard)
    return outside


def active_ddp(module: nn.Module) -> Optional[nn.Module]:
    """The DistributedDataParallel running ``module``'s forward right now, if it wraps ``module`` (directly,
    or inside another wrapper: Lightning's DDP strategy wraps the LightningModule in one of its own)."""
    ddp = _get("torch.nn.parallel.DistributedDataParallel._active_ddp_module")()
    inner = getattr(ddp, "module", None)
    if inner is None:
        return None
    return ddp if inner is module or any(m is module for m in inner.modules()) else None
