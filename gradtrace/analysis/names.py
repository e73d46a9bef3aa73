"""Parameter and module names: grouping repeated layers for people to read.

A repeated layer is written by which of its members are concerned: ``layers.0``
when one is, ``layers.{0,3}`` when several are, ``layers.*`` only when every
member the model has is (so "layers.*" never hides that only layer 0 was cut).
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

# An index followed by more path: ``blocks.3.attn`` repeats, a final ``body.0`` names a role.
# ASCII digits only: ``\d`` also matches other scripts' digits.
_REPEAT = re.compile(r"(?:(?<=\.)|^)[0-9]+(?=\.)")
_LISTED = 4  # more concerned members than this are written as a count


def module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def in_module(param: str, module: str) -> bool:
    return module == "" or param.startswith(module + ".")


def rollup(name: str) -> str:
    """Collapse repeated layers: ``blocks.3.attn.lora_A`` -> ``blocks.*.attn.lora_A``."""
    return _REPEAT.sub("*", name)


def _indices(name: str) -> Tuple[str, ...]:
    return tuple(m.group(0) for m in _REPEAT.finditer(name))


def _members(names: Iterable[str]) -> Dict[str, List[Set[str]]]:
    """``{rolled-up pattern: [set of indices seen at each repeated position]}``."""
    seen: Dict[str, List[Set[str]]] = {}
    for name in names:
        indices = _indices(name)
        slots = seen.setdefault(rollup(name), [set() for _ in indices])
        for slot, index in zip(slots, indices):
            slot.add(index)
    return seen


def _numeric(index: str) -> Tuple[int, str, str]:
    """Sort key for a decimal index in numeric order, without int(): a name from a trace file can hold
    a 5,000-digit index, past what Python converts."""
    digits = index.lstrip("0")
    return len(digits), digits, index


def _label(pattern: str, concerned: List[Set[str]], existing: Optional[List[Set[str]]]) -> str:
    parts = []
    for here, every in zip(concerned, existing or [None] * len(concerned)):
        ordered = sorted(here, key=_numeric)
        if len(ordered) == 1:
            parts.append(ordered[0])
        elif (every is not None and here >= every) or len(ordered) > _LISTED:
            parts.append("*")
        else:
            parts.append("{" + ",".join(ordered) + "}")
    pieces = iter(parts)
    return re.sub(r"(?:(?<=\.)|^)\*(?=\.|$)", lambda _: next(pieces), pattern)


def group_by_module(params: Iterable[str], universe: Optional[Sequence[str]] = None) -> Dict[str, List[str]]:
    """``{module group: [params]}``, in first-seen order.

    ``universe`` is every parameter the model has: with it a group concerning
    every member is written ``layers.*``, one concerning some ``layers.{0,3}``.
    Without it, several members are written ``layers.{0,3}`` (or ``*`` past a few).
    """
    params = list(params)
    by_pattern: Dict[str, List[str]] = {}
    for p in params:
        by_pattern.setdefault(rollup(module_of(p)), []).append(p)
    existing = _members(module_of(p) for p in universe) if universe is not None else {}
    groups: Dict[str, List[str]] = {}
    for pattern, names in by_pattern.items():
        concerned = _members(module_of(p) for p in names)[pattern]
        label = _label(pattern, concerned, existing.get(pattern)) if concerned else pattern
        groups.setdefault(label or "(root)", []).extend(names)
    return groups


def describe_params(params: Iterable[str], limit: int = 4, universe: Optional[Sequence[str]] = None) -> str:
    groups = group_by_module(sorted(params), universe)
    parts = [f"{display_name(module)} ({len(names)} param{'s' if len(names) != 1 else ''})" for module, names in groups.items()]
    more = f", +{len(parts) - limit} more modules" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


_ADAPTER_NAME = re.compile(r"\.(lora_[A-Za-z_]+|adapter[A-Za-z_]*)\.[^.]+(?=\.weight$|\.bias$|$)")
_WRAPPER_PREFIXES = ("base_model.model.",)


def display_name(name: str) -> str:
    """A parameter or module name as tables show it: peft's wrapper prefix and adapter name dropped.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` reads
    ``model.layers.0.self_attn.q_proj.lora_A.weight``; full names stay in JSON and evidence.
    """
    for prefix in _WRAPPER_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    return _ADAPTER_NAME.sub(lambda m: "." + m.group(1), name)
