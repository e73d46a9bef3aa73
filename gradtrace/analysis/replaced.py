"""Parameters replaced while watched: named once, and kept out of the coverage findings they would fake.

gradtrace's hooks live on the tensors ``watch`` found. A parameter replaced
afterwards (a new ``nn.Parameter`` in the module, or a ``swap_tensors`` by
``.to()`` under swap-on-conversion) is seen no more: its "no gradient" is
gradtrace's blindness, not the model's. The live trace names them in
``meta.replaced_params`` (``{name: "replaced" | "swapped"}``, type-checked when a trace is loaded).
"""
from __future__ import annotations

from typing import Dict, List

from ..records import Verdict
from .names import describe_params
from .registry import verdict

_HOW = {
    "replaced": "a new Parameter object took its place in the module (an optimizer built before still holds the old one)",
    "swapped": "torch.utils.swap_tensors swapped it in place (.to()/.double() under "
               "torch.__future__.set_swap_module_params_on_conversion(True))",
}


def replaced_params(trace) -> Dict[str, str]:
    """``{parameter: "replaced" | "swapped"}`` for the watched parameters gradtrace lost track of."""
    return dict(trace.meta.replaced_params or {})


@verdict("PARAMS_REPLACED", rank=14, severities=("warning",),
         meaning="watched parameters were replaced or swapped while watched: gradtrace can no longer see them, "
                 "so their missing gradients are not reported as unused or uncovered")
def check_replaced(trace, passes, tensors, cuts) -> List[Verdict]:
    found = replaced_params(trace)
    if not found:
        return []
    out = []
    order = {n: i for i, n in enumerate(trace.params)}
    for how in _HOW:
        names = sorted((n for n, h in found.items() if h == how), key=lambda n: order.get(n, len(order)))
        if names:
            out.append(Verdict("PARAMS_REPLACED", "warning",
                               f"{len(names)} watched parameter(s) were {how} while watched "
                               f"({describe_params(names, universe=trace.params)}): {_HOW[how]}. gradtrace's hooks "
                               "stayed on the old tensors, so what these received afterwards is unknown (not "
                               "reported as unused). Change parameters before entering watch",
                               {"parameters": names, "how": how}))
    return out
