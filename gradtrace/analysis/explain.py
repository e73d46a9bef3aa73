"""Ranking by explanation: a verdict that explains another comes first, and the effect points to it.

The checks each find one kind of fact. Several facts of one step are often
one story: an advantage tensor that is all zero in step 3 *is why* backward
reached ``S`` with an all-zero gradient in step 3; an unused parameter *is
why* DDP failed with "Expected to have finished reduction"; a cut *is why* a
pass reached nothing. ``link`` finds such pairs with the rules below (same
pass, or the same parameters, tensor or optimizer), and ``order`` sorts the
verdicts so that each cause comes before its effects, the cause taking the
severity of the most severe effect it explains, and each effect's message
ends by naming its cause. Without any link the order is the registry's:
severity, then rank (root causes before symptoms).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set

from ..records import Verdict
from .registry import REGISTRY, SEVERITY_RANK, sort_key


def subject_passes(v: Verdict) -> Set[str]:
    """The passes a verdict is about (empty: the whole watch)."""
    e = v.evidence if isinstance(v.evidence, dict) else {}
    found = set()
    for key in ("pass", "a", "b"):
        if isinstance(e.get(key), str):
            found.add(e[key])
    for name in e.get("passes") or ():
        if isinstance(name, str):
            found.add(name)
    return found


def subject_params(v: Verdict) -> Set[str]:
    e = v.evidence if isinstance(v.evidence, dict) else {}
    found: Set[str] = set()
    for key in ("parameters", "lost", "only_a", "only_b", "adapters"):
        found.update(n for n in e.get(key) or () if isinstance(n, str))
    return found


def identity(v: Verdict) -> tuple:
    """What a finding is about, whatever its counts: print a finding once per identity.

    (code, severity, and the tensor, module, cut location, optimizer or parameters it names.)
    """
    e = v.evidence if isinstance(v.evidence, dict) else {}
    for key in ("tensor", "module", "location", "optimizer"):
        if isinstance(e.get(key), str) and e.get(key) != "":
            return v.code, v.severity, key, e[key]
    params = subject_params(v)
    if params:
        return v.code, v.severity, "parameters", tuple(sorted(params))
    return v.code, v.severity, "message", v.message


def _same_pass(cause: Verdict, effect: Verdict) -> bool:
    a, b = subject_passes(cause), subject_passes(effect)
    return not a or not b or bool(a & b)


def _shares_params(cause: Verdict, effect: Verdict) -> bool:
    a, b = subject_params(cause), subject_params(effect)
    return bool(a & b)


def _error_text(v: Verdict) -> str:
    e = v.evidence if isinstance(v.evidence, dict) else {}
    return e.get("error") if isinstance(e.get("error"), str) else ""


def _all_zero_grads(v: Verdict) -> bool:
    return v.code != "ZERO_GRADS" or bool(v.evidence.get("all"))


def _value_fact(v: Verdict) -> bool:
    """A registered tensor's values (not a gradient): a mask, advantages, rewards."""
    return v.code in ("ALL_ZERO_VALUES", "EMPTY_ROWS", "CONSTANT_ROWS") or (
        v.code == "NONFINITE" and bool(v.evidence.get("values")))


