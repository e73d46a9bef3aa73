"""Distributed wrappers around the watched module: what they mean for the figures and the names.

``watch`` asks once, before registering anything (``distributed_wrapper``):

* DDP (``DistributedDataParallel``): ``.grad`` after ``backward()`` holds the
  all-reduced (averaged) gradient, except inside ``no_sync()``, where it holds
  the local one; names carry a ``module.`` prefix; ``find_unused_parameters``
  declares that ranks may reach different parameters.
* FSDP2 (``fully_shard``): parameters are DTensors, ``.grad`` holds this rank's
  shard after the reduce-scatter. Backward runs through the unsharded copies
  FSDP2 swaps in for the forward: with gradient sync off
  (``set_requires_gradient_sync(False)``) nothing reaches the DTensors, so
  their hooks are put on those copies too (``Fsdp2Copies``).
* FSDP1 (``FullyShardedDataParallel``): names carry ``_fsdp_wrapped_module.``;
  inside ``no_sync()`` ``.grad`` holds the full local (unsharded) gradient.
  Without ``use_orig_params=True`` only FSDP's flat parameters exist, and
  those are the names (``meta.flat_params`` says so).
* DeepSpeed (a ``DeepSpeedEngine``): ``deepspeed_engine.py``.

What a wrapper decides here, for every pass:

* the scope of a ``.backward()`` run as it ends (``backward_scope``);
* whether gradients accumulated without a sync (DDP ``no_sync``, FSDP1
  ``no_sync``, FSDP2 sync off) are still waiting for the next synced backward
  (``unsynced_left``): a synced pass that begins then averages them with its
  own, and its own share cannot be read apart (``passes.Pass`` marks it
  unknown and says why);
* how ``.grad`` is read (``reading_for``): DeepSpeed's own strategy.

Only public torch classes are used here; FSDP internals go through ``_torch_compat``.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .hook_state import ModuleHook, is_plain
from .reading import GradReading, reading_for

# Path components that distributed wrappers insert into parameter names; the
# user's names are what is left (FSDP1 writes them at every wrapped level).
WRAPPER_COMPONENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")

LOCAL, REDUCED, SHARDED = "local", "reduced", "sharded"

# Why a pass's figures are unknown (PassTrace.unknown_because), and what gives exact ones.
ONE_PASS_PER_STEP = ("label the whole accumulation (every microbatch up to and including the synced one) "
                     "one pass, e.g. one pass per optimizer step")
INHERITED = ("when the pass began, .grad held this rank's unsynced gradient from microbatches run without sync "
             "(no_sync) before it, and the sync averaged it with the pass's own: the pass's own share cannot "
             "be read apart; " + ONE_PASS_PER_STEP)
INHERITED_HIDDEN = ("the sync at the end of the pass also reduced the gradients of microbatches run without sync "
                    "before the pass began (FSDP keeps them inside, out of gradtrace's sight): the pass's own "
                    "share cannot be read apart; " + ONE_PASS_PER_STEP)
LOCAL_HIDDEN = ("FSDP2 with gradient sync off (set_requires_gradient_sync(False)) keeps this microbatch's "
                "gradient inside FSDP (unsharded, local) until a synced backward: the parameters' .grad "
                "does not hold it; " + ONE_PASS_PER_STEP)
MIXED_RUNS = ("a backward without sync (no_sync) followed a synced one in this pass: .grad holds an average "
              "plus this rank's own gradient; end the pass with the synced backward")


def is_dtensor(t: torch.Tensor) -> bool:
    if is_plain(t):  # asked per parameter: no import for the plain ones
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _is_ddp(root: Optional[nn.Module]) -> bool:
    return isinstance(root, nn.parallel.DistributedDataParallel)


def _fsdp1_modules(root: Optional[nn.Module]) -> List[nn.Module]:
    # A model wrapped in FSDP1 was wrapped by code that imported it: importing it here for every
    # watch would cost ~1 s (torch.distributed.fsdp pulls in its whole implementation).
    fsdp = sys.modules.get("torch.distributed.fsdp")
    wrapper = getattr(fsdp, "FullyShardedDataParallel", None)
    if root is None or wrapper is None:
        return []
    return [m for m in root.modules() if isinstance(m, wrapper)]


@dataclass
class Wrapper:
    """The wrapper ``watch`` found (``kind`` None: none) and how to read its figures."""

    kind: Optional[str]  # "DDP", "FSDP1", "FSDP2", "DeepSpeed" or None
    root: Optional[nn.Module] = None
    name_prefix: str = ""  # what the wrapper adds in front of every name (DDP: "module.")
    find_unused_parameters: bool = False
    flat_groups: List[Tuple[torch.Tensor, List[Tuple[torch.Tensor, List[int]]]]] = field(default_factory=list)
    flat_only: bool = False  # FSDP1 without use_orig_params: only flat parameters to watch
    fsdp1_units: List[nn.Module] = field(default_factory=list)
    fsdp2_groups: List[Any] = field(default_factory=list)  # FSDP2's parameter groups (_torch_compat)
    outside_shard: set = field(default_factory=set)  # FSDP1: id() of parameters with no element in this shard
    engine: Any = None  # DeepSpeed: a deepspeed_engine.EngineWatch

    def meta(self) -> Dict[str, Any]:
        out = {"wrapper": self.kind, "name_prefix": self.name_prefix,
               "find_unused_parameters": self.find_unused_parameters}
        if self.flat_only:
            out["flat_params"] = True
        if self.engine is not None:
            out["zero_stage"] = self.engine.stage
        return out

    # ---- what a run's figures are -----------------------------------------------------
    def backward_scope(self) -> str:
        """``PassTrace.scope`` of a ``.backward()`` run that ends now."""
        if self.kind == "DDP":
            # Inside no_sync() DDP skips the all-reduce: .grad holds the local gradient.
            return REDUCED if self.root.require_backward_grad_sync else LOCAL
        if self.kind == "FSDP1":
            from .._torch_compat import fsdp1_syncing
            return SHARDED if fsdp1_syncing(self.fsdp1_units) else LOCAL
        if self.kind == "FSDP2":
            from .._torch_compat import fsdp2_syncing
            return SHARDED if fsdp2_syncing(self.fsdp2_groups) else LOCAL
        if self.engine is not None:
            return self.engine.backward_scope()
        return LOCAL

    def syncs(self) -> bool:
        """Does this wrapper ever reduce gradients across ranks (so a local run can precede a synced one)?"""
        return self.kind is not None

    def unsynced_left(self) -> bool:
        """Asked as a pass's first run starts, after a run without sync: does an unsynced accumulation wait?

        DDP (and DeepSpeed ZeRO-0) keep it in ``.grad``: the pass notes ``.grad`` as it found it
        anyway, so True here lets the pass judge per parameter. FSDP1 keeps it in the flat
        parameters' ``.grad``; FSDP2 in its unsharded copies: gone once a ``zero_grad()`` or a
        synced backward took it.
        """
        if self.kind == "FSDP1":
            from .._torch_compat import fsdp1_flat_grads_left
            return fsdp1_flat_grads_left(self.fsdp1_units)
        if self.kind == "FSDP2":
            from .._torch_compat import fsdp2_unsynced_left
            return fsdp2_unsynced_left(self.fsdp2_groups)
        return True

    def hides_unsynced(self) -> bool:
        """Is an earlier unsynced gradient invisible to the pass (not in the watched ``.grad`` it starts from)?

        Then a synced pass that inherits one cannot subtract it: its figures are unknown."""
        return self.kind in ("FSDP1", "FSDP2")

    def holds_none_of(self, param: torch.Tensor) -> bool:
        """After a synced backward, does this rank's shard hold no element of ``param`` (FSDP1: .grad None)?"""
        return self.kind == "FSDP1" and id(param) in self.outside_shard

    def local_figures_hidden(self) -> bool:
        """Does a run without sync leave its gradient outside the watched ``.grad`` (FSDP2's unsharded copies)?"""
        return self.kind == "FSDP2"

    # ---- how figures are read -----------------------------------------------------------
    def reading_for(self, read_at: str) -> GradReading:
        if self.engine is not None:
            return self.engine.reading_for(read_at)
        return reading_for(read_at)

    def shapes(self) -> Dict[int, List[int]]:
        """``{id(parameter): the shape the user's model gives it}``, where the wrapper leaves another in place."""
        if self.engine is not None:
            return self.engine.shapes()
        return {id(p): shape for _, members in self.flat_groups for p, shape in members}

    def allows_hookless(self) -> bool:
        """May ``.backward()`` runs be read without parameter hooks (capture/hookless.py)? Not under a
        wrapper: DDP, FSDP and DeepSpeed write .grad in their own callbacks, after the engine's run ends;
        nor in a process group, where a DDP around the watched module is only found at its first
        forward (``InnerDdp``), after the hooks were taken out."""
        return self.kind is None and self.engine is None and not _in_a_process_group()

    def adopt_ddp(self, ddp: nn.Module) -> None:
        """The watched module turned out to run inside ``ddp``: its all-reduce decides what .grad holds."""
        self.kind, self.root = "DDP", ddp
        self.find_unused_parameters = bool(ddp.find_unused_parameters)

    def attach(self, recorder, stack: contextlib.ExitStack, params: List[torch.Tensor],
               hook_for: Callable[[int], Callable], note: Callable[[torch.Tensor], None], meta=None) -> None:
        """Hooks a wrapper needs beyond the parameters' own, each undone by ``stack``.

        ``hook_for(index)``: the parameter hook of watched parameter ``index``; ``note(tensor)``:
        call before the first hook goes on a tensor (its hook containers are given back on exit);
        ``meta``: the trace's, updated when a wrapper is found later (a DDP around the watched module)."""
        if self.kind is None and self.root is not None and _in_a_process_group():
            finder = InnerDdp(self, meta)
            stack.callback(finder.remove)
            finder.attach()
        if self.kind == "FSDP2":
            copies = Fsdp2Copies(self.root, self.fsdp2_groups, params, hook_for, note)
            stack.callback(copies.remove)
            copies.attach()
        if self.engine is not None:
            self.engine.attach(recorder, stack)


