"""gradtrace: why is this gradient zero (or missing), and where did it stop flowing?

    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            loss.backward()
    print(trace.report())
"""
from .analysis import Diff
from .errors import GradtraceError
from .live import watch
from .records import Cut, GradRecord, PassTrace, ScalarRecord, TensorGradFacts, TensorRecord, ValueStats, Verdict
from .trace import Trace, load

__version__ = "0.1.0"

__all__ = [
    "watch", "load", "Trace", "PassTrace", "GradRecord", "TensorRecord", "TensorGradFacts",
    "ValueStats", "ScalarRecord", "Cut", "Diff", "Verdict", "GradtraceError", "__version__",
]
