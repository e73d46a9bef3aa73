"""gradtrace: why is this gradient zero (or missing), and where did it stop flowing?

    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            loss.backward()
    print(trace.report())

Reading a saved trace (``gradtrace.load``) needs neither torch nor the capture
code, so ``watch`` is imported on first use.
"""
from typing import TYPE_CHECKING

from .analysis import Diff
from .errors import GradtraceError
from .records import (Contribution, Cut, GradRecord, InnerProduct, NonfiniteOrigin, PassTrace, ScalarRecord,
                      TensorGradFacts, TensorRecord, TraceMeta, ValueStats, Verdict)
from .trace import Trace, load

if TYPE_CHECKING:
    from .live import watch

__version__ = "0.1.0"

__all__ = [
    "watch", "load", "Trace", "PassTrace", "GradRecord", "TensorRecord", "TensorGradFacts", "ValueStats",
    "ScalarRecord", "Cut", "Diff", "Verdict", "TraceMeta", "InnerProduct", "Contribution", "NonfiniteOrigin",
    "GradtraceError", "__version__",
]


_SUBMODULES = ("testing", "integrations")  # gradtrace.testing.assert_grads_flow after a plain `import gradtrace`


def __getattr__(name: str):
    if name == "watch":  # imports torch and the capture code: only when someone watches
        from .live import watch
        globals()["watch"] = watch  # later lookups skip this function
        return watch
    if name in _SUBMODULES:  # imported on first use (testing imports torch)
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gradtrace' has no attribute {name!r}")