def distributed_wrapper(root: Optional[nn.Module], params: List[torch.Tensor]) -> Wrapper:
    if _is_ddp(root):
        return Wrapper("DDP", root, "module.", bool(root.find_unused_parameters))
    from . import deepspeed_engine  # imports deepspeed only when the user's process already did
    engine = deepspeed_engine.EngineWatch.of(root, params)
    if engine is not None:  # the engine itself (its names start with "module."), or its ZeRO parameters
        return Wrapper("DeepSpeed", root, "module." if engine.engine is root else "", engine=engine)
    units = _fsdp1_modules(root)
    if units:
        from .._torch_compat import fsdp1_flat_params, fsdp1_outside_shard
        groups = fsdp1_flat_params(root)
        return Wrapper("FSDP1", root, flat_groups=groups, flat_only=not groups, fsdp1_units=units,
                       outside_shard=fsdp1_outside_shard(groups))
    if any(is_dtensor(p) for p in params):
        from .._torch_compat import fsdp2_groups
        return Wrapper("FSDP2", root, fsdp2_groups=fsdp2_groups(root) if root is not None else [])
    return Wrapper(None, root)


def _in_a_process_group() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class InnerDdp:
    """Finds the DDP that runs the watched module (``watch(ddp.module)``, Lightning's ``pl_module``), at its
    first forward inside it.

    Nothing on the module says DDP wraps it, and DDP's all-reduce decides what
    ``.grad`` holds: unnoticed, reduced figures would be labelled ``local``.
    DDP names itself while it runs its module's forward; forward pre-hooks on
    the watched module and its children (Lightning's ``training_step`` may call
    the children only) read that, and adopt the wrapper for every run that
    follows. Until then a forward outside DDP (evaluation) changes nothing.
    """

    def __init__(self, wrapper: Wrapper, meta):
        self.wrapper = wrapper
        self.meta = meta
        self.handles: List[Any] = []

    def attach(self) -> None:
        from .._torch_compat import require
        require("ddp_module")
        root = self.wrapper.root
        for module in (root, *root.children()):
            self.handles.append(module.register_forward_pre_hook(ModuleHook(self._before_forward)))

    def _before_forward(self, module: nn.Module, args) -> None:
        from .._torch_compat import active_ddp
        ddp = active_ddp(self.wrapper.root)
        if ddp is not None:
            self.wrapper.adopt_ddp(ddp)
            if self.meta is not None:
                self.meta.update(wrapper="DDP", find_unused_parameters=self.wrapper.find_unused_parameters)
            self.remove()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class Fsdp2Copies:
    """The parameter hooks, also on the unsharded copies FSDP2 makes of its DTensor parameters.

    FSDP2 swaps an unsharded ``nn.Parameter`` into the module for the forward, so
    backward accumulates into that copy; with gradient sync on, FSDP2's
    post-backward writes the DTensor's ``.grad`` (and calls its post-accumulate
    hooks), with sync off nothing reaches the DTensor at all. A hook on the copy
    sees every run, synced or not. The copies exist from the first forward on (and
    stay the same objects): they are hooked when watch begins and after each
    forward of the root, until every one is.
    """

    def __init__(self, root: nn.Module, groups: list, params: List[torch.Tensor],
                 hook_for: Callable[[int], Callable], note: Callable[[torch.Tensor], None]):
        self.root = root
        self.groups = groups
        self.index_of = {id(p): i for i, p in enumerate(params)}
        self.hook_for = hook_for
        self.note = note
        self.hooked: Dict[int, Any] = {}  # id(copy) -> handle
        self.forward_handle = None

    def attach(self) -> None:
        if not self._hook_new_copies():
            self.forward_handle = self.root.register_forward_hook(ModuleHook(self._after_forward))

    def _after_forward(self, *args) -> None:
        if self._hook_new_copies() and self.forward_handle is not None:
            self.forward_handle.remove()
            self.forward_handle = None

    def _hook_new_copies(self) -> bool:
        """Hook the copies that exist now; True once every sharded parameter's copy is hooked."""
        from .._torch_compat import fsdp2_unsharded_copies
        done = True
        for sharded, copy in fsdp2_unsharded_copies(self.groups):
            index = self.index_of.get(id(sharded))
            if index is None:
                continue  # a parameter not watched (frozen, or outside the watched list)
            if copy is None:
                done = False
            elif id(copy) not in self.hooked and copy.requires_grad:
                self.note(copy)
                self.hooked[id(copy)] = copy.register_hook(self.hook_for(index))
        return done

    def remove(self) -> None:
        for handle in self.hooked.values():
            handle.remove()
        self.hooked.clear()
        if self.forward_handle is not None:
            self.forward_handle.remove()
            self.forward_handle = None


def user_name(name: str) -> str:
    """A parameter's name without the components FSDP1 / activation checkpointing / compile insert."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)
