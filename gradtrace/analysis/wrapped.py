"""What a distributed wrapper kept out of gradtrace's sight: figures it made unknown, names it replaced.

A wrapper (DDP, FSDP, DeepSpeed) decides where a pass's gradient lives and
when; where a pass's own share cannot be read (a sync that averaged it with an
earlier microbatch's, DeepSpeed between accumulation boundaries), the capture
marks those figures unknown and records why (``PassTrace.unknown_because``):
never a number under a label it does not deserve.
"""
from __future__ import annotations

from typing import List

from ..records import Verdict
from .names import describe_params
from .registry import verdict


@verdict("FIGURES_UNKNOWN", rank=155, severities=("warning",),
         meaning="a distributed wrapper (DDP, FSDP, DeepSpeed) kept a pass's own gradient where it cannot be read "
                 "apart from other microbatches': the figures are unknown, not zero; says why and what gives "
                 "exact ones")
def check_figures_unknown(trace, passes, tensors, cuts) -> List[Verdict]:
    out = []
    for p in passes.values():
        unknown = sorted(p.cleared) if p.unknown_because else []
        if unknown:
            out.append(Verdict("FIGURES_UNKNOWN", "warning",
                               f"pass {p.name!r}: the figures of {len(unknown)} parameter(s) are unknown "
                               f"({describe_params(unknown, universe=trace.params)}): {p.unknown_because}",
                               {"pass": p.name, "parameters": unknown, "because": p.unknown_because}))
    return out


@verdict("FLAT_PARAMS", rank=165, severities=("info",),
         meaning="FSDP1 built without `use_orig_params=True`: the names are FSDP's flat parameters (one per "
                 "wrapped unit), not the model's own")
def check_flat_params(trace, passes, tensors, cuts) -> List[Verdict]:
    if not trace.meta.flat_params:
        return []
    return [Verdict("FLAT_PARAMS", "info",
                    f"the watched model is FSDP1 without use_orig_params=True: its {len(trace.params)} name(s) "
                    f"({describe_params(list(trace.params))}) are FSDP's flat parameters, one per wrapped unit, "
                    "each holding many of the model's parameters; build FullyShardedDataParallel(..., "
                    "use_orig_params=True) for per-parameter names and figures",
                    {"parameters": list(trace.params)})]