def _explains(cause: Verdict, effect: Verdict) -> bool:
    c, e = cause.code, effect.code
    if cause is effect:
        return False
    # 1. A tensor's values explain gradients that vanish or blow up in the same pass; rewards (or any data
    # tensor) with zero variance in every group explain all-zero advantages (not a mask) in the same pass.
    if c == "CONSTANT_ROWS" and e == "ALL_ZERO_VALUES" and cause.severity == "error":
        return (cause.evidence.get("tensor") != effect.evidence.get("tensor") and not effect.evidence.get("mask")
                and _same_pass(cause, effect))
    if _value_fact(cause) and cause.severity == "error":
        if e in ("ZERO_UPSTREAM", "TINY_GRADS") or (e == "ZERO_GRADS" and _all_zero_grads(effect)):
            return _same_pass(cause, effect)
        if e == "NONFINITE" and not _value_fact(effect):
            return _same_pass(cause, effect)
        return False
    # An optimizer step that made the weights NaN/Inf explains every NaN/Inf gradient after it.
    if c == "NONFINITE" and cause.evidence.get("updates") and e == "NONFINITE" and not effect.evidence.get("updates") \
            and not _value_fact(effect):
        return True
    # 2. A cut, a module whose output was cut, a freeze: coverage lost in the same pass / parameters.
    # A registered tensor that requires grad, with trainable parameters upstream, never reached: the cut
    # lies between it and the loss, so what lost its gradient upstream of it is the effect.
    if c == "TENSOR_NOT_REACHED" and e in ("DETACHED_OUTPUT", "NO_COVERAGE", "UNUSED_PARAMS", "COVERAGE_GAP"):
        upstream = set(cause.evidence.get("upstream") or ())
        return bool(upstream) and _same_pass(cause, effect) and (
            e == "NO_COVERAGE" or bool(upstream & subject_params(effect)))
    if c in ("GRAPH_CUT", "DETACHED_OUTPUT", "FROZEN_WHILE_WATCHED"):
        if e in ("NO_COVERAGE", "TENSOR_NOT_REACHED"):
            if c == "DETACHED_OUTPUT" and e == "TENSOR_NOT_REACHED":
                return False  # the tensor requires grad: it is downstream of the module, the cut after it
            return _same_pass(cause, effect) and (c != "DETACHED_OUTPUT" or subject_passes(cause) & subject_passes(effect)
                                                  or _shares_params(cause, effect))
        if e in ("COVERAGE_GAP", "UNUSED_PARAMS") or (c == "GRAPH_CUT" and e == "DETACHED_OUTPUT"):
            return _shares_params(cause, effect)
    if c == "TENSOR_NO_GRAD" and e in ("NO_COVERAGE", "TENSOR_NOT_REACHED") and "module" not in effect.evidence \
            and "adapters" not in effect.evidence and "kind" in cause.evidence:
        return _same_pass(cause, effect)
    # A data tensor that does not require grad because nothing trained: NO_COVERAGE's cause explains it.
    # (Where both name the same cut they agree, and neither explains the other.)
    if c == "NO_COVERAGE" and e == "TENSOR_NO_GRAD" and not effect.evidence.get("requires_grad_calls") \
            and ("module" in cause.evidence or "adapters" in cause.evidence) \
            and ("cut" not in effect.evidence or effect.evidence.get("cut") != cause.evidence.get("cut")):
        return _same_pass(cause, effect)
    # 3. A failed backward, explained by what made it fail.
    if e == "PASS_FAILED":
        error = _error_text(effect)
        if "finished reduction" in error:
            return c in ("UNUSED_PARAMS", "DETACHED_OUTPUT", "GRAPH_CUT", "RANK_DIVERGENCE", "FROZEN_WHILE_WATCHED")
        if "does not require grad" in error:
            named = c == "NO_COVERAGE" and any(k in cause.evidence for k in ("module", "adapters", "kind"))
            return (named or c in ("GRAPH_CUT", "TENSOR_NO_GRAD", "DETACHED_OUTPUT", "FROZEN_WHILE_WATCHED")) \
                and _same_pass(cause, effect)
        return False
    # 4. What the optimizer saw.
    if c == "NOT_IN_OPTIMIZER" and e == "STALE_GRADS":
        return _shares_params(cause, effect)
    if c == "CLIP_BEFORE_UNSCALE" and e == "TINY_UPDATES":
        return cause.evidence.get("optimizer") == effect.evidence.get("optimizer")
    # float32 weights that did not move under a tiny (not zero) learning rate: the lr is the cause.
    if c == "TINY_UPDATES" and e == "WEIGHTS_UNCHANGED":
        return cause.evidence.get("optimizer") == effect.evidence.get("optimizer") \
            and not effect.evidence.get("low_precision") and not effect.evidence.get("lr_zero")
    return False


def link(found: List[Verdict]) -> Dict[int, List[int]]:
    """``{effect index: [cause indices]}`` over ``found``, without cycles."""
    causes: Dict[int, List[int]] = {}

    def reaches(start: int, target: int) -> bool:  # does ``start`` already (transitively) explain ``target``?
        stack, seen = [target], set()
        while stack:
            node = stack.pop()
            if node == start:
                return True
            if node in seen:
                continue
            seen.add(node)
            stack.extend(causes.get(node, ()))
        return False

    for i, cause in enumerate(found):
        for j, effect in enumerate(found):
            if i != j and _explains(cause, effect) and not reaches(j, i):
                causes.setdefault(j, []).append(i)
    return causes


def order(found: List[Verdict]) -> List[Verdict]:
    """Causes before the effects they explain; otherwise severity, then rank."""
    found = sorted(found, key=sort_key)
    causes = link(found)
    worst: Dict[int, int] = {}
    for effect, its_causes in causes.items():
        for c in its_causes:
            worst[c] = min(worst.get(c, 9), SEVERITY_RANK[found[effect].severity])
    # A cause is as serious as the worst effect it explains (where its code allows that severity).
    for c, rank in worst.items():
        v = found[c]
        severity = next(s for s, r in SEVERITY_RANK.items() if r == rank)
        if rank < SEVERITY_RANK[v.severity] and severity in REGISTRY[v.code].severities:
            found[c] = Verdict(v.code, severity, v.message, v.evidence)
    for effect, its_causes in causes.items():
        v = found[effect]
        named = ", ".join(dict.fromkeys(found[c].code for c in its_causes))
        found[effect] = Verdict(v.code, v.severity, f"{v.message} (caused by {named} above)",
                                {**v.evidence, "explained_by": [found[c].code for c in its_causes]})
    placed: List[int] = []
    done: Set[int] = set()

    def place(i: int, path: Optional[Set[int]] = None) -> None:
        if i in done:
            return
        path = (path or set()) | {i}
        for c in sorted(causes.get(i, ()), key=lambda k: sort_key(found[k])):
            if c not in path:
                place(c, path)
        done.add(i)
        placed.append(i)

    for i in sorted(range(len(found)), key=lambda k: (sort_key(found[k]), k)):
        place(i)
    return [found[i] for i in placed]
