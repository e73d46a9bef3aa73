"""Long runs in a report a person can read: runs of passes with one coverage pattern, and repeated findings.

A watch left open over a training loop holds hundreds of passes (one per
step). Listing each as a row, a column and a verdict makes a report of
megabytes; what a reader needs is which coverage patterns occurred, over which
steps, and each finding once with how often it recurred.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

from ..records import PassTrace, Verdict

# Up to this many passes the report lists each one; beyond it, consecutive passes with the
# same coverage are summarised as one group.
LIST_EACH_UP_TO = 12


@dataclass
class PassGroup:
    """Consecutive passes that reached the same parameters by the same route."""

    passes: List[PassTrace]

    @property
    def first(self) -> PassTrace:
        return self.passes[0]

    @property
    def label(self) -> str:
        if len(self.passes) == 1:
            return self.first.name
        return f"{self.first.name} .. {self.passes[-1].name} ({len(self.passes)} passes)"

    @property
    def short_label(self) -> str:
        """For a column header: the first and last name only."""
        return self.first.name if len(self.passes) == 1 else f"{self.first.name}..{self.passes[-1].name}"


def group_passes(passes: Dict[str, PassTrace]) -> List[PassGroup]:
    """One group per pass for short traces; runs of identical coverage for long ones."""
    if len(passes) <= LIST_EACH_UP_TO:
        return [PassGroup([p]) for p in passes.values()]
    groups: List[PassGroup] = []
    for p in passes.values():
        last = groups[-1].first if groups else None
        if last is not None and last.covered == p.covered and last.kinds == p.kinds and \
                bool(last.failed) == bool(p.failed):
            groups[-1].passes.append(p)
        else:
            groups.append(PassGroup([p]))
    return groups


def _pattern(v: Verdict, names: Sequence[str]) -> str:
    """The verdict's message with every quoted pass name blanked: equal for the same finding in another pass."""
    message = v.message
    for name in names:
        message = message.replace(repr(name), "'…'")
    return f"{v.severity}|{v.code}|{message}"


def collapse_verdicts(verdicts: List[Verdict], pass_names: Sequence[str]) -> List[tuple]:
    """``(verdict, passes it recurred in)``: a finding repeated pass after pass is listed once."""
    if len(pass_names) <= LIST_EACH_UP_TO:
        return [(v, []) for v in verdicts]
    by_pattern: Dict[str, tuple] = {}
    for v in verdicts:
        pass_name = v.evidence.get("pass") if isinstance(v.evidence, dict) else None
        key = _pattern(v, [pass_name]) if isinstance(pass_name, str) else f"{id(v)}"
        entry = by_pattern.setdefault(key, (v, []))
        if isinstance(pass_name, str):
            entry[1].append(pass_name)
    return list(by_pattern.values())


def recurrence(passes: List[str]) -> str:
    if len(passes) <= 1:
        return ""
    return f" [the same in {len(passes)} passes: {passes[0]} .. {passes[-1]}]"
