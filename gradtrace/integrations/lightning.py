"""A Lightning callback: one gradtrace pass per optimizer step, the same vocabulary as the transformers one.

    from gradtrace.integrations.lightning import GradtraceCallback

    callback = GradtraceCallback(every=50, save_dir="gradtraces")
    trainer = lightning.Trainer(callbacks=[callback])
    trainer.fit(model, data)
    print(callback.trace.report())

The options and what a step is are ``steps.StepTracer``'s: one
``gradtrace.watch(pl_module)`` from ``on_train_start`` to ``on_train_end``;
each optimizer step is the pass ``step-<n>`` (``n`` counts optimizer steps
from 1: ``trainer.global_step`` once the step is taken), opened at its first
microbatch's ``on_train_batch_start`` and closed in
``on_before_optimizer_step``, so every microbatch of gradient accumulation
lands in it and its figures are what Lightning hands the optimizer: after AMP's
``unscale_``, before gradient clipping. Validation inside the run runs
without grad: it is recorded as a cut outside every pass, which is never
blamed unless it explains a real loss of coverage. ``register(trace, batch)``
is called with every microbatch of a step. ``log``: the judged step's metrics
go through ``pl_module.log_dict``. A run that raises ends its open step as
failed (PASS_FAILED) in ``on_exception``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from ..errors import GradtraceError
from .steps import StepOptions, StepTracer, StepViews

__all__ = ["GradtraceCallback"]

try:  # the unified package first; the standalone one has its own, distinct Callback class
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise GradtraceError('gradtrace.integrations.lightning needs Lightning: pip install "gradtrace[lightning]" '
                             "(or pip install lightning)") from None


class GradtraceCallback(StepViews, Callback):
    """Trace every optimizer step of a Lightning run as pass ``step-<n>`` of one trace (``.trace``).

    ``every``, ``max_passes``, ``cuts``, ``save_dir``, ``save_every``,
    ``register``, ``print_errors``, ``prefix``, ``per_module``, ``gather``: as in
    ``gradtrace.integrations.transformers.GradtraceCallback`` (docs/lightning.md).
    ``log``: send each judged step's metrics through ``pl_module.log_dict``
    (the same keys every step, plus ``<prefix>traced_step``).
    """

    def __init__(self, *, every: int = 1, max_passes: Optional[int] = 100, cuts: str = "modules",
                 save_dir: Optional[str] = None, save_every: Optional[int] = None,
                 register: Optional[Callable[[Any, Any], Any]] = None, print_errors: bool = True,
                 prefix: str = "gradtrace/", per_module: bool = False, gather: bool = True, log: bool = True):
        if not isinstance(log, bool):
            raise GradtraceError(f"GradtraceCallback(log=...) is True or False, got {log!r}")
        # The pass closes in on_before_optimizer_step, before clipping and zero_grad: read it there.
        self._steps = StepTracer(StepOptions(every=every, max_passes=max_passes, cuts=cuts, save_dir=save_dir,
                                             save_every=save_every, register=register, print_errors=print_errors,
                                             prefix=prefix, per_module=per_module, gather=gather),
                                 read_at="pass_end")
        self.log = log

    def on_train_start(self, trainer, pl_module) -> None:
        self._steps.start(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        steps = self._steps
        if steps.running and steps.open_step is None:  # the first microbatch of an optimizer step
            steps.begin_step(trainer.global_step + 1)
        steps.register(batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = self._steps.end_step()
        if step is not None and self.log and self._steps.judged(step):
            # Lightning's loggers repeat the last on_step value on steps that log nothing (every > 1):
            # traced_step tells a fresh value from a repeated one.
            pl_module.log_dict(self.metrics, on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self._steps.stop()  # a step cut short (the run ended between microbatches) keeps what it recorded

    def on_exception(self, trainer, pl_module, exception) -> None:
        try:
            self._steps.fail_step(exception)
        finally:
            self._steps.stop(merge=False)  # never leave hooks on the model after a failed run
