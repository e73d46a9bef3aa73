"""Analysis: diffs between passes and ranked verdicts, over plain records only.

``names`` (grouping layers for people), ``diff`` (pass against pass), ``cuts``
(cuts as evidence), ``paths`` (which cuts lie on the path of the forward a pass
differentiated), ``registry`` (one declaration per verdict code), the checks
(``checks``, ``tensor_checks``, ``optimizer_checks``) and ``explain`` (a cause
ranks before the effects it explains). Nothing here imports torch or the capture
code: a loaded trace is analysed exactly like a live one.
"""
from . import checks as _checks  # noqa: F401  (registers every verdict check)
from . import forward as _forward  # noqa: F401  (registers UNREGISTERED_MODULE, TIED_FROZEN)
from . import optimizer_checks as _optimizer_checks  # noqa: F401
from . import steps as _steps  # noqa: F401
from . import tensor_checks as _tensor_checks  # noqa: F401
from . import wrapped as _wrapped  # noqa: F401  (what distributed wrappers hide)
from .cuts import outermost_cuts
from .diff import Diff, diff
from .names import group_by_module
from .registry import REGISTRY
from .checks import verdicts

__all__ = ["Diff", "diff", "verdicts", "outermost_cuts", "group_by_module", "REGISTRY"]
