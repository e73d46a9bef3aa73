"""A Lightning callback: one gradtrace pass per optimizer step.

    from gradtrace.integrations.lightning import GradtraceCallback

    trainer = lightning.Trainer(callbacks=[GradtraceCallback(every=50, save_dir="gradtraces")])

Each traced step opens ``gradtrace.watch(pl_module)`` and a pass named
``step-<global_step>`` at the first microbatch of the step (so every
microbatch of gradient accumulation lands in the one pass) and closes both in
``on_before_optimizer_step``: the figures are the gradients Lightning hands to
the optimizer, before gradient clipping. Between traced steps no hook is
registered at all, so ``every=N`` costs nothing on the other steps, and
validation (which runs without grad) is never mistaken for a graph cut.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, List, Optional

from ..errors import GradtraceError

try:  # the unified package first; the standalone one has its own, distinct Callback class
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise GradtraceError('gradtrace.integrations.lightning needs Lightning: pip install "gradtrace[lightning]" '
                             "(or pip install lightning)") from None


class GradtraceCallback(Callback):
    """Trace one optimizer step in every ``every``; log its metrics; optionally save each trace as JSON.

    ``every``: trace steps whose ``global_step`` is a multiple of it.
    ``max_passes``: how many traced steps to keep in ``.traces`` (each trace
    holds one pass, the step); ``.trace`` is the newest. ``save_dir``: write
    each traced step to ``<save_dir>/step-<global_step>.json`` (read it back
    with ``gradtrace.load`` or ``python -m gradtrace show``). ``log``: send
    ``trace.metrics(prefix, passes="last")`` through ``pl_module.log_dict``
    (the same keys every step: ``gradtrace/coverage``, ``gradtrace/total_norm``, ...,
    and ``gradtrace/traced_step``, the step the values belong to).
    ``cuts``: ``gradtrace.watch``'s cut detection mode.
    """

    def __init__(self, every: int = 1, max_passes: int = 8, save_dir: Optional[str] = None, log: bool = True,
                 prefix: str = "gradtrace/", per_module: bool = False, cuts: str = "modules"):
        for option, value in (("every", every), ("max_passes", max_passes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GradtraceError(f"GradtraceCallback({option}=...) is a positive int, got {value!r}")
        self.every, self.max_passes, self.save_dir = every, max_passes, save_dir
        self.log, self.prefix, self.per_module, self.cuts = log, prefix, per_module, cuts
        self.traces: List[Any] = []
        self._stack: Optional[contextlib.ExitStack] = None
        self._open_trace = None

    @property
    def trace(self):
        """The newest traced step's trace (None before the first traced step has finished)."""
        return self.traces[-1] if self.traces else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._stack is not None or trainer.global_step % self.every:
            return  # a later microbatch of a step already being traced, or a step not traced
        from ..live import watch

        stack = contextlib.ExitStack()
        trace = stack.enter_context(watch(pl_module, cuts=self.cuts))
        stack.enter_context(trace.pass_(f"step-{trainer.global_step}"))
        self._stack, self._open_trace = stack, trace

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._stack is None:
            return
        trace = self._close()
        if self.save_dir is not None:
            os.makedirs(self.save_dir, exist_ok=True)
            trace.save(os.path.join(self.save_dir, f"step-{trainer.global_step}.json"))
        if self.log:
            metrics = trace.metrics(self.prefix, self.per_module, passes="last")
            # Lightning's loggers repeat the last on_step value on steps that log nothing (every > 1):
            # the traced step's number tells a fresh value from a repeated one.
            metrics[f"{self.prefix}traced_step"] = float(trainer.global_step)
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()  # a step cut short (the run ended between microbatches): keep what it recorded

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()  # never leave hooks on the model after a failed run

    def _close(self):
        if self._stack is None:
            return None
        stack, trace = self._stack, self._open_trace
        self._stack = self._open_trace = None
        stack.close()
        self.traces = (self.traces + [trace])[-self.max_passes:]
        return trace
