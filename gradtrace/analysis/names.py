"""Parameter and module names: grouping repeated layers for people to read."""
from __future__ import annotations

import re
from typing import Dict, Iterable, List


def module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def in_module(param: str, module: str) -> bool:
    return module == "" or param.startswith(module + ".")


def rollup(name: str) -> str:
    """Collapse repeated layers: ``blocks.3.attn.lora_A`` -> ``blocks.*.attn.lora_A``.

    Only indices followed by more path are collapsed: a final index (``body.0``,
    the first layer of a Sequential) names a role, not a repeat.
    """
    return re.sub(r"(?:(?<=\.)|^)\d+(?=\.)", "*", name)


def group_by_module(params: Iterable[str]) -> Dict[str, List[str]]:
    """``{rolled-up module: [params]}``, in first-seen order."""
    groups: Dict[str, List[str]] = {}
    for p in params:
        groups.setdefault(rollup(module_of(p)) or "(root)", []).append(p)
    return groups


def describe_params(params: Iterable[str], limit: int = 4) -> str:
    groups = group_by_module(sorted(params))
    parts = [f"{module} ({len(names)} param{'s' if len(names) != 1 else ''})" for module, names in groups.items()]
    more = f", +{len(parts) - limit} more modules" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


