"""Every private torch API gradtrace uses, probed once, in one place.

Private APIs change between torch releases without notice. Each one is looked
up here when gradtrace is imported; the rest of the package imports the
result from this module and never reaches into ``torch._C`` itself. A missing
API never degrades into a silent wrong number: ``require`` (called by
``watch`` before it registers anything) raises ``GradtraceError`` naming the
torch version and what would not work, and the stand-in left in place of a
missing callable raises the same error if it is ever reached.

Loading and analysing a saved trace uses none of these.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from .errors import GradtraceError

# The torch releases the test suite runs on (setup.cfg declares the same range).
TESTED_TORCH = "2.13"


@dataclass(frozen=True)
class Probe:
    """One private torch API: where it lives and what gradtrace needs it for."""

    name: str  # the dotted path, for messages
    needed_for: str  # what will not work without it
    feature: str  # "capture" (every watch), "ops" (watch(cuts="ops")), "stats" (pass-end statistics),
    # "gather" (trace.gather()), "fsdp1" (watching a FullyShardedDataParallel), "fsdp2" (watching fully_shard modules),
    # "ddp_module" (watching the module inside a DDP under torch.distributed)
    find: Callable[[], Any]


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
    Probe("torch._utils._flatten_dense_tensors",
          "pass-end statistics of small gradients (one fused buffer)", "stats",
          lambda: __import__("torch._utils", fromlist=["_flatten_dense_tensors"])._flatten_dense_tensors),
    Probe("torch._foreach_norm",
          "pass-end statistics of large gradients", "stats",
          lambda: torch._foreach_norm),
    Probe("torch.nn.Module._call_impl",
          "cuts='ops': finding the module an op ran in", "ops",
          lambda: nn.Module._call_impl.__code__),
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


def _find(probe: Probe) -> Optional[Any]:
    try:
        return probe.find()
    except (AttributeError, ImportError):
        return None


FOUND: Dict[str, Optional[Any]] = {probe.name: _find(probe) for probe in PROBES}


def missing(features: Iterable[str]) -> list:
    """The probes of ``features`` that this torch does not have."""
    wanted = set(features)
    return [p for p in PROBES if p.feature in wanted and FOUND[p.name] is None]


def _message(probes) -> str:
    lines = "; ".join(f"{p.name} ({p.needed_for})" for p in probes)
    return (f"gradtrace cannot watch gradients on torch {torch.__version__}: it lacks {lines}. "
            f"gradtrace is tested on torch {TESTED_TORCH}; install a tested torch "
            f"(pip install 'torch=={TESTED_TORCH}.*') or a gradtrace release made for this one.")


def require(*features: str) -> None:
    """Raise GradtraceError before anything is registered when a needed private API is missing."""
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
    value = FOUND[name]
    if value is None:
        return _Absent(next(p for p in PROBES if p.name == name))
    return value


queue_callback = _get("torch.autograd.Variable._execution_engine.queue_callback")
current_graph_task_id = _get("torch._C._current_graph_task_id")
current_autograd_node = _get("torch._C._current_autograd_node")
will_engine_execute_node = _get("torch._C._will_engine_execute_node")
is_batched_grad = _get("torch._C._functorch.is_legacy_batchedtensor")
flatten_dense_tensors = _get("torch._utils._flatten_dense_tensors")
foreach_norm = _get("torch._foreach_norm")
MODULE_CALL_CODE = _get("torch.nn.Module._call_impl")  # a code object: compared with `is` against frames
function_mode_stack = _get("torch.overrides._get_current_function_mode_stack")
pop_function_mode = _get("torch._C._pop_torch_function_stack")
push_function_mode = _get("torch._C._push_on_torch_function_stack")


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
            groups.append((flat, [(p, list(shape)) for p, shape in zip(flat._params, flat._shapes)]))
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
            outside.update(id(p) for (p, _), info in zip(members, infos) if not info.in_shard)
    return outside


def active_ddp(module: nn.Module) -> Optional[nn.Module]:
    """The DistributedDataParallel running ``module``'s forward right now, if ``module`` is the one it wraps."""
    ddp = _get("torch.nn.parallel.DistributedDataParallel._active_ddp_module")()
    return ddp if ddp is not None and getattr(ddp, "module", None) is module else None
