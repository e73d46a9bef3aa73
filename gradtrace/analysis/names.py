"""Parameter and module names: grouping repeated layers for people to read.

A repeated layer is written by which of its members are concerned: ``layers.0``
when one is, ``layers.{0,3}`` when several are, ``layers.*`` only when every
member the model has is (so "layers.*" never hides that only layer 0 was cut).

Grouping is asked for many times per ``verdicts()`` call (each coverage gap,
unused or zero set is described by module) over the same names: each module
name is parsed once (``_parsed``, a bounded cache of pure functions of strings)
and a model's whole parameter list (the ``universe``) is parsed once per tuple,
so describing k parameters costs O(k), not O(every parameter).
"""
from __future__ import annotations

import functools
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


# Names repeat from call to call (the same model's parameters): parse each once. Bounded, so a
# stream of distinct names (a fuzzer, thousands of loaded traces) cannot grow it without end.
_NAME_CACHE = 1 << 16


@functools.lru_cache(maxsize=_NAME_CACHE)
def _parsed(module: str) -> Tuple[str, Tuple[str, ...]]:
    """``(rolled-up pattern, indices at its repeated positions)`` of a module name."""
    return rollup(module), _indices(module)


@functools.lru_cache(maxsize=_NAME_CACHE)
def _param_pattern(param: str) -> Tuple[str, str]:
    """``(module, rolled-up pattern of the module)`` of a parameter name."""
    module = module_of(param)
    return module, _parsed(module)[0]


def _members(modules: Iterable[str]) -> Dict[str, List[Set[str]]]:
    """``{rolled-up pattern: [set of indices seen at each repeated position]}``."""
    seen: Dict[str, List[Set[str]]] = {}
    for name in modules:
        pattern, indices = _parsed(name)
        slots = seen.get(pattern)
        if slots is None:
            slots = seen[pattern] = [set() for _ in indices]
        for slot, index in zip(slots, indices, strict=False):
            slot.add(index)
    return seen


# The universe (every parameter of a model) is the same tuple call after call: its members are
# computed once per tuple (a few kept; a tuple is immutable, so the entry stays right).
_UNIVERSES: Dict[int, Tuple[Sequence[str], Dict[str, List[Set[str]]]]] = {}
_UNIVERSES_KEPT = 8


def _universe_members(universe: Sequence[str]) -> Dict[str, List[Set[str]]]:
    """``_members`` of every module in ``universe`` (read-only: shared between calls)."""
    if not isinstance(universe, tuple):
        return _members(_param_pattern(p)[0] for p in universe)
    entry = _UNIVERSES.get(id(universe))
    if entry is not None and entry[0] is universe:
        return entry[1]
    members = _members(_param_pattern(p)[0] for p in universe)
    if len(_UNIVERSES) >= _UNIVERSES_KEPT:
        _UNIVERSES.clear()  # one atomic step (threads): the next calls rebuild what they use
    _UNIVERSES[id(universe)] = (universe, members)  # the tuple is held: its id cannot be reused meanwhile
    return members


def _numeric(index: str) -> Tuple[int, str, str]:
    """Sort key for a decimal index in numeric order, without int(): a name from a trace file can hold
    a 5,000-digit index, past what Python converts."""
    digits = index.lstrip("0")
    return len(digits), digits, index


def _label(pattern: str, concerned: List[Set[str]], existing: Optional[List[Set[str]]]) -> str:
    parts = []
    for here, every in zip(concerned, existing or [None] * len(concerned), strict=False):
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
    by_pattern: Dict[str, List[str]] = {}
    for p in params:
        pattern = _param_pattern(p)[1]
        names = by_pattern.get(pattern)
        if names is None:
            by_pattern[pattern] = [p]
        else:
            names.append(p)
    existing = _universe_members(universe) if universe is not None else {}
    groups: Dict[str, List[str]] = {}
    for pattern, names in by_pattern.items():
        concerned = _members(_param_pattern(p)[0] for p in names)[pattern]
        label = _label(pattern, concerned, existing.get(pattern)) if concerned else pattern
        groups.setdefault(label or ROOT, []).extend(names)
    return groups


ROOT = "(root)"  # the group of parameters that belong to the model itself, not to a submodule


def _root_part(names: List[str]) -> str:
    """Parameters of the root module are named themselves: '(root)' says nothing about which."""
    shown = ", ".join(repr(n) for n in names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "")
    return f"{shown} (the model's own parameter{'s' if len(names) != 1 else ''})"


def describe_params(params: Iterable[str], limit: int = 4, universe: Optional[Sequence[str]] = None) -> str:
    return describe_groups(group_by_module(sorted(params), universe), limit)


def describe_groups(groups: Dict[str, List[str]], limit: int = 4) -> str:
    """``describe_params`` of parameters already grouped (``group_by_module`` of them, sorted)."""
    parts = [_root_part(names) if module == ROOT else
             f"{display_name(module)} ({len(names)} param{'s' if len(names) != 1 else ''})"
             for module, names in groups.items()]
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
