"""Analysis: diffs between passes and ranked verdicts, over plain records only.

``names`` (grouping layers for people), ``diff`` (pass against pass), ``cuts``
(cuts as evidence), ``registry`` (one declaration per verdict code) and
``checks`` (the checks themselves). Nothing here imports torch or the capture
code: a loaded trace is analysed exactly like a live one.
"""
from . import checks as _checks  # noqa: F401  (registers every verdict check)
from . import wrapped as _wrapped  # noqa: F401  (what distributed wrappers hide)
from .cuts import outermost_cuts
from .diff import Diff, diff
from .names import group_by_module
from .registry import REGISTRY
from .checks import verdicts

__all__ = ["Diff", "diff", "verdicts", "outermost_cuts", "group_by_module", "REGISTRY"]
