"""Cuts as the analysis sees them: one per region, how to say each and fix it (what each can explain: paths.py)."""
from __future__ import annotations

from typing import List

from ..records import Cut


def outermost_cuts(cuts: List[Cut]) -> List[Cut]:
    """One cut per region: drop module-level cuts inside another cut of the same kind and pass.

    Cuts of the same module at different lines stay apart (a rollout and the bug's own forward).
    """
    kept: List[Cut] = []
    ordered = sorted(cuts, key=lambda c: (c.module.count(".") + bool(c.module), c.seq))
    for cut in ordered:
        if cut.op is None and any(
                k.op is None and k.kind == cut.kind and k.pass_name == cut.pass_name and k.module != cut.module
                and (k.module == "" or cut.module.startswith(k.module + ".")) for k in kept):
            continue
        kept.append(cut)
    return sorted(kept, key=lambda c: c.seq)


CUT_PHRASES = {
    "no_grad": "ran under torch.no_grad()",
    "inference_mode": "ran under torch.inference_mode()",
    "detach": "detached its output from the graph",
    "non_differentiable": "produced a non-differentiable (integer/bool) output",
    "checkpoint": "ran inside reentrant checkpointing (torch.utils.checkpoint, use_reentrant=True)",
}


def describe_cut(cut: Cut) -> str:
    where = (f"module {cut.module!r}" if cut.module else
             f"the root module ({cut.module_type})" if cut.module_type else "code outside any module")
    op = f" at op {cut.op}" if cut.op else ""
    inside = f"; inside {cut.library_location}" if cut.library_location and cut.library_location != cut.location else ""
    return f"{where} {CUT_PHRASES.get(cut.kind, cut.kind)}{op} ({cut.kind}, {cut.location}{inside})"


