"""The verdict registry: one declaration per verdict code, beside the check that finds it.

    @verdict("NONFINITE", rank=10, severities=("error",),
             meaning="NaN/Inf gradients; names the first parameter in backward order")
    def nonfinite(trace, passes, tensors, cuts) -> List[Verdict]: ...

``rank`` orders root causes before the effects they explain (lower first,
within a severity). The README's verdict table (docs/how-it-decides.md includes it) is generated
from here (``markdown_table``) and a test keeps the two equal; another test checks that
every registered code is produced by a real scenario.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

from ..records import SEVERITIES, Verdict

SEVERITY_RANK = {severity: i for i, severity in enumerate(SEVERITIES)}

Check = Callable[..., List[Verdict]]


@dataclass(frozen=True)
class VerdictKind:
    code: str
    rank: int
    severities: Sequence[str]  # what the check can emit, most severe first
    meaning: str  # one line, for the README table
    check: Check


REGISTRY: Dict[str, VerdictKind] = {}


def verdict(code: str, *, rank: int, severities: Sequence[str], meaning: str) -> Callable[[Check], Check]:
    """Register ``check`` as the one function that emits verdicts with ``code``."""
    bad = [s for s in severities if s not in SEVERITY_RANK]
    if bad or not severities:
        raise ValueError(f"{code}: severities must be among {SEVERITIES}, got {severities!r}")

    def register(check: Check) -> Check:
        if code in REGISTRY:
            raise ValueError(f"verdict code {code} is registered twice")
        if any(kind.rank == rank for kind in REGISTRY.values()):
            raise ValueError(f"{code}: rank {rank} is already taken")
        REGISTRY[code] = VerdictKind(code, rank, tuple(severities), meaning, check)
        return check

    return register


def ordered() -> List[VerdictKind]:
    """Every registered kind, root causes first."""
    return sorted(REGISTRY.values(), key=lambda kind: kind.rank)


def sort_key(v: Verdict):
    return SEVERITY_RANK[v.severity], REGISTRY[v.code].rank


def markdown_table() -> str:
    """The README's verdict table."""
    lines = ["| code | severity | meaning |", "| --- | --- | --- |"]
    for kind in ordered():
        lines.append(f"| `{kind.code}` | {' / '.join(kind.severities)} | {kind.meaning} |")
    return "\n".join(lines)
