"""Optimizer steps as windows of passes, and what happened to gradients inside one.

An optimizer step takes the gradients of the passes since the step before it:
its *window*. Inside a window gradients add up in ``.grad`` (accumulation over
microbatches, or over loss terms backpropagated in passes of their own), and a
``zero_grad()`` there throws away what the earlier runs added
(``PassTrace.grads_reset``). ``ACCUMULATION_RESET`` is found here; ``STALE_GRADS``
asks ``consumed_by_step`` whether gradients a pass began on were applied on purpose.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List

from ..records import PassTrace, Verdict
from .registry import verdict

# Repeats needed before clearing inside the window is a habit of the loop, not a one-off probe.
RESET_WINDOWS = 2


def stepped_by(trace) -> Dict[str, frozenset]:
    """``{pass: names of the optimizers that stepped on its gradients}`` (empty: none seen)."""
    out: Dict[str, set] = {}
    for record in (getattr(trace, "optimizers", None) or {}).values():
        for pass_name in record.passes:
            out.setdefault(pass_name, set()).add(record.name)
    return {name: frozenset(names) for name, names in out.items()}


@dataclass
class Window:
    """The passes whose gradients one optimizer step took, in order (``stepped``: a step ended it)."""

    passes: List[PassTrace]
    stepped: bool


def step_windows(trace, passes: Dict[str, PassTrace]) -> List[Window]:
    """Every pass in a window: a window ends at a pass an optimizer stepped on; the last may be open."""
    steps = stepped_by(trace)
    windows: List[Window] = []
    current: List[PassTrace] = []
    for p in passes.values():
        current.append(p)
        if p.name in steps:
            windows.append(Window(current, True))
            current = []
    if current:
        windows.append(Window(current, False))
    return windows


def consumed_by_step(windows: List[Window], p: PassTrace) -> bool:
    """Did an optimizer step take ``p``'s gradients as they stood, nothing cleared between ``p`` and it?"""
    for window in windows:
        if p in window.passes:
            later = window.passes[window.passes.index(p):]
            return window.stepped and not any(q.grads_reset for q in later)
    return False


def _pattern(name: str) -> str:
    return re.sub(r"\d+", "#", name)


def _same_habit(discarded: List[PassTrace], kept: PassTrace) -> bool:
    """Are the discarded runs the same kind of work as the kept one: microbatches of one loop?

    Unlabelled runs, or labels that differ only by a number (``micro0``, ``micro1``), that reached the
    same parameters; not the same gradient computed again (a probe that backpropagates the step's own
    loss once more, then clears it). Labels that say otherwise (``probe``, then ``train``) are deliberate.
    """
    for p in discarded:
        if p.auto != kept.auto or (not p.auto and _pattern(p.name) != _pattern(kept.name)):
            return False
        if p.covered != kept.covered:
            return False
    same = [p for p in discarded if math.isclose(p.total_norm, kept.total_norm, rel_tol=1e-6)]
    return len(same) < len(discarded) or not discarded


@verdict("ACCUMULATION_RESET", rank=42, severities=("warning",),
         meaning="between two optimizer steps, gradients written by earlier backward runs were cleared (set to None or zeroed) before the step used them, while later runs wrote new ones, step after step: `zero_grad()` inside the gradient-accumulation loop, so each step applies only the last microbatch; names the runs discarded")
def check_accumulation_reset(trace, passes, tensors, cuts):
    windows = [w for w in step_windows(trace, passes) if w.stepped]
    found = []
    for window in windows:
        resets = sum(p.grads_reset or 0 for p in window.passes)
        if not resets:
            continue
        kept = window.passes[-1]
        last_reset = max(i for i, p in enumerate(window.passes) if p.grads_reset)
        discarded = window.passes[:last_reset]
        if _same_habit(discarded, kept):
            found.append((window, discarded, kept, resets))
    if len(found) < RESET_WINDOWS:
        return []
    window, discarded, kept, resets = found[0]
    runs = sum(p.runs for p in window.passes)
    names = [p.name for p in discarded]
    shown = ", ".join(repr(n) for n in names[:4]) + (f", ... ({len(names)} passes)" if len(names) > 4 else "")
    discarded_txt = (f" (pass{'es' if len(names) > 1 else ''} {shown})" if names
                     else f" of pass {kept.name!r}")
    return [Verdict("ACCUMULATION_RESET", "warning",
                    f"gradients were cleared between backward runs with no optimizer step in between, in "
                    f"{len(found)} of {len(windows)} optimizer steps: each step applied only what its last "
                    f"backward left (pass {kept.name!r}); the {resets} earlier run(s) of its {runs}{discarded_txt} "
                    "were discarded by zero_grad() before step() used them. Call optimizer.zero_grad() once "
                    "per optimizer step, right after step(), not before every backward of the accumulation "
                    "loop (if the earlier runs are a probe discarded on purpose, label them: "
                    "trace.pass_('probe'))",
                    {"pass": kept.name, "passes": [p.name for w, _, _, _ in found for p in w.passes],
                     "discarded": names, "kept": [k.name for _, _, k, _ in found],
                     "windows": len(found), "steps": len(windows), "resets": resets})]
