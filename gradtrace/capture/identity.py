"""Are the watched parameters still the tensors ``watch`` hooked?

Hooks live on a tensor. A parameter replaced while watched is no longer it, and
what happens to the new one is invisible to gradtrace:

* ``replaced``: another object in the module's slot (``m[0].weight =
  nn.Parameter(...)``, ``load_state_dict(assign=True)``); an optimizer built
  before still holds the old one;
* ``swapped``: the same Python object with another tensor inside
  (``torch.utils.swap_tensors``, which ``.to()`` / ``.double()`` use under
  ``torch.__future__.set_swap_module_params_on_conversion(True)``): the hooks
  stayed with the old implementation.

Checked in C-level loops when the live trace is judged or saved and at exit, never in a hook.
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Tuple

import torch

from .._torch_compat import tensor_impls

REPLACED, SWAPPED = "replaced", "swapped"

# (the dict that holds the parameter: its module's ``_parameters``, its key there)
Slot = Tuple[Dict[str, Optional[torch.Tensor]], str]


class ParamIdentity:
    """Each watched parameter's slot and implementation as ``watch`` found them."""

    def __init__(self, params: List[torch.Tensor], slots: Optional[List[Slot]] = None):
        self.params = params
        self.impls = tensor_impls(params)
        # The slots as two parallel lists: compared with C-level map() calls, no Python frame per parameter.
        self.holders = [holder for holder, _ in slots] if slots is not None else None
        self.keys = [key for _, key in slots] if slots is not None else None
        self.found: Dict[int, str] = {}  # index -> REPLACED / SWAPPED; once seen, kept

    @classmethod
    def of(cls, named: List[Tuple[str, torch.Tensor]], walk, wrapper_kind: Optional[str]) -> Optional["ParamIdentity"]:
        """For ``watch``: None under FSDP, which moves its parameters in and out of their modules itself."""
        if wrapper_kind in ("FSDP1", "FSDP2"):
            return None
        params = [p for _, p in named]
        return cls(params, parameter_slots(walk, params) if walk else None)

    def changed(self) -> Dict[int, str]:
        """Every parameter replaced or swapped so far, by index."""
        if self.holders is not None:
            now_held = list(map(dict.get, self.holders, self.keys))
            if not all(map(operator.is_, now_held, self.params)):
                replaced = [i for i, (h, p) in enumerate(zip(now_held, self.params, strict=False)) if h is not p]
                self._note(REPLACED, replaced)
        now = tensor_impls(self.params)
        if now != self.impls:
            self._note(SWAPPED, [i for i, (a, b) in enumerate(zip(now, self.impls, strict=False)) if a != b])
        return self.found

    def _note(self, how: str, indices: List[int]) -> None:
        for i in indices:
            self.found.setdefault(i, how)


def parameter_slots(walk, params: List[torch.Tensor]) -> Optional[List[Slot]]:
    """Where each of ``params`` sits in the module tree ``walk`` (its first place); None if one has none."""
    where: Dict[int, Slot] = {}
    for _, module in walk:
        for key, p in module._parameters.items():
            if p is not None and id(p) not in where:
                where[id(p)] = (module._parameters, key)
    slots = [where.get(id(p)) for p in params]
    return None if any(s is None for s in slots) else slots
