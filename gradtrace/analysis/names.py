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
