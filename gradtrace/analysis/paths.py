"""Which forward a pass differentiated, and which cuts lie on its path.

A pass records the forwards that ran since the previous pass ended
(``PassTrace.forward_modules``: modules owning trainable parameters that ran with
grad enabled, in forward order; ``forward_carried``: those whose output required
grad). With them a cut is judged on the path of the forward the pass
differentiated, not on every forward the model ran:

* a ``no_grad`` / ``inference_mode`` call of a module explains a parameter's lost
  gradient only when neither the module that owns the parameter nor any module
  between it and the cut ran with grad in the pass (a rollout, a reference forward
  or a reward computed under ``no_grad`` before the loss's own forward is data);
* a parameter-free module that cuts (rotary embeddings' cos/sin are
  non-differentiable by design) explains only parameters upstream of it;
* a module that ran with grad, whose output required grad, and none of whose
  parameters got a gradient, had its output cut (or unused) downstream: that
  module, not one upstream of it, is what was cut, and among several the one
  that ran last is where the cut was made.

Traces without forward facts (``cuts="off"``, or saved by an older gradtrace)
are judged as before: every cut of the pass may explain what it lost.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Set

from ..records import Cut, PassTrace
from .names import in_module, module_of

GRAD_MODE_CUTS = ("no_grad", "inference_mode")
OUTPUT_CUTS = ("detach", "non_differentiable")


def ancestors(module: str) -> List[str]:
    """``a.b.c`` -> ``["a.b.c", "a.b", "a", ""]``: the module and every module that contains it."""
    parts = module.split(".") if module else []
    return [".".join(parts[:depth]) for depth in range(len(parts), -1, -1)]


def ran_with_grad_between(param: str, cut_module: str, ran: Set[str]) -> bool:
    """Did the parameter's owner, or a module between it and ``cut_module`` (inclusive), run with grad?"""
    for module in ancestors(module_of(param)):
        if module in ran:
            return True
        if module == cut_module:
            return False
    return False


def explainable(cut: Cut, params: Iterable[str], p: Optional[PassTrace] = None) -> Set[str]:
    """The parameters among ``params`` whose lost gradient ``cut`` can explain in pass ``p``."""
    params = set(params)
    if cut.op is not None:  # an op whose inputs required grad and whose output does not: what fed it
        return params
    if cut.kind in OUTPUT_CUTS:
        if cut.params == 0 and cut.upstream is not None:
            return params & set(cut.upstream)  # a parameter-free module cuts only what fed it
        return params
    inside = {q for q in params if in_module(q, cut.module)}
    if cut.kind in GRAD_MODE_CUTS and p is not None and p.forward_modules is not None:
        ran = set(p.forward_modules)
        inside = {q for q in inside if not ran_with_grad_between(q, cut.module, ran)}
    return inside


def on_path(cut: Cut, p: PassTrace) -> bool:
    """Could the pass's forward have gone through this cut? (Off the path: a no_grad call of a module
    that also ran with grad in the pass — a rollout, a reference or reward forward.)"""
    if cut.kind not in GRAD_MODE_CUTS or cut.op is not None or p.forward_modules is None:
        return True
    return not any(in_module(m, cut.module) or m == cut.module for m in p.forward_modules)


def carried_unreached(p: PassTrace, lost: Set[str], universe: Sequence[str]) -> Dict[str, List[str]]:
    """``{module: its lost params}``: outermost modules that carried a gradient out in ``p`` yet none of
    whose parameters was reached in ``p``, restricted to modules holding a lost parameter.

    Linear in parameters x nesting depth: only ancestors of a lost parameter can qualify, and a module
    holding a reached parameter is found among the ancestors of the reached ones.
    """
    if p.forward_carried is None or not lost:
        return {}
    carried = set(p.forward_carried)
    by_module: Dict[str, List[str]] = {}
    for q in universe:
        if q in lost:
            for module in ancestors(module_of(q)):
                if module in carried:
                    by_module.setdefault(module, []).append(q)
    if not by_module:
        return {}
    reached_inside = set()
    for q in p.covered:
        reached_inside.update(ancestors(module_of(q)))
    out: Dict[str, List[str]] = {}
    for module in sorted(by_module, key=lambda m: (m.count(".") + bool(m), m)):
        if module in reached_inside or any(in_module(module, outer) for outer in out):
            continue
        out[module] = by_module[module]
    return out


def forward_rank(p: PassTrace) -> Dict[str, int]:
    """Position of each module in the pass's forward order (its latest call)."""
    return {m: i for i, m in enumerate(p.forward_modules or ())}


def bypassed_adapters(p: PassTrace, params: Sequence[str]) -> List[str]:
    """LoRA adapter parameters whose adapter module did not run in ``p`` while the layer holding it did."""
    if p.forward_modules is None:
        return []
    ran = set(p.forward_modules)
    out = []
    for q in params:
        parts = q.split(".")
        at = next((i for i, part in enumerate(parts) if part.startswith(("lora_", "adapter"))), None)
        if at is None:
            continue
        layer = ".".join(parts[:at])
        adapter_modules = [".".join(parts[:k]) for k in range(at + 1, len(parts))]
        if layer in ran and not any(m in ran for m in adapter_modules):
            out.append(q)
    return out
