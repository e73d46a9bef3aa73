"""Distributed wrappers around the watched module: what they mean for the figures and the names.

``watch`` asks once, before registering anything:

* DDP (``DistributedDataParallel``): ``.grad`` after ``backward()`` holds the
  all-reduced (averaged) gradient, except inside ``no_sync()``, where it holds
  the local one; names carry a ``module.`` prefix; ``find_unused_parameters``
  declares that ranks may reach different parameters.
* FSDP2 (``fully_shard``): parameters are DTensors, ``.grad`` holds this rank's
  shard after the reduce-scatter.
* FSDP1 (``FullyShardedDataParallel``): names carry ``_fsdp_wrapped_module.``.

Only public torch classes are used here.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .hook_state import is_plain

# Path components that distributed wrappers insert into parameter names; the
# user's names are what is left (FSDP1 writes them at every wrapped level).
WRAPPER_COMPONENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


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


def _is_fsdp1(root: Optional[nn.Module]) -> bool:
    # A model wrapped in FSDP1 was wrapped by code that imported it: importing it here for every
    # watch would cost ~1 s (torch.distributed.fsdp pulls in its whole implementation).
    fsdp = sys.modules.get("torch.distributed.fsdp")
    wrapper = getattr(fsdp, "FullyShardedDataParallel", None)
    return root is not None and wrapper is not None and any(isinstance(m, wrapper) for m in root.modules())


@dataclass
class Wrapper:
    """The wrapper ``watch`` found (``kind`` None: none) and how to read its figures."""

    kind: Optional[str]  # "DDP", "FSDP1", "FSDP2" or None
    root: Optional[nn.Module] = None
    name_prefix: str = ""  # what the wrapper adds in front of every name (DDP: "module.")
    find_unused_parameters: bool = False
    flat_groups: List[Tuple[torch.Tensor, List[Tuple[torch.Tensor, List[int]]]]] = field(default_factory=list)

    def meta(self) -> Dict[str, Any]:
        return {"wrapper": self.kind, "name_prefix": self.name_prefix,
                "find_unused_parameters": self.find_unused_parameters}

    def backward_scope(self) -> str:
        """``PassTrace.scope`` of a ``.backward()`` run that ends now."""
        if self.kind == "DDP":
            # Inside no_sync() DDP skips the all-reduce: .grad holds the local gradient.
            return "reduced" if self.root.require_backward_grad_sync else "local"
        if self.kind in ("FSDP1", "FSDP2"):
            return "sharded"
        return "local"


def distributed_wrapper(root: Optional[nn.Module], params: List[torch.Tensor]) -> Wrapper:
    if _is_ddp(root):
        return Wrapper("DDP", root, "module.", bool(root.find_unused_parameters))
    if _is_fsdp1(root):
        from .._torch_compat import fsdp1_flat_params
        return Wrapper("FSDP1", root, flat_groups=fsdp1_flat_params(root))
    if any(is_dtensor(p) for p in params):
        return Wrapper("FSDP2", root)
    return Wrapper(None, root)


def fsdp1_shapes(wrapper: Wrapper) -> Dict[int, List[int]]:
    """``{id(original parameter): unsharded shape}``: FSDP1 leaves a 1-D slice of the shard in its place."""
    return {id(p): shape for _, members in wrapper.flat_groups for p, shape in members}


def user_name(name: str) -> str:
    """A parameter's name without the components FSDP1 / activation checkpointing / compile insert."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)
