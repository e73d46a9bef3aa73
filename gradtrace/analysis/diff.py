"""Diffs between two passes: what one reached that the other did not, and how magnitudes compare."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set

from ..records import Contribution, InnerProduct, PassTrace
from .names import group_by_module


@dataclass
class Diff:
    """What pass ``a`` reached that ``b`` did not, and how their magnitudes compare."""

    a: str
    b: str
    only_a: Set[str]
    only_b: Set[str]
    both: Set[str]
    ratios: Dict[str, float]  # norm in b / norm in a, for parameters both reached
    norm_a: float = 0.0
    norm_b: float = 0.0
    inner: Optional[InnerProduct] = None  # dot products, when both passes kept their gradients
    # Every parameter the passes knew: with it, module groups read as the verdicts do (``blocks.*``
    # when every block is concerned, ``blocks.{0,3}`` when some are).
    universe: Optional[List[str]] = None

    @property
    def dot(self) -> Optional[float]:
        return self.inner.dot if self.inner else None

    @property
    def cosine(self) -> Optional[float]:
        return self.inner.cosine if self.inner else None

    @property
    def top(self) -> List[Contribution]:
        return self.inner.top if self.inner else []

    def by_module(self) -> List[Dict[str, Any]]:
        rows: Dict[str, Dict[str, Any]] = {}
        for label, names in (("only_a", self.only_a), ("only_b", self.only_b), ("both", self.both)):
            for module, params in group_by_module(names, self.universe).items():
                row = rows.setdefault(module, {"module": module, "only_a": 0, "only_b": 0, "both": 0})
                row[label] += len(params)
        return sorted(rows.values(), key=lambda r: (-(r["only_a"] + r["only_b"]), r["module"]))


def diff(a: PassTrace, b: PassTrace) -> Diff:
    ca, cb = a.covered, b.covered
    ratios = {}
    for name in ca & cb:
        na, nb = a.records[name].norm, b.records[name].norm
        ratios[name] = nb / na if na else (float("inf") if nb else float("nan"))
    return Diff(a=a.name, b=b.name, only_a=ca - cb, only_b=cb - ca, both=ca & cb, ratios=ratios,
                norm_a=a.total_norm, norm_b=b.total_norm, universe=sorted(set(a.params) | set(b.params)))


